import math

import pytest
import torch

from steer.errors import InvalidInput
from steer.sampling import SamplingParams, StopStringDetokenizer, filter_logits, sample_token


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": math.nan}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.01}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"seed": -1}, "sampling.seed"),
        ({"stop": ("",)}, "sampling.stop[0]"),
        ({"stop": tuple("abcdefghi")}, "sampling.stop"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidInput) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_overrides_ignore_none():
    p = SamplingParams(max_new_tokens=10).with_overrides(max_new_tokens=None, temperature=0.0)
    assert (p.max_new_tokens, p.temperature, p.greedy) == (10, 0.0, True)


def test_top_k_and_top_p_keep_the_hand_computed_sets():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(filter_logits(logits, 1.0, 2, 1.0))
    assert kept.tolist() == [True, True, False, False, False]
    # cumulative mass before each token: 0, .5, .7, .85, .95 -> top_p=0.8 keeps the first three
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.8))
    assert kept.tolist() == [True, True, True, False, False]
    # top_p smaller than the best token's mass still keeps the best token
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.1))
    assert kept.tolist() == [True, False, False, False, False]


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(100)
    p = SamplingParams(temperature=1.0, top_k=3, seed=42)
    a = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    assert a == b
    assert set(a) <= set(torch.topk(logits, 3).indices.tolist())
    assert sample_token(logits, SamplingParams(temperature=0.0), p.make_generator()) == int(logits.argmax())


class CharTokenizer:
    """One token per character; id 0 decodes to nothing (a special token)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(detok, text):
    return [detok.push(ord(c)) for c in text]


def test_detokenizer_holds_back_possible_stop_prefix_and_cuts_at_stop():
    d = StopStringDetokenizer(CharTokenizer(), stop=("END",))
    deltas = feed(d, "abcEN")
    assert "".join(deltas) == "abc"  # "EN" could start "END"
    deltas = feed(d, "Dxyz")
    assert d.stopped and d.text == "abc"
    assert "".join(deltas) == ""


def test_detokenizer_releases_false_alarm_and_flushes():
    d = StopStringDetokenizer(CharTokenizer(), stop=("END",))
    out = "".join(feed(d, "aEbENc")) + d.flush()
    assert out == "aEbENc" and not d.stopped
    plain = StopStringDetokenizer(CharTokenizer())
    assert feed(plain, "hi") == ["h", "i"]
