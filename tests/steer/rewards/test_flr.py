"""FLR against an independent computation: a full-model forward, plain log_softmax and gather."""

import pytest
import torch

from steer.errors import InvalidInput
from steer.rewards.calibration import Calibration
from steer.rewards.flr import FLRConfig, FLRScorer
from steer.rewards.followups import FollowUps

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "helpfulness": FollowUps(
        positive=("Thanks, that answers my question perfectly.", "Great, exactly what I needed."),
        negative=("You misunderstood what I asked.", "That is wrong."),
    ),
    "creativity": FollowUps(
        positive=("What an original idea!", "I love how imaginative that is."),
        negative=("That's pretty generic and boring.", "So predictable."),
    ),
}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
RESPONSES = ["The capital of France is Paris.", "Bananas are yellow.", "Paris, of course! It has been the capital for centuries and is home to the Louvre."]


def scorer(loaded, **overrides) -> FLRScorer:
    config = FLRConfig(**{"objectives": ("helpfulness", "creativity"), "followups": SMALL, "calibration": "none", **overrides})
    return FLRScorer(loaded.model, loaded.tokenizer, config)


def hand_loglik(model, tokenizer, conversation, response, followup) -> float:
    """Mean log p of the follow-up's tokens, from the whole rendered conversation in one forward."""
    messages = conversation + [{"role": "assistant", "content": response}, {"role": "user", "content": followup}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(text[: text.rfind(followup)], add_special_tokens=False)["input_ids"])
    target = tokenizer(followup, add_special_tokens=False)["input_ids"]
    # The whole-text tokenisation splits exactly at the follow-up: the definition FLR relies on.
    assert ids[start: start + len(target)] == target
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V), the model's own LM head
    logp = torch.log_softmax(logits, dim=-1)
    values = [logp[t - 1, ids[t]] for t in range(start, start + len(target))]
    return float(torch.stack(values).mean())


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "padded"])
def test_flr_equals_hand_computed_loglik_difference(tiny_loaded, prefix_cache):
    s = scorer(tiny_loaded, prefix_cache=prefix_cache)
    got = s.rewards([CONVERSATION] * 2, RESPONSES[:2])
    for i, response in enumerate(RESPONSES[:2]):
        for o, name in enumerate(("helpfulness", "creativity")):
            sets = SMALL[name]
            pos = [hand_loglik(tiny_loaded.model, tiny_loaded.tokenizer, CONVERSATION, response, f) for f in sets.positive]
            neg = [hand_loglik(tiny_loaded.model, tiny_loaded.tokenizer, CONVERSATION, response, f) for f in sets.negative]
            expected = sum(pos) / len(pos) - sum(neg) / len(neg)
            assert got.raw[i, o].item() == pytest.approx(expected, abs=2e-4)
    assert torch.equal(got.raw, got.scaled)  # calibration "none": no scaling
    assert got.raw[0].ne(got.raw[1]).all()  # the response changes the follow-ups' likelihood


def test_prefix_cache_and_padded_paths_agree_across_batch_boundaries(tiny_loaded):
    """Batch size 3 splits the 8 follow-ups unevenly; responses differ in length (padding)."""
    conversations = [CONVERSATION, [{"role": "user", "content": "Hi"}], CONVERSATION]
    cached = scorer(tiny_loaded, batch_size=3).followup_loglik(conversations, RESPONSES)
    padded = scorer(tiny_loaded, batch_size=3, prefix_cache=False).followup_loglik(conversations, RESPONSES)
    assert cached.shape == (3, 8)
    torch.testing.assert_close(cached, padded, atol=2e-4, rtol=0)
    assert torch.isfinite(cached).all() and (cached < 0).all()


def test_calibration_scales_each_objective(tiny_loaded):
    s = scorer(tiny_loaded)
    s.calibration = Calibration({"helpfulness": (0.5, 2.0), "creativity": (-1.0, 0.5)})
    r = s.rewards([CONVERSATION], RESPONSES[:1])
    assert r.scaled[0, 0].item() == pytest.approx((r.raw[0, 0].item() - 0.5) / 2.0, abs=1e-6)
    assert r.scaled[0, 1].item() == pytest.approx((r.raw[0, 1].item() + 1.0) / 0.5, abs=1e-6)
    assert s.describe() == "flr(helpfulness,creativity)"


def small_calibration_set(monkeypatch, pairs=6):
    """The first prompts of the built-in set only (the statistics' meaning is tested, not their size)."""
    import steer.rewards.flr as flr
    from steer.rewards.calibration_set import calibration_conversations

    conversations, responses = calibration_conversations()
    monkeypatch.setattr(flr, "calibration_conversations", lambda: (conversations[:pairs], responses[:pairs]))
    return conversations[:pairs], responses[:pairs]


def test_auto_calibration_is_computed_once_and_reused(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    conversations, responses = small_calibration_set(monkeypatch)
    first = scorer(tiny_loaded, objectives=("helpfulness",), calibration="auto")
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1
    mean, std = first.calibration.stats["helpfulness"]
    assert std > 0
    # The statistics are those of the calibration set's raw rewards.
    raw = first.raw_scores(conversations, responses)[:, 0].double()
    assert mean == pytest.approx(float(raw.mean()), abs=1e-6)
    assert std == pytest.approx(float(raw.std(unbiased=False)), abs=1e-6)
    # Found again by key: loading does not compute (raw_scores would be called otherwise).
    monkeypatch.setattr(FLRScorer, "calibrate", lambda self: pytest.fail("recomputed a stored calibration"))
    again = scorer(tiny_loaded, objectives=("helpfulness",), calibration="auto")
    assert again.calibration.stats["helpfulness"] == pytest.approx((mean, std))
    # An explicit file for other follow-ups is refused, naming the fix.
    other = {"helpfulness": FollowUps(positive=("Nice.",), negative=("Bad.",))}
    with pytest.raises(InvalidInput, match="calibration: .*steer.rewards.calibrate"):
        scorer(tiny_loaded, objectives=("helpfulness",), followups=other, calibration=str(files[0]))


def test_calibration_keys_depend_on_followups_and_model(tiny_loaded, tokenizer):
    from steer.models import build_tiny_model

    a = scorer(tiny_loaded).calibration_keys()
    changed = dict(SMALL, creativity=FollowUps(positive=("Fresh!",), negative=("Stale.",)))
    b = scorer(tiny_loaded, followups=changed).calibration_keys()
    assert a["helpfulness"] == b["helpfulness"] and a["creativity"] != b["creativity"]
    other_model = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, seed=1)
    c = FLRScorer(other_model, tokenizer, FLRConfig(followups=SMALL, calibration="none")).calibration_keys()
    assert c["helpfulness"] != a["helpfulness"]


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "padded"])
def test_a_conversation_longer_than_the_context_keeps_its_end(tiny_loaded, prefix_cache):
    """Tiny model context: 512 tokens. Two responses that differ only in a start far beyond the
    context score identically: the prefix is cut from the left to leave room for the follow-ups."""
    s = scorer(tiny_loaded, prefix_cache=prefix_cache)
    tail = "word " * 600
    ll = s.followup_loglik([CONVERSATION] * 3, ["The start differs. " + tail, "Another beginning! " + tail, "short"])
    torch.testing.assert_close(ll[0], ll[1])
    assert torch.isfinite(ll).all() and not torch.allclose(ll[0], ll[2])


def test_bad_inputs_name_the_field(tiny_loaded):
    s = scorer(tiny_loaded)
    with pytest.raises(InvalidInput, match="responses: 1 responses for 2 conversations"):
        s.rewards([CONVERSATION] * 2, ["a"])
    with pytest.raises(InvalidInput, match=r"conversations\[0\]: must end with the user's turn"):
        s.rewards([[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]], ["a"])
    with pytest.raises(InvalidInput, match=r"responses\[0\]: must be a string"):
        s.rewards([CONVERSATION], [None])
    with pytest.raises(InvalidInput, match=r"flr.objectives: no follow-ups for \['humour'\]"):
        FLRConfig(objectives=("humour",))
