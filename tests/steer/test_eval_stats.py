"""Statistics of the steerability evaluation (steer/eval_stats.py) against hand-worked values."""

import math

import numpy as np
import pytest

from steer import eval_stats as st
from steer.eval_grid import direction_grid
from steer.objectives import DEFAULT_OBJECTIVES, Direction

# ----------------------------------------------------------------------------------- statistics


def test_rankdata_averages_ties():
    assert st.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert st.rankdata([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_matches_hand_computed_values_with_ties():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4): cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert st.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # ties on both sides: ranks (1.5, 1.5, 3.5, 3.5) and (1, 2.5, 2.5, 4): 3 / sqrt(4 * 4.5) = 1 / sqrt(2)
    assert st.spearman([1, 1, 2, 2], [1, 2, 2, 3]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_spearman_is_rank_based_and_undefined_for_constants():
    x = [0.1, 0.5, 2.0, 3.0, 7.5]
    assert st.spearman(x, [math.exp(v) for v in x]) == pytest.approx(1.0)  # monotone, far from linear
    assert st.spearman(x, [-v ** 3 for v in x]) == pytest.approx(-1.0)
    assert math.isnan(st.spearman(x, [4.0] * 5))
    with pytest.raises(ValueError, match="equally long"):
        st.spearman([1, 2], [1, 2, 3])


def test_mean_and_standard_error():
    mean, se = st.mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt((5 / 3) / 4))
    assert math.isnan(st.mean_and_se([3.0])[1])


# Two prompts, three weights each: prompt 0's score rises with the weight, prompt 1's falls.
TOY_GROUPS = [0, 0, 0, 1, 1, 1]
TOY_WEIGHTS = [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
TOY_SCORES = [1.0, 2.0, 3.0, 9.0, 8.0, 7.0]


def test_within_prompt_spearman_of_a_monotone_and_a_reversed_prompt_averages_to_zero():
    assert st.per_prompt_spearman(TOY_GROUPS, TOY_WEIGHTS, TOY_SCORES, 2).tolist() == pytest.approx([1.0, -1.0])
    # Two prompts that both follow the weight perfectly, at different levels: 1 within each prompt;
    # pooled, the prompts' levels dilute it (x ranks 1.5, 3.5, 5.5 twice against 1..6: 8 / sqrt(16 * 17.5)).
    levels = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0]
    assert st.per_prompt_spearman(TOY_GROUPS, TOY_WEIGHTS, levels, 2).tolist() == pytest.approx([1.0, 1.0])
    assert st.spearman(TOY_WEIGHTS, levels) == pytest.approx(8 / math.sqrt(280))
    result = st.within_prompt_spearman(TOY_GROUPS, TOY_WEIGHTS, TOY_SCORES, st.bootstrap_indices(2, 1000, seed=0))
    assert result.mean == pytest.approx(0.0, abs=1e-12)
    # A resample of two prompts has mean +1 (both prompt 0), -1 (both prompt 1) or 0; each pure
    # case has probability 1/4, far more than the 2.5% tails, so the interval is exactly [-1, 1].
    assert result.ci95 == (pytest.approx(-1.0), pytest.approx(1.0))
    assert (result.num_defined, result.num_flat) == (2, 0)


def test_bootstrap_interval_by_hand():
    # Resamples (0,0), (0,1), (1,1), (1,0) of per-prompt values (1, -1): means 1, 0, -1, 0; sorted
    # (-1, 0, 0, 1). numpy's linear percentile: 2.5% sits at position 0.075 -> -1 + 0.075 = -0.925.
    indices = np.array([[0, 0], [0, 1], [1, 1], [1, 0]])
    assert st.bootstrap_ci([1.0, -1.0], indices) == (pytest.approx(-0.925), pytest.approx(0.925))
    # An undefined prompt is left out of each resample's mean; a resample of only it is dropped.
    assert st.bootstrap_ci([0.5, float("nan")], indices) == (pytest.approx(0.5), pytest.approx(0.5))
    assert all(math.isnan(v) for v in st.bootstrap_ci([float("nan")] * 2, indices))


def test_mean_by_group_by_hand():
    # group a: 0.5, -0.5, 1.0 -> 1/3 over 3 prompts; group b: only an undefined prompt -> NaN, 0 prompts
    out = st.mean_by_group([0.5, float("nan"), -0.5, 1.0], ["a", "b", "a", "a"])
    assert list(out) == ["a", "b"]
    assert out["a"] == {"mean": pytest.approx(1 / 3), "num_prompts": 3}
    assert math.isnan(out["b"]["mean"]) and out["b"]["num_prompts"] == 0
    with pytest.raises(ValueError, match="3 values for 2 labels"):
        st.mean_by_group([0.1, 0.2, 0.3], ["a", "b"])


def test_bootstrap_indices_are_seeded():
    a, b = st.bootstrap_indices(52, 1000, seed=0), st.bootstrap_indices(52, 1000, seed=0)
    assert a.shape == (1000, 52) and a.min() >= 0 and a.max() <= 51
    assert np.array_equal(a, b) and not np.array_equal(a, st.bootstrap_indices(52, 1000, seed=1))


def test_flat_prompts_count_as_zero_and_constant_weights_as_undefined():
    # prompt 0: the score never moves -> 0 (counted as flat); prompt 1: every request had weight 0.5 -> undefined
    groups, weights, scores = [0, 0, 0, 1, 1], [0.0, 0.5, 1.0, 0.5, 0.5], [4.0, 4.0, 4.0, 1.0, 2.0]
    per = st.per_prompt_spearman(groups, weights, scores, 2)
    assert per[0] == 0.0 and math.isnan(per[1])
    result = st.within_prompt_spearman(groups, weights, scores, st.bootstrap_indices(2, 50, seed=0))
    assert result.mean == 0.0 and (result.num_defined, result.num_flat) == (1, 1)


def test_effect_size_by_hand():
    # weight 1: scores 3, 5 (mean 4, sample var 2); weight 0: 1, 2 (mean 1.5, var 0.5); the 0.5-weight
    # generation is in neither group. Pooled var = (1 * 2 + 1 * 0.5) / 2 = 1.25; d = 2.5 / sqrt(1.25).
    groups, weights, scores = [0, 0, 0, 1, 1], [1.0, 0.0, 0.5, 1.0, 0.0], [3.0, 1.0, 100.0, 5.0, 2.0]
    # resamples (0,0): 3 - 1 = 2; (1,1): 5 - 2 = 3; (0,1): 4 - 1.5 = 2.5 -> percentiles of (2, 2.5, 3)
    effect = st.effect_size(groups, weights, scores, np.array([[0, 0], [1, 1], [0, 1]]))
    assert (effect.n_w1, effect.n_w0) == (2, 2)
    assert (effect.mean_w1, effect.mean_w0, effect.diff) == (4.0, 1.5, 2.5)
    assert effect.sd_w1 == pytest.approx(math.sqrt(2)) and effect.sd_w0 == pytest.approx(math.sqrt(0.5))
    assert effect.pooled_sd == pytest.approx(math.sqrt(1.25))
    assert effect.cohens_d == pytest.approx(2.5 / math.sqrt(1.25))
    assert effect.diff_ci95 == (pytest.approx(2.0 + 0.05 * 0.5), pytest.approx(2.5 + 0.95 * 0.5))


def test_side_effect_matrix_shape_and_a_hand_checked_entry():
    grid = direction_grid("corners") + [Direction.uniform(DEFAULT_OBJECTIVES)]
    weights = np.array([d.weights for d in grid] * 2)  # (8, 3): the same four directions for two prompts
    scores = np.array([[4.0, 1.0, 9.0], [1.0, 5.0, 9.0], [2.0, 1.0, 9.0], [3.0, 2.0, 9.0]] * 2)  # (8, 3)
    matrix = st.side_effect_matrix([0, 0, 0, 0, 1, 1, 1, 1], weights, scores)
    assert matrix.shape == (3, 3)
    # realised helpfulness (4, 1, 2, 3) against the creativity weight (0, 1, 0, 1/3):
    # ranks (4, 1, 2, 3) and (1.5, 4, 1.5, 3): cov -3, variances 5 and 4.5 -> -3 / sqrt(22.5)
    assert matrix[0, 1] == pytest.approx(-3 / math.sqrt(22.5))
    assert matrix[1, 1] == pytest.approx(1.0)  # creativity (1, 5, 1, 2) ranks exactly like its weight
    assert (matrix[2] == 0.0).all()  # conciseness never moved: counted as 0 against every weight
