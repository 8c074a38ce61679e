"""The HTTP API's requests: a chat completion's JSON body checked for shape and turned into plain
values (:class:`_ChatRequest`), the body read within its size limit, and :class:`HttpError`, the
OpenAI-shaped answer other than 200. :mod:`steer.server.http_api` re-exports the public names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse
from steer.server.strategies import CONDITIONED

STEERING_FIELDS = ("weights", "strategy", "candidates", "return_rewards", "return_candidates", "top_k",
                   "dry_multiplier", "dry_base", "dry_allowed_length")
STANDARD_FIELDS = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
    "stream", "stream_options", "n",
)
# Accepted and ignored: they do not change what is generated.
IGNORED_FIELDS = (
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "verbosity",
)
# OpenAI features this server does not have; refused unless left at their "off" value.
UNSUPPORTED_FIELDS = (
    "tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "logit_bias",
    "frequency_penalty", "presence_penalty", "response_format", "audio", "modalities", "prediction",
    "web_search_options",
)
_OFF_VALUES = (None, False, 0, "", "none", "auto", [], {}, ["text"], {"type": "text"})
_KEYED = re.compile(r"\[(?!\d+\])([^\]]+)\]")  # weights[helpfulness] -> weights.helpfulness; messages[0] stays


class HttpError(Exception):
    """An answer other than 200, OpenAI-shaped."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ChatRequest:
    """The JSON body of a chat completion, checked for shape and turned into plain values."""

    def __init__(self, body: object):
        if not isinstance(body, dict):
            raise HttpError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        for name in body:
            if name in UNSUPPORTED_FIELDS:
                if body[name] not in _OFF_VALUES:
                    raise HttpError(400, f"{name}: is not supported by this server; leave it out", name,
                                    "unsupported_parameter")
            elif name not in STANDARD_FIELDS + STEERING_FIELDS + IGNORED_FIELDS:
                raise HttpError(400, f"{name}: unknown parameter", name, "unknown_parameter")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise HttpError(400, f"model: must be a string, got {type(model).__name__}", "model")
        self.messages = _messages(body.get("messages"))
        n = body.get("n")
        if n is not None and n != 1:
            raise HttpError(400, f"n: only n=1 is supported, got {n!r}; send one request per completion", "n")
        self.stream = False if body.get("stream") is None else body["stream"]
        if not isinstance(self.stream, bool):
            raise HttpError(400, f"stream: must be true or false, got {self.stream!r}", "stream")
        options = body.get("stream_options")
        self.include_usage = False
        if options is not None:
            if not self.stream:
                raise HttpError(400, "stream_options: only allowed when stream is true", "stream_options")
            if not isinstance(options, dict):
                raise HttpError(400, "stream_options: must be an object", "stream_options")
            self.include_usage = options.get("include_usage", False)
            if not isinstance(self.include_usage, bool):
                raise HttpError(400, "stream_options.include_usage: must be true or false",
                                "stream_options.include_usage")
        # max_completion_tokens is OpenAI's current name, max_tokens the older one; errors use the one given.
        self.max_tokens_field = (
            "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise HttpError(400, "max_tokens: give max_tokens or max_completion_tokens, not both", "max_tokens")
        stop = body.get("stop")
        self.stop_is_string = isinstance(stop, str)
        if stop is not None and not isinstance(stop, (str, list)):
            raise HttpError(400, f"stop: must be a string or a list of strings, got {type(stop).__name__}", "stop")
        self.sampling = {
            "max_new_tokens": body.get(self.max_tokens_field),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "top_k": body.get("top_k"),
            "seed": body.get("seed"),
            "stop": None if stop is None else (stop,) if self.stop_is_string else tuple(stop),
            **{name: body.get(name) for name in ("dry_multiplier", "dry_base", "dry_allowed_length")},
        }
        # Steering fields go to the domain as given (null: the default); it checks their types and values.
        # weights left out (a plain OpenAI client, an eval harness): None, every objective weighted equally.
        unset = {"weights": None, "strategy": CONDITIONED, "candidates": 0, "return_rewards": False,
                 "return_candidates": False}
        self.weights, self.strategy, self.candidates, self.return_rewards, self.return_candidates = (
            default if body.get(name) is None else body[name] for name, default in unset.items()
        )

    def param(self, field: str) -> str:
        """The domain's field name (gRPC spelling) as this request spells it."""
        if field == "sampling.max_new_tokens":
            return self.max_tokens_field
        if field.startswith("sampling."):
            field = field[len("sampling."):]
            if self.stop_is_string and field.startswith("stop["):
                return "stop"
        return _KEYED.sub(r".\1", field)


def _messages(messages: object) -> list:
    """OpenAI messages as build_conversation takes them: text parts joined, ``developer`` read as ``system``."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages: must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)  # build_conversation names it
            continue
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system turn
            role = "system"
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    where = f"messages[{i}].content[{j}]"
                    raise HttpError(
                        400, f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported", where)
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append({"role": role, "content": content})
    return out


async def _json_body(request: Request, limit: int) -> object:
    """The request body parsed as JSON; at most ``limit`` bytes are read (413 beyond)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body: {declared} bytes; this server takes at most {limit}", None,
                        "request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise HttpError(413, f"request body: more than {limit} bytes; this server takes at most {limit}", None,
                            "request_too_large")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(400, f"request body: not valid JSON ({e})", None, "invalid_json") from None
