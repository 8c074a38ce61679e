import pytest

from steer.conditioning import render_prompt
from steer.generation import generate_batch
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
