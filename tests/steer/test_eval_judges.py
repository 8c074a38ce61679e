"""The held-out judge's follow-ups (steer/eval_judges.py judges with them): disjoint from the training sets
and a valid FLR configuration."""

import re

from steer.rewards.followups import BUILTIN_FOLLOWUPS
from steer.rewards.heldout_followups import HELDOUT_FOLLOWUPS

# ------------------------------------------------------------------------- held-out follow-ups


def _sentences(text):
    return {" ".join(s.casefold().split()) for s in re.split(r"(?<=[.!?])\s+|,\s*", text) if s.strip(" .!?")}


def _ngrams(text, n=4):
    words = re.findall(r"[a-z']+", text.casefold())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_heldout_followups_share_no_sentence_with_the_training_sets():
    assert set(HELDOUT_FOLLOWUPS) == {"helpfulness", "creativity"}  # conciseness is judged by token count
    training = [f for sets in BUILTIN_FOLLOWUPS.values() for f in (*sets.positive, *sets.negative)]
    train_sentences = set().union(*map(_sentences, training))
    train_ngrams = set().union(*map(_ngrams, training))
    for objective, sets in HELDOUT_FOLLOWUPS.items():
        assert len(sets.positive) >= 8 and len(sets.negative) >= 8, objective
        held = [*sets.positive, *sets.negative]
        assert len(set(held)) == len(held), objective
        for f in held:
            assert not _sentences(f) & train_sentences, (objective, f)  # no sentence or clause in common
            assert not _ngrams(f) & train_ngrams, (objective, f)  # and no run of four words


def test_heldout_followups_are_a_valid_flr_config():
    from steer.rewards.flr import FLRConfig

    config = FLRConfig(objectives=("helpfulness", "creativity"), followups=HELDOUT_FOLLOWUPS, calibration="none")
    assert config.followups_for("creativity") is HELDOUT_FOLLOWUPS["creativity"]

