"""The OpenAI-compatible HTTP API over a real server running the tiny model, through the official
openai client (and once over a bare socket for the server-sent-events wire format)."""

import asyncio
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from steer.conditioning import render_prompt
from steer.objectives import Direction
from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

TOKEN = "http-s3cret"
HI = [{"role": "user", "content": "Tell me a story."}]


def _config(**overrides):
    from steer.server.app import ServerConfig
    from steer.server.engine import EngineConfig

    from steer.sampling import SamplingParams

    fields = dict(port=0, http_port=0, engine=EngineConfig(max_new_tokens=64),
                  sampling_defaults=SamplingParams(max_new_tokens=16))
    fields.update(overrides)
    return ServerConfig(**fields)


def _client(server, api_key="unused", **kw) -> openai.OpenAI:
    # No retries: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.running.http_port}/v1", api_key=api_key, max_retries=0,
                         timeout=60, **kw)


def _url(server, path):
    return f"http://127.0.0.1:{server.running.http_port}{path}"


def _get(server, path, headers=None):
    """(status, parsed JSON body) of a GET, whatever the status."""
    req = urllib.request.Request(_url(server, path), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def http_server(start_tiny_server):
    return start_tiny_server(_config())


@pytest.fixture()
def client(http_server):
    with _client(http_server) as c:
        yield c


def test_completion_is_steered_by_weights_and_matches_grpc(http_server, client, tokenizer, tiny_model_dir):
    weights = {"helpfulness": 3.0, "creativity": 1.0}
    reply = client.chat.completions.create(
        model="anything", messages=HI, max_tokens=8, temperature=0.0, extra_body={"weights": weights},
    )
    assert reply.object == "chat.completion"
    assert reply.steer["direction"] == pytest.approx({"helpfulness": 0.75, "creativity": 0.25, "conciseness": 0.0})
    assert reply.steer["strategy"] == "conditioned"
    assert reply.steer["rewards"] is None  # not asked for, and this server runs no scorer
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"  # the random tiny model does not end its turn within 8 tokens
    assert reply.usage.completion_tokens == 8
    # The prompt is the conditioned, templated conversation, counted as the tokenizer counts it.
    prompt = render_prompt(tokenizer, HI, Direction.from_weights(weights))
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    # One engine behind both transports: greedy text over gRPC is the same text.
    with grpc.insecure_channel(http_server.target) as channel:
        grpc_reply = steer_pb2_grpc.SteerStub(channel).Generate(pb.GenerateRequest(
            messages=[pb.Message(**m) for m in HI], weights=weights,
            sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0),
        ), timeout=60)
    assert choice.message.content == grpc_reply.text
    assert reply.model == str(tiny_model_dir)  # whatever the request named, the served model answers


def test_a_plain_openai_request_without_weights_weighs_every_objective_equally(client):
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, temperature=0.0)
    third = pytest.approx(1 / 3)
    assert reply.steer["direction"] == {"helpfulness": third, "creativity": third, "conciseness": third}
    same = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, temperature=0.0,
                                          extra_body={"weights": {"helpfulness": 1, "creativity": 1, "conciseness": 1}})
    assert reply.choices[0].message.content == same.choices[0].message.content


def test_stream_concatenates_to_the_plain_text_and_ends_with_usage(client):
    request = dict(model="tiny", messages=HI, max_completion_tokens=12, temperature=1.0, seed=7,
                   extra_body={"weights": {"conciseness": 1}})
    plain = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    usage_chunk, finish_chunk, text_chunks = chunks[-1], chunks[-2], chunks[:-2]
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.completion_tokens, usage_chunk.usage.prompt_tokens) == (12, plain.usage.prompt_tokens)
    assert usage_chunk.usage.total_tokens == plain.usage.prompt_tokens + 12
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks) == plain.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in text_chunks)
    assert finish_chunk.choices[0].finish_reason == "length"
    for last in (finish_chunk, usage_chunk):
        assert last.steer["direction"] == {"helpfulness": 0.0, "creativity": 0.0, "conciseness": 1.0}
        assert last.steer["strategy"] == "conditioned"
    # Without include_usage no chunk carries usage, and the finish chunk is the last.
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].steer["direction"]["conciseness"] == 1.0
    assert all(c.usage is None for c in chunks)


def test_sse_wire_format(http_server):
    body = {"model": "tiny", "messages": HI, "max_tokens": 5, "seed": 3, "stream": True, "weights": {"helpfulness": 1}}
    req = urllib.request.Request(_url(http_server, "/v1/chat/completions"), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        assert reply.headers["x-request-id"]
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream ends with a blank line after the last event"
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None] * (len(payloads) - 1) + ["length"]
    assert "steer" in payloads[-1] and all("steer" not in p for p in payloads[:-1])
    assert all("usage" not in p for p in payloads)  # include_usage was not asked for


def test_models_list_and_health(http_server, client, tiny_model_dir):
    models = client.models.list()
    assert [m.id for m in models.data] == [str(tiny_model_dir)]
    card = models.data[0]
    assert card.object == "model"
    assert card.adapter is None  # the tiny model is served bare
    assert card.objectives == ["helpfulness", "creativity", "conciseness"]
    assert card.strategies == ["conditioned"]  # no scorer: no rerank
    assert card.max_model_len == 512
    assert _get(http_server, "/health") == (200, {"status": "serving"})
    status, body = _get(http_server, "/v1/nope")
    assert status == 404 and body["error"]["code"] == "not_found"


# (extra_body, param, message start): the param names the field as the request spells it.
INVALID = [
    ({"weights": {"helpfulness": -1}}, "weights.helpfulness", "weights.helpfulness: must be finite and >= 0"),
    ({"weights": {"humour": 1}}, "weights.humour", "weights.humour: unknown objective 'humour'"),
    ({"weights": {"helpfulness": 0}}, "weights", "weights: at least one weight must be > 0"),
    ({"weights": {}}, "weights", "weights: at least one weight must be > 0"),
    ({"weights": [1, 2]}, "weights", "weights: expected a mapping"),
    ({"weights": {"helpfulness": 1}, "n": 2}, "n", "n: only n=1 is supported"),
    ({"weights": {"helpfulness": 1}, "max_tokens": 65}, "max_tokens", "max_tokens: must be <= 64"),
    ({"weights": {"helpfulness": 1}, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens: must be an integer >= 1"),
    ({"weights": {"helpfulness": 1}, "temperature": -0.5}, "temperature", "temperature: must be finite and >= 0"),
    ({"weights": {"helpfulness": 1}, "top_p": 1.5}, "top_p", "top_p: must be in (0, 1]"),
    ({"weights": {"helpfulness": 1}, "stop": ["ok", ""]}, "stop[1]", "stop[1]: must be a non-empty string"),
    ({"weights": {"helpfulness": 1}, "dry_multiplier": -1}, "dry_multiplier",
     "dry_multiplier: must be finite and >= 0"),
    ({"weights": {"helpfulness": 1}, "dry_allowed_length": "2"}, "dry_allowed_length",
     "dry_allowed_length: must be an integer >= 1"),
    ({"weights": {"helpfulness": 1}, "strategy": "bogus"}, "strategy", "strategy: unknown value 'bogus'"),
    ({"weights": {"helpfulness": 1}, "strategy": "rerank"}, "strategy",
     "strategy: rerank is not offered by this server"),
    ({"weights": {"helpfulness": 1}, "candidates": -1}, "candidates", "candidates: must be an integer >= 0"),
    ({"weights": {"helpfulness": 1}, "return_rewards": True}, "return_rewards",
     "return_rewards: this server runs no reward scorer"),
    ({"weights": {"helpfulness": 1}, "wieghts": {"helpfulness": 1}}, "wieghts", "wieghts: unknown parameter"),
    ({"weights": {"helpfulness": 1}, "tools": [{"type": "function"}]}, "tools", "tools: is not supported"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("extra, param, message", INVALID,
                         ids=[c[1] + "-" + c[2][len(c[1]) + 2:][:20] for c in INVALID])
def test_invalid_input_is_400_naming_the_param(client, stream, extra, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        result = client.chat.completions.create(model="tiny", messages=HI, extra_body=extra, stream=stream)
        list(result)
    assert e.value.status_code == 400
    error = e.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "user", "content": "  "}], "messages[0].content"),
    ([{"role": "bot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "messages[1].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
])
def test_invalid_messages_name_the_message(client, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, extra_body={"weights": {"helpfulness": 1}})
    assert e.value.response.json()["error"]["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_conversation_longer_than_the_context_is_400_before_any_stream(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 600}],
                                            stream=stream, extra_body={"weights": {"helpfulness": 1}}))
    error = e.value.response.json()["error"]
    assert error["param"] == "messages"
    assert "this model's context is 512 tokens" in error["message"]


def test_http_and_grpc_refuse_with_the_same_reason(http_server, client):
    """One validation: the gRPC details and the HTTP message differ only in how the field is spelt."""
    cases = [({"humour": 2}, "weights[humour]", "weights.humour"),
             ({"creativity": -1}, "weights[creativity]", "weights.creativity"),
             ({"helpfulness": 0}, "weights", "weights")]
    with grpc.insecure_channel(http_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        for weights, grpc_field, http_param in cases:
            with pytest.raises(grpc.RpcError) as g:
                stub.Generate(pb.GenerateRequest(prompt="hi", weights=weights), timeout=30)
            with pytest.raises(openai.BadRequestError) as h:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               extra_body={"weights": weights})
            field, reason = g.value.details().split(": ", 1)
            assert field == grpc_field
            error = h.value.response.json()["error"]
            assert (error["param"], error["message"]) == (http_param, f"{http_param}: {reason}")


def test_content_parts_and_developer_role_are_read_as_text(client):
    parts = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0.0, extra_body={"weights": {"helpfulness": 1}},
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]}],
    )
    plain = client.chat.completions.create(
        model="tiny", max_tokens=6, temperature=0.0, extra_body={"weights": {"helpfulness": 1}},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me\na story."}],
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_stop_string_cuts_the_text(client):
    request = dict(model="tiny", messages=HI, max_tokens=20, temperature=0.0,
                   extra_body={"weights": {"helpfulness": 1}})
    full = client.chat.completions.create(**request).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "need a non-blank stop string from the middle of the text"
    cut = client.chat.completions.create(**request, stop=stop)
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.steer["finish_reason"] == "stop_sequence"


def probe_rewards(text: str) -> dict:
    """The test scorer's rewards, plain functions of the text: helpfulness = its length in characters,
    creativity = minus that, conciseness = 0 (so RERANK toward helpfulness picks the longest candidate)."""
    return {"helpfulness": float(len(text)), "creativity": -float(len(text)), "conciseness": 0.0}


@pytest.fixture(scope="module")
def scored_server(start_tiny_server):
    import torch

    from steer.rewards.scorer import Scorer

    class Probe(Scorer):
        objectives = ("helpfulness", "creativity", "conciseness")

        def raw_scores(self, conversations, responses):
            return torch.tensor([list(probe_rewards(r).values()) for r in responses])  # (n, 3)

        def describe(self):
            return "length-probe"

    return start_tiny_server(_config(), scorer=Probe())


def test_rerank_and_rewards_over_http(scored_server):
    with _client(scored_server) as c:
        reply = c.chat.completions.create(
            model="tiny", messages=HI, max_tokens=8, temperature=1.0, seed=5, extra_body={
                "weights": {"helpfulness": 1}, "strategy": "rerank", "candidates": 3, "return_candidates": True},
        )
        text = reply.choices[0].message.content
        candidates = reply.steer["candidates"]
        assert reply.steer["strategy"] == "rerank"
        assert len(candidates) == 3 and candidates[0]["text"] == text
        assert len(text) == max(len(cand["text"]) for cand in candidates)  # the longest wins under helpfulness
        assert [cand["weighted_reward"] for cand in candidates] == sorted(
            (float(len(cand["text"])) for cand in candidates), reverse=True)
        assert reply.steer["rewards"] == probe_rewards(text)
        assert reply.usage.completion_tokens == 3 * 8  # every candidate's tokens
        # CONDITIONED measures its text only when asked, streamed or not.
        ask = dict(model="tiny", messages=HI, max_tokens=6, seed=2,
                   extra_body={"weights": {"conciseness": 1}, "return_rewards": True})
        plain = c.chat.completions.create(**ask)
        assert plain.steer["rewards"] == probe_rewards(plain.choices[0].message.content)
        chunks = list(c.chat.completions.create(**ask, stream=True))
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert streamed == plain.choices[0].message.content
        assert chunks[-1].steer["rewards"] == probe_rewards(streamed)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=HI, stream=True,
                                      extra_body={"weights": {"helpfulness": 1}, "strategy": "rerank"})
        assert e.value.response.json()["error"]["param"] == "stream"
        assert [m.strategies for m in c.models.list().data] == [["conditioned", "rerank"]]


@pytest.fixture(scope="module")
def auth_server(start_tiny_server):
    return start_tiny_server(_config(auth_token=TOKEN))


def test_wrong_or_missing_token_is_401_and_health_stays_open(auth_server):
    for key in ("wrong", TOKEN + "x"):
        with _client(auth_server, api_key=key) as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.chat.completions.create(model="tiny", messages=HI, extra_body={"weights": {"helpfulness": 1}})
            assert e.value.status_code == 401
            assert e.value.response.json()["error"] == {
                "message": "invalid bearer token", "type": "invalid_request_error", "param": None,
                "code": "invalid_api_key",
            }
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
    status, body = _get(auth_server, "/v1/models")  # no Authorization header at all
    assert status == 401 and body["error"]["message"].startswith("missing Authorization header")
    assert _get(auth_server, "/health") == (200, {"status": "serving"})
    with _client(auth_server, api_key=TOKEN) as c:
        reply = c.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                          extra_body={"weights": {"helpfulness": 1}})
        assert reply.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def full_server(start_tiny_server, slow_tiny_loaded):
    """One slot, no queue, and forwards slow enough that a long generation is still running while the test acts."""
    from steer.server.engine import EngineConfig

    return start_tiny_server(_config(engine=EngineConfig(max_concurrent=1, max_queue=0, max_new_tokens=400)),
                             loaded=slow_tiny_loaded(0.03))


def _engine_idle(server):
    return server.running.engine.stats() == {"waiting": 0, "running": 0}


def test_overload_is_429_and_a_client_that_leaves_frees_its_slot(full_server, wait_until):
    long = dict(model="tiny", messages=HI, max_tokens=400, extra_body={"weights": {"helpfulness": 1}})
    with _client(full_server) as c:
        stream = c.chat.completions.create(**long, stream=True)
        next(iter(stream))  # admitted: the only slot is taken, and nothing may wait
        for streaming in (False, True):
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model="tiny", messages=HI, max_tokens=2, stream=streaming,
                                          extra_body={"weights": {"helpfulness": 1}})
            assert e.value.status_code == 429
            assert e.value.response.headers["retry-after"] == "1"
            error = e.value.response.json()["error"]
            assert "max_queue=0" in error["message"] and error["type"] == "rate_limit_error"
        started = time.monotonic()
        stream.close()  # the client leaves mid-stream
        wait_until(lambda: _engine_idle(full_server))
        assert time.monotonic() - started < 6  # 400 tokens at >= 30 ms each would take 12 s
    # A plain (non-streamed) call whose client gives up frees its slot too.
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 400, "weights": {"helpfulness": 1}}).encode()
    req = urllib.request.Request(_url(full_server, "/v1/chat/completions"), data=body,
                                 headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with pytest.raises(OSError):  # a socket timeout, however urllib wraps it
        urllib.request.urlopen(req, timeout=1.0)
    wait_until(lambda: _engine_idle(full_server))
    assert time.monotonic() - started < 7
    with _client(full_server) as c:
        reply = c.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                          extra_body={"weights": {"helpfulness": 1}})
        assert reply.usage.completion_tokens == 2


def test_drain_then_streams_end_with_their_final_chunk(start_tiny_server, slow_tiny_loaded, wait_until):
    from steer.server.engine import EngineConfig

    server = start_tiny_server(_config(engine=EngineConfig(max_new_tokens=400)), loaded=slow_tiny_loaded(0.02))
    long = dict(model="tiny", messages=HI, max_tokens=400, seed=0, extra_body={"weights": {"helpfulness": 1}})
    with _client(server) as c, ThreadPoolExecutor(1) as pool:
        stream = iter(c.chat.completions.create(**long, stream=True, stream_options={"include_usage": True}))
        first = next(stream)
        assert first.choices[0].delta.role == "assistant"
        stopping = asyncio.run_coroutine_threadsafe(server.running.stop(grace=1.5, drain=2.0), server.loop)
        wait_until(lambda: _get(server, "/health")[0] == 503, timeout=5)
        assert _get(server, "/health") == (503, {"status": "draining"})
        # Draining: health says 503 while calls are still answered.
        reply = c.chat.completions.create(model="tiny", messages=HI, max_tokens=2,
                                          extra_body={"weights": {"helpfulness": 1}})
        assert reply.usage.completion_tokens == 2
        # The long stream is not cut off: it ends with its finish chunk, usage and [DONE].
        rest = pool.submit(list, stream).result(30)
        finish, usage = rest[-2], rest[-1]
        assert finish.choices[0].finish_reason == "length"
        assert finish.steer["finish_reason"] == "cancelled"
        assert 0 < usage.usage.completion_tokens < 400
        assert stopping.result(30) is True
    with pytest.raises(OSError):  # the listener is closed
        urllib.request.urlopen(_url(server, "/health"), timeout=5)


def test_http_port_is_validated():
    from steer.server.app import ServerConfig

    with pytest.raises(ValueError, match="--http-port must be in"):
        ServerConfig(http_port=70000)


def test_serve_cli_serves_http_and_sigterm_drains_both_transports(tiny_model_dir, serve_process):
    """``python -m steer.serve --http-port``: one process, both transports, one shutdown on SIGTERM
    (uvicorn runs inside the gRPC server's loop and must not take the signal for itself)."""
    import signal

    proc, match, output = serve_process(
        ["-m", "steer.serve", "--model", str(tiny_model_dir), "--adapter", "none", "--scorer", "none",
         "--port", "0", "--http-port", "0", "--drain", "1.5", "--grace", "0.5", "--log-level", "WARNING"],
        r"on 127\.0\.0\.1:(\d+), OpenAI-compatible HTTP at http://127\.0\.0\.1:(\d+)/v1")
    base = f"http://127.0.0.1:{match.group(2)}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as reply:
        assert reply.status == 200
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        reply = c.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                          extra_body={"weights": {"creativity": 1}})
        assert reply.usage.completion_tokens == 3
    with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
        assert (steer_pb2_grpc.SteerStub(channel).Describe(pb.DescribeRequest(), timeout=10).model_id
                == str(tiny_model_dir))
    proc.send_signal(signal.SIGTERM)
    statuses = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and 503 not in statuses:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                statuses.append(reply.status)
        except urllib.error.HTTPError as e:
            statuses.append(e.code)
        time.sleep(0.05)
    assert 503 in statuses, statuses  # draining, not gone: the signal reached the shutdown sequence
    rc = proc.wait(timeout=30)
    rest = proc.stdout.read()
    assert rc == 0, "".join(output) + rest


def test_a_taken_http_port_fails_start_naming_the_flag(start_tiny_server):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"--http-port {port}: could not bind 127.0.0.1:{port}"):
            start_tiny_server(_config(http_port=port))


@pytest.mark.skipif(__import__("shutil").which("openssl") is None,
                    reason="openssl is needed to make a test certificate")
def test_tls_serves_https_with_the_grpc_certificate(start_tiny_server, tmp_path):
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = start_tiny_server(_config(tls_cert=str(cert), tls_key=str(key)))
    context = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://127.0.0.1:{server.running.http_port}/health", context=context,
                                timeout=10) as reply:
        assert (reply.status, json.loads(reply.read())) == (200, {"status": "serving"})
    with pytest.raises(OSError):  # plain HTTP to the TLS port fails
        urllib.request.urlopen(_url(server, "/health"), timeout=5).read()
