"""Score and RERANK over a real gRPC server running the tiny model with the default scorer
(FLR for helpfulness and creativity, the length signal for conciseness)."""

import math
import threading

import grpc
import pytest
import torch

from steer.objectives import DEFAULT_OBJECTIVES
from steer.rewards.scorer import Scorer
from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

OBJECTIVES = ["helpfulness", "creativity", "conciseness"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scored_server(start_tiny_server, tmp_path_factory):
    from steer.server.app import ServerConfig
    from steer.server.engine import EngineConfig

    import steer.rewards.flr as flr
    from steer.rewards.calibration_set import calibration_conversations
    from steer.sampling import SamplingParams

    # The tiny model has no shipped calibration: the server computes it at start into this cache
    # (on the first six pairs of the built-in set, to keep the test fast).
    cache = tmp_path_factory.mktemp("steer-cache")
    conversations, responses = calibration_conversations()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_CACHE", str(cache))
        mp.setattr(flr, "calibration_conversations", lambda: (conversations[:6], responses[:6]))
        server = start_tiny_server(
            ServerConfig(port=0, scorer="default", engine=EngineConfig(max_new_tokens=64),
                         sampling_defaults=SamplingParams(max_new_tokens=16))
        )
    server.cache = cache
    return server


@pytest.fixture()
def stub(scored_server):
    with grpc.insecure_channel(scored_server.target) as channel:
        yield steer_pb2_grpc.SteerStub(channel)


@pytest.fixture(scope="module")
def local_scorer(scored_server, tiny_loaded):
    """The same scorer built here, reading the calibration the server stored."""
    from steer.rewards.build import build_scorer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEER_CACHE", str(scored_server.cache))
        mp.setattr("steer.rewards.flr.FLRScorer.calibrate",
                   lambda self: pytest.fail("the server's stored calibration was not found"))
        return build_scorer("default", tiny_loaded)


def test_describe_reports_the_scorer_and_rerank(stub):
    d = stub.Describe(pb.DescribeRequest(), timeout=10)
    assert d.scorer == "flr(helpfulness,creativity)+length(conciseness)"
    assert pb.STRATEGY_RERANK in d.strategies


def test_score_returns_raw_and_scaled_vectors_per_response(stub, local_scorer):
    responses = ["Paris is the capital of France.", "I like trains and the colour blue, and also soup."]
    reply = stub.Score(pb.ScoreRequest(prompt="What is the capital of France?", responses=responses,
                                       weights={"helpfulness": 3, "conciseness": 1}), timeout=60)
    assert list(reply.objectives) == OBJECTIVES
    assert dict(reply.direction) == pytest.approx({"helpfulness": 0.75, "creativity": 0.0, "conciseness": 0.25})
    assert len(reply.scores) == 2
    expected = local_scorer.rewards([[{"role": "user", "content": "What is the capital of France?"}]] * 2, responses)
    for i, vector in enumerate(reply.scores):
        assert dict(vector.raw_rewards) == pytest.approx(expected.row(i, scaled=False), abs=1e-4)
        assert dict(vector.rewards) == pytest.approx(expected.row(i), abs=1e-4)
        assert vector.weighted_reward == pytest.approx(
            0.75 * vector.rewards["helpfulness"] + 0.25 * vector.rewards["conciseness"], abs=1e-5)
    # The length signal's raw value is -ln(1 + tokens).
    assert reply.scores[0].raw_rewards["conciseness"] > reply.scores[1].raw_rewards["conciseness"]


def test_score_without_weights_leaves_weighted_reward_unset(stub):
    reply = stub.Score(pb.ScoreRequest(messages=[pb.Message(role="user", content="Hi")], responses=["Hello!"]),
                       timeout=60)
    assert not reply.direction and reply.scores[0].weighted_reward == 0.0
    assert set(reply.scores[0].rewards) == set(OBJECTIVES)


SCORE_INVALID = [
    ("no responses", pb.ScoreRequest(prompt="hi"), "responses: is empty"),
    ("blank response", pb.ScoreRequest(prompt="hi", responses=["ok", "  "]), "responses[1]: is empty"),
    ("too many responses", pb.ScoreRequest(prompt="hi", responses=["x"] * 65), "responses: at most 64"),
    ("no prompt", pb.ScoreRequest(responses=["x"]), "prompt: is empty"),
    ("prompt and messages", pb.ScoreRequest(prompt="hi", messages=[pb.Message(role="user", content="x")],
                                            responses=["x"]), "prompt: set either"),
    ("ends with assistant",
     pb.ScoreRequest(messages=[pb.Message(role="user", content="x"), pb.Message(role="assistant", content="y")],
                     responses=["x"]), "messages[1].role"),
    ("unknown objective", pb.ScoreRequest(prompt="hi", responses=["x"], weights={"humour": 1}),
     "weights[humour]: unknown objective"),
    ("negative weight", pb.ScoreRequest(prompt="hi", responses=["x"], weights={"creativity": -1}),
     "weights[creativity]: must be finite and >= 0"),
]


@pytest.mark.parametrize("case, req, message", SCORE_INVALID, ids=[c[0] for c in SCORE_INVALID])
def test_score_invalid_input_names_the_field(stub, case, req, message):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert message in e.value.details()


def rerank_request(**kw):
    sampling = pb.SamplingParams(max_new_tokens=kw.pop("max_new_tokens", 10), temperature=1.0, seed=kw.pop("seed", 11))
    return pb.GenerateRequest(prompt="Name a colour.",
                              weights={"helpfulness": 0.5, "creativity": 0.2, "conciseness": 0.3},
                              strategy=pb.STRATEGY_RERANK, sampling=sampling, **kw)


def test_rerank_returns_the_candidate_with_the_highest_weighted_reward(stub):
    reply = stub.Generate(rerank_request(candidates=4, return_candidates=True), timeout=120)
    assert reply.strategy == pb.STRATEGY_RERANK
    assert len(reply.candidates) == 4
    weighted = [c.weighted_reward for c in reply.candidates]
    assert weighted == sorted(weighted, reverse=True)  # best first
    assert reply.text == reply.candidates[0].text
    assert dict(reply.rewards) == pytest.approx(dict(reply.candidates[0].rewards))
    assert len({c.text for c in reply.candidates}) > 1  # seeds seed+i give different samples
    # Independently: Score every candidate; the returned text has the highest v . r.
    texts = [c.text for c in reply.candidates]
    assert all(t.strip() for t in texts)
    scored = stub.Score(pb.ScoreRequest(prompt="Name a colour.", responses=texts, weights=dict(reply.direction)),
                        timeout=60)
    by_score = [s.weighted_reward for s in scored.scores]
    assert by_score == pytest.approx(weighted, abs=1e-4)
    assert max(range(4), key=lambda i: by_score[i]) == 0
    for c, s in zip(reply.candidates, scored.scores):
        assert dict(c.rewards) == pytest.approx(dict(s.rewards), abs=1e-4)
    # Usage counts every candidate's tokens; each candidate carries its finish reason.
    assert (reply.usage.completion_tokens >= 4
            and all(c.finish_reason != pb.FINISH_REASON_UNSPECIFIED for c in reply.candidates))


def test_rerank_is_reproducible_with_a_seed_and_defaults_to_four(stub):
    a = stub.Generate(rerank_request(return_candidates=True), timeout=120)
    b = stub.Generate(rerank_request(return_candidates=True), timeout=120)
    assert len(a.candidates) == 4
    assert a.text == b.text and [c.text for c in a.candidates] == [c.text for c in b.candidates]
    plain = stub.Generate(rerank_request(), timeout=120)
    assert plain.text == a.text and not plain.candidates  # candidates only when asked for


def test_rerank_candidates_run_as_one_batch(stub, scored_server):
    engine = scored_server.running.engine
    before = engine.steps
    reply = stub.Generate(rerank_request(candidates=4, max_new_tokens=8, return_candidates=True), timeout=120)
    steps = engine.steps - before
    longest = max(len(c.text) for c in reply.candidates)
    assert longest > 0
    # Four sequential generations would take >= 4 x (tokens of each) steps; one batch takes about 8.
    assert steps <= 8 + 2, steps


def test_rewards_are_measured_when_asked(stub, local_scorer):
    req = pb.GenerateRequest(prompt="Name a colour.", weights={"helpfulness": 1}, return_rewards=True,
                             sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0))
    reply = stub.Generate(req, timeout=60)
    assert reply.strategy == pb.STRATEGY_CONDITIONED
    expected = local_scorer.rewards([[{"role": "user", "content": "Name a colour."}]], [reply.text]).row(0)
    assert dict(reply.rewards) == pytest.approx(expected, abs=1e-4)
    chunks = list(stub.GenerateStream(req, timeout=60))
    assert dict(chunks[-1].rewards) == pytest.approx(expected, abs=1e-4)
    assert all(not c.rewards for c in chunks[:-1])


def test_rewards_cost_nothing_unless_asked(stub, monkeypatch):
    from steer.rewards.service import ScoringService

    async def refuse(*args, **kwargs):
        raise AssertionError("scored a request that did not ask for rewards")

    monkeypatch.setattr(ScoringService, "rewards_for", refuse)
    req = pb.GenerateRequest(prompt="Name a colour.", weights={"helpfulness": 1},
                             sampling=pb.SamplingParams(max_new_tokens=8, temperature=0.0))
    reply = stub.Generate(req, timeout=60)
    assert reply.text and not reply.rewards
    chunks = list(stub.GenerateStream(req, timeout=60))
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED and not any(c.rewards for c in chunks)


def test_return_rewards_without_a_scorer_is_a_failed_precondition(start_tiny_server):
    from steer.server.app import ServerConfig

    server = start_tiny_server(ServerConfig(port=0, scorer="none"))
    with grpc.insecure_channel(server.target) as channel:
        bare = steer_pb2_grpc.SteerStub(channel)
        req = pb.GenerateRequest(prompt="hi", weights={"helpfulness": 1}, sampling=pb.SamplingParams(max_new_tokens=2))
        assert bare.Generate(req, timeout=60).text is not None  # fine without the flag
        req.return_rewards = True
        with pytest.raises(grpc.RpcError) as err:
            bare.Generate(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "return_rewards" in err.value.details()


def test_rerank_does_not_stream_and_limits_candidates(stub):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GenerateStream(rerank_request(), timeout=60))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "use Generate" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(rerank_request(candidates=17), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates: must be <= 16" in e.value.details()


def test_rewards_are_finite(stub):
    reply = stub.Generate(rerank_request(candidates=2, return_candidates=True), timeout=120)
    assert all(math.isfinite(v) for c in reply.candidates for v in c.rewards.values())


def test_a_response_longer_than_the_scorer_context_still_scores(stub):
    """FLR keeps the end of an over-long conversation (the tiny model's context is 512 tokens)."""
    reply = stub.Score(pb.ScoreRequest(prompt="hi", responses=["word " * 600]), timeout=60)
    assert all(math.isfinite(v) for v in reply.scores[0].raw_rewards.values())


class GatedScorer(Scorer):
    """A scorer over the default objectives whose calls wait for ``gate`` (and are counted)."""

    objectives = tuple(DEFAULT_OBJECTIVES)

    def __init__(self):
        self.gate, self.entered, self.calls = threading.Event(), threading.Event(), 0
        self.gate.set()

    def raw_scores(self, conversations, responses):
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(60), "gate never opened"
        return torch.tensor([[float(len(r))] * len(self.objectives) for r in responses])  # (n, k)

    def describe(self):
        return "gated"


@pytest.fixture(scope="module")
def gated_server(start_tiny_server):
    from steer.server.app import ServerConfig

    from steer.rewards.service import ScoringConfig

    scorer = GatedScorer()
    server = start_tiny_server(ServerConfig(port=0, scoring=ScoringConfig(max_pending_responses=70, chunk_responses=4)),
                               scorer=scorer)
    server.scorer = scorer
    return server


def score_request(n):
    return pb.ScoreRequest(prompt="hi", responses=[f"answer {i}" for i in range(n)])


@pytest.fixture()
def gated_stub(gated_server):
    """A stub to the gated server, with its scorer's gate closed and its counters zeroed."""
    scorer = gated_server.scorer
    scorer.gate.clear()
    scorer.entered.clear()
    scorer.calls = 0
    with grpc.insecure_channel(gated_server.target) as channel:
        yield steer_pb2_grpc.SteerStub(channel)


def test_score_admission_and_cancellation(gated_server, gated_stub, wait_until):
    """A Score beyond max_pending_responses is refused at once; cancelling a running Score stops its
    scoring after the chunk in progress and frees its admission."""
    scorer, scoring, stub = gated_server.scorer, gated_server.running.scoring, gated_stub
    abandoned = stub.Score.future(score_request(64), timeout=60)
    assert scorer.entered.wait(30)
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(score_request(7), timeout=10)  # 64 + 7 > 70
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_pending_responses=70" in e.value.details()
    abandoned.cancel()
    wait_until(lambda: gated_server.running.metrics.registry.get_sample_value(
        "steer_requests_total", {"method": "/steer.v1.Steer/Score", "code": "CANCELLED"}) == 1, timeout=30)
    scorer.gate.set()
    wait_until(lambda: scoring.pending_responses == 0, timeout=30)
    assert scorer.calls == 1  # 1 of 16 chunks: the one running when the client left
    reply = stub.Score(score_request(6), timeout=30)
    assert [s.raw_rewards["helpfulness"] for s in reply.scores] == [len(f"answer {i}") for i in range(6)]


def test_score_past_its_deadline_stops_scoring(gated_server, gated_stub, wait_until):
    scorer, scoring, stub = gated_server.scorer, gated_server.running.scoring, gated_stub
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(score_request(40), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's deadline comes from the grpc-timeout header, counted from when it received the
    # call: a little after the client's. Open the gate only once the server has ended the call
    # too, or the remaining (instant) chunks could all run inside that gap.
    wait_until(lambda: gated_server.running.metrics.registry.get_sample_value(
        "steer_requests_total", {"method": "/steer.v1.Steer/Score", "code": "DEADLINE_EXCEEDED"}) == 1, timeout=30)
    scorer.gate.set()
    wait_until(lambda: scoring.pending_responses == 0, timeout=30)
    assert scorer.calls == 1


def test_score_text_limits(gated_server, tokenizer):
    from steer.chat_tokens import text_byte_limit

    limit = text_byte_limit(tokenizer, 512)
    with grpc.insecure_channel(gated_server.target) as channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        for req, message in (
            (pb.ScoreRequest(prompt="x" * (limit + 1), responses=["ok"]), f"prompt: is {limit + 1} bytes of text"),
            (pb.ScoreRequest(prompt="hi", responses=["ok", "y" * (limit + 1)]),
             f"responses[1]: is {limit + 1} bytes of text"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.Score(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(message)
