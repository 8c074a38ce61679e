"""Bearer-token authentication for the gRPC server and the HTTP API.

With ``--auth-token-file``, every call must carry ``authorization: Bearer <token>`` metadata (an
``Authorization`` header over HTTP); a missing or wrong token ends as ``UNAUTHENTICATED`` (HTTP 401)
before any work is done. Health checks and reflection stay open so load balancers and tooling work
without the secret. Both transports ask :func:`bearer_denial`, which compares in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_token_file(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace stripped); errors name the file."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ValueError(f"--auth-token-file {path}: cannot read ({e.strerror})") from None
    if not token:
        raise ValueError(f"--auth-token-file {path}: file is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"--auth-token-file {path}: the token must be one line without spaces")
    return token


MISSING_METADATA = "missing authorization metadata: send 'authorization: Bearer <token>'"


def bearer_denial(given: str | None, expected: bytes, missing: str = MISSING_METADATA) -> str | None:
    """None when ``given`` (the authorization value) equals ``expected`` (``b"Bearer <token>"``), else why not."""
    if given is None:
        return missing
    if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        return None
    return "invalid bearer token"


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    # The denial must match the method's cardinality; request bodies are not even parsed.
    return unary, stream


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization")
        handler = await continuation(handler_call_details)
        message = bearer_denial(given, self._expected)
        if message is None:
            return handler
        unary, stream = _deny(message)
        if handler is None:
            return None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)
