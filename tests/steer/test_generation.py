import pytest
import torch

from steer.conditioning import render_prompt
from steer.errors import InvalidInput
from steer.generation import EndRamp, _EndRampProcessor, generate_batch
from steer.objectives import Direction
from steer.sampling import SamplingParams

CONVS = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Say hi."}],
         [{"role": "user", "content": "Count to three, slowly please."}]]
DIRS = [Direction.corner("conciseness"), Direction.uniform(), None]


def test_shapes_determinism_and_seed(tiny_loaded):
    m, tok = tiny_loaded.model, tiny_loaded.tokenizer
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    a = generate_batch(m, tok, CONVS, DIRS, params, num_samples=2, batch_size=4, seed=3)
    b = generate_batch(m, tok, CONVS, DIRS, params, num_samples=2, batch_size=4, seed=3)
    c = generate_batch(m, tok, CONVS, DIRS, params, num_samples=2, batch_size=4, seed=4)
    assert [len(x) for x in a] == [2, 2, 2]
    assert a == b
    assert a != c
    assert all(len(g.token_ids) == 6 and not g.finished for x in a for g in x)


def test_greedy_batch_equals_single_prompt_greedy(tiny_loaded):
    """Left padding must not change what each prompt generates."""
    m, tok = tiny_loaded.model, tiny_loaded.tokenizer
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    together = generate_batch(m, tok, CONVS, DIRS, params, batch_size=3)
    alone = [generate_batch(m, tok, [c], [d], params)[0] for c, d in zip(CONVS, DIRS)]
    assert [x[0].token_ids for x in together] == [x[0].token_ids for x in alone]
    # and the prompt really carries the direction
    assert "conciseness*1.00" in render_prompt(tok, CONVS[0], DIRS[0])


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="2 conversations but 1 directions"):
        generate_batch(None, None, CONVS[:2], DIRS[:1], SamplingParams())


def test_end_ramp_bias_by_hand():
    ramp = EndRamp(start=4, slope=0.5)
    assert [ramp.bias(t) for t in (0, 4, 5, 8)] == [0.0, 0.0, 0.5, 2.0]
    at_cap = EndRamp.over_cap(320, 0.5, 10.0)  # from token 160, +10 by token 320
    assert (at_cap.start, at_cap.slope) == (160, 10.0 / 160) and at_cap.bias(320) == pytest.approx(10.0)
    assert EndRamp.over_cap(320, 0.5, 0.0) is None and EndRamp.over_cap(320, 1.0, 10.0) is None


@pytest.mark.parametrize("start, slope, field", [(-1, 1.0, "end_ramp.start"), (2.5, 1.0, "end_ramp.start"),
                                                 (3, 0.0, "end_ramp.slope"), (3, float("nan"), "end_ramp.slope")])
def test_end_ramp_refuses_bad_values(start, slope, field):
    with pytest.raises(InvalidInput) as e:
        EndRamp(start=start, slope=slope)
    assert e.value.field == field


def test_end_ramp_processor_raises_only_the_end_of_turn_logit():
    scores = torch.randn(2, 11)
    ids = torch.zeros(2, 3 + 7, dtype=torch.long)  # a 3-token prompt and 7 generated tokens
    out = _EndRampProcessor(EndRamp(start=4, slope=0.25), prompt_length=3, eos=5)(ids, scores.clone())
    expected = scores.clone()
    expected[:, 5] += 0.25 * (7 - 4)
    assert torch.equal(out, expected)


def test_end_ramp_ends_answers_right_after_start_and_leaves_the_prefix_alone(tiny_loaded):
    """A prohibitive ramp from token 5 on: the tiny random model, which never ends on its own within 20
    tokens, ends every answer at the 7th token (the first bonus comes after 6 generated tokens), and the
    tokens before it are the ones sampled without the ramp (same seed, same draws)."""
    m, tok = tiny_loaded.model, tiny_loaded.tokenizer
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    plain = generate_batch(m, tok, CONVS, DIRS, params, num_samples=2, batch_size=4, seed=5)
    ramped = generate_batch(m, tok, CONVS, DIRS, params, num_samples=2, batch_size=4, seed=5,
                            end_ramp=EndRamp(start=5, slope=1e4))
    assert not any(g.finished for row in plain for g in row)  # the check has something to catch
    for row_plain, row_ramped in zip(plain, ramped):
        for a, b in zip(row_plain, row_ramped):
            assert b.finished and len(b.token_ids) == 6
            assert b.token_ids == a.token_ids[:6]
