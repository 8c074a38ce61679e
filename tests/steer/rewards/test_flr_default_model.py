"""FLR on the real default model (slow: SmolLM2-135M forwards on CPU).

Same check as `python -m steer.rewards.flr_ranking`."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_loaded():
    from steer.models import load_model

    return load_model("default")


def test_flr_ranks_on_topic_answers_above_off_topic_ones(default_loaded):
    from steer.rewards.flr import FLRConfig, FLRScorer
    from steer.rewards.flr_ranking import CASES, rank_cases

    scorer = FLRScorer(default_loaded.model, default_loaded.tokenizer,
                       FLRConfig(objectives=("helpfulness",), calibration="none"))
    results = rank_cases(scorer)
    correct = sum(r["correct"] for r in results)
    print(f"FLR helpfulness ranked {correct}/{len(CASES)} on-topic answers first")
    assert correct >= 6, results  # measured 7/8 when written


def test_shipped_calibration_matches_the_default_model(default_loaded):
    """Every key of the shipped file (model fingerprint included) matches today's scorer, so
    `--scorer default` starts without recalibrating."""
    from steer.rewards.calibrate import SHIPPED
    from steer.rewards.calibration import read_calibration_file
    from steer.rewards.flr import FLRConfig, FLRScorer

    scorer = FLRScorer(default_loaded.model, default_loaded.tokenizer,
                       FLRConfig(objectives=("helpfulness", "creativity", "conciseness"), calibration="none"))
    _, stored = read_calibration_file(SHIPPED)
    assert stored == scorer.calibration_keys()
    auto = FLRScorer(default_loaded.model, default_loaded.tokenizer, FLRConfig(calibration="auto"))
    assert auto.calibration.source == str(SHIPPED)
