"""The shipped adapter steers: corner directions give clearly different answer lengths (slow: real model).

The full measurement is ``python -m steer.eval`` (README, "Evaluation"); this is the cheap check that
a regression in conditioning, adapter loading or the artifact itself shows up in ``make test-slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = 8  # held-out prompts, never seen in training
MAX_NEW_TOKENS = 256


def _mean_tokens(loaded, prompts, weights: dict[str, float], mixed: bool = False) -> float:
    """Mean answer tokens at ``weights``: CONDITIONED (the direction line), or with ``mixed`` MIXTURE
    (the plain prompt, the loaded mixture weighted by ``weights``)."""
    from steer.generation import generate_batch
    from steer.objectives import Direction
    from steer.sampling import SamplingParams

    d = Direction.from_weights(weights)
    rows = None
    if mixed:
        rows = [loaded.mixture.row([d.as_dict()[o] for o in loaded.mixture.objectives])] * len(prompts)
    gens = generate_batch(loaded.model, loaded.tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                          [None if mixed else d] * len(prompts),
                          SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, top_p=0.95),
                          batch_size=len(prompts), seed=0, mix_weights=rows)
    return float(np.mean([len(g[0].token_ids) for g in gens]))


def test_corner_directions_give_different_lengths():
    from steer.eval import default_prompts_path, load_prompts
    from steer.models import load_model

    loaded = load_model("default", adapter="default")
    prompts = [p.prompt for p in load_prompts(default_prompts_path("heldout"))[:PROMPTS]]
    concise = _mean_tokens(loaded, prompts, {"conciseness": 1.0})
    helpful = _mean_tokens(loaded, prompts, {"helpfulness": 1.0})
    creative = _mean_tokens(loaded, prompts, {"creativity": 1.0})
    # "Clearly different": the concise corner at most two thirds of either other corner's mean length.
    assert concise <= 2 / 3 * helpful, (concise, helpful)
    assert concise <= 2 / 3 * creative, (concise, creative)


def test_shipped_mixture_corners_give_different_lengths():
    """MIXTURE with the shipped per-objective adapters, as `make serve` offers it."""
    from steer.eval import default_prompts_path, load_prompts
    from steer.mixture import shipped_mixture_path
    from steer.models import load_model

    if shipped_mixture_path() is None:
        pytest.fail("the package ships no mixture (steer/adapters/mixture)")
    loaded = load_model("default", adapter="default", mixture="default")
    prompts = [p.prompt for p in load_prompts(default_prompts_path("heldout"))[:PROMPTS]]
    concise = _mean_tokens(loaded, prompts, {"conciseness": 1.0}, mixed=True)
    helpful = _mean_tokens(loaded, prompts, {"helpfulness": 1.0}, mixed=True)
    creative = _mean_tokens(loaded, prompts, {"creativity": 1.0}, mixed=True)
    assert concise <= 2 / 3 * helpful, (concise, helpful)
    assert concise <= 2 / 3 * creative, (concise, creative)
