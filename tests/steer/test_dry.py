"""DRY loop penalty: match lengths against a brute-force reference and hand-worked cases, the logit
change, the transformers logits processor, the parameters' validation."""

import random

import pytest
import torch

from steer.dry import (
    MAX_MATCH,
    DryLogitsProcessor,
    apply_dry,
    dry_match_lengths,
    dry_penalties,
    has_repeated_run,
    sequence_breaker_ids,
)
from steer.errors import InvalidInput
from steer.generation import generate_batch
from steer.sampling import SamplingParams


def brute_force_lengths(history, breakers, max_match=MAX_MATCH):
    """For each token t: the largest L such that history[-L:] followed by t occurs earlier in history,
    with no breaker among the L matched tokens; searched by comparing slices."""
    n = len(history)
    out = {}
    for length in range(1, min(max_match, n - 1) + 1):
        suffix = history[n - length:]
        if any(tok in breakers for tok in suffix):
            break
        for start in range(0, n - length):  # an occurrence history[start:start+L] with a token after it
            if start + length < n and history[start:start + length] == suffix:
                t = history[start + length]
                out[t] = max(out.get(t, 0), length)
    return out


def test_hand_worked_match_and_penalty():
    # 1 2 3 4 1 2 3 -> "1 2 3" repeats; 4 would extend it: L = 3, penalty 0.8 * 1.75 ** (3 - 2) = 1.4
    assert dry_match_lengths([1, 2, 3, 4, 1, 2, 3]) == {4: 3}
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], 0.8, 1.75, 2) == pytest.approx({4: 1.4})
    # a repeat shorter than allowed_length costs nothing
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], 0.8, 1.75, 4) == {}
    assert dry_penalties([1, 2, 3, 4, 1, 2, 3], 0.0, 1.75, 2) == {}
    # a breaker (9) inside the repeat ends the match at it: L = 1
    assert dry_match_lengths([1, 9, 3, 4, 1, 9, 3], frozenset({9})) == {4: 1}
    # the last token a breaker: nothing is penalised
    assert dry_match_lengths([1, 9, 1, 9], frozenset({9})) == {}
    assert dry_match_lengths([]) == {} and dry_match_lengths([5]) == {}


def test_match_lengths_equal_brute_force_on_random_histories():
    rng = random.Random(0)
    for trial in range(300):
        vocab = rng.choice([2, 3, 5])
        history = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        breakers = frozenset({0}) if trial % 3 == 0 else frozenset()
        cap = rng.choice([MAX_MATCH, 3])
        assert dry_match_lengths(history, breakers, cap) == brute_force_lengths(history, breakers, cap), history


def test_repeated_runs():
    assert has_repeated_run([1, 2, 3, 1, 2, 3], 3)
    assert not has_repeated_run([1, 2, 3, 1, 2, 4], 3)
    assert has_repeated_run([5] * 17, 16) and not has_repeated_run([5] * 16, 16)  # overlapping runs count
    assert not has_repeated_run([], 16)
    with pytest.raises(ValueError, match="length"):
        has_repeated_run([1], 0)


def test_a_loop_costs_more_with_every_repeat():
    loop = [7, 8, 9] * 6  # "7 8 9" repeated: 7 extends a match that grows by 3 each cycle
    penalties = [dry_penalties(loop[:n], 0.8, 1.75, 2).get(loop[n], 0.0) for n in range(3, len(loop))]
    assert penalties[0] == 0.0  # 7 8 9 | 7: nothing repeats yet
    assert all(b > a for a, b in zip(penalties[1:], penalties[2:]))


def test_apply_dry_changes_only_the_rows_and_tokens_it_should():
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    on, off = SamplingParams(dry_multiplier=0.8), SamplingParams()
    histories = [[1, 2, 3, 4, 1, 2, 3], [1, 2, 3, 4, 1, 2, 3], [5, 6]]
    half = apply_dry(logits.bfloat16(), histories, [on, off, on], frozenset())  # another dtype: a float32 copy
    assert half.dtype == torch.float32
    assert half[0, 4] == pytest.approx(float(original.bfloat16()[0, 4]) - 1.4, abs=1e-6)
    assert apply_dry(logits, histories, [off, off, on], frozenset()) is logits  # nothing to do
    torch.testing.assert_close(logits, original)
    out = apply_dry(logits, histories, [on, off, on], frozenset())  # float32: in place
    expected = original.clone()
    expected[0, 4] -= 0.8 * 1.75
    assert out is logits
    torch.testing.assert_close(out, expected)


def test_logits_processor_reads_only_the_generated_part():
    params = SamplingParams(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1)
    proc = DryLogitsProcessor(params, prompt_length=3, breakers=frozenset())
    # the prompt 5 6 5 is ignored; generated 6 5 -> 5 extends nothing generated before, 6 then 5: none
    ids = torch.tensor([[5, 6, 5, 6, 5], [1, 1, 1, 4, 4]])
    scores = torch.zeros(2, 8)
    out = proc(ids, scores)
    # row 0 generated [6, 5]: last 5 has no earlier 5 in the generated part -> no penalty
    # row 1 generated [4, 4]: last 4 occurs at 0, followed by 4 -> L = 1 >= 1: penalty 1.0 * 2 ** 0
    expected = torch.zeros(2, 8)
    expected[1, 4] = -1.0
    torch.testing.assert_close(out, expected)


def test_breakers_are_tokens_whose_text_holds_one(tokenizer):
    ids = sequence_breaker_ids(tokenizer)
    assert sequence_breaker_ids(tokenizer) is ids  # cached
    for text in ("\n", ":", '"', "*", ":\n"):
        for t in tokenizer.encode(text, add_special_tokens=False):
            assert t in ids, text
    for t in tokenizer.encode(" hello world", add_special_tokens=False):
        assert t not in ids


@pytest.mark.parametrize("field,value", [("dry_multiplier", -0.1), ("dry_multiplier", float("nan")),
                                         ("dry_base", 0.5), ("dry_base", float("inf")),
                                         ("dry_allowed_length", 0), ("dry_allowed_length", 1.5),
                                         ("dry_multiplier", True)])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(InvalidInput, match=f"sampling.{field}"):
        SamplingParams(**{field: value})


def extends_repeat(ids, breakers, allowed=2):
    """Whether some token of ``ids`` continues a repeat of ``allowed`` or more tokens before it."""
    return any(brute_force_lengths(list(ids[:n]), breakers).get(ids[n], 0) >= allowed for n in range(len(ids)))


def test_generate_batch_with_dry_does_not_extend_repeats(looping_loaded):
    """Greedy decoding of a model that can say only a few tokens repeats itself; with a prohibitive
    DRY penalty no generated token extends a repeat of 2 or more earlier tokens."""
    m, tok = looping_loaded.model, looping_loaded.tokenizer
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three, slowly."}]]
    plain = generate_batch(m, tok, convs, [None, None], SamplingParams(max_new_tokens=30, temperature=0.0))
    guarded = generate_batch(m, tok, convs, [None, None],
                             SamplingParams(max_new_tokens=30, temperature=0.0, dry_multiplier=1e4))
    breakers = sequence_breaker_ids(tok)
    assert all(extends_repeat(g[0].token_ids, breakers) for g in plain)  # the check has something to catch
    assert not any(extends_repeat(g[0].token_ids, breakers) for g in guarded)
    assert all(len(g[0].token_ids) == 30 for g in guarded)
