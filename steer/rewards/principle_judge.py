"""A principle judged by the model: FLR with follow-ups that say the principle was met, or not.

RLAIF labelling (``python -m steer.train label``) and Inverse Constitutional AI
(``python -m steer.train icai``) both need the model's judgement of how well a response satisfies a
plain-language principle ("Select the shorter, more concise response."). This module asks it the
way FLR (:mod:`steer.rewards.flr`) asks about an objective: append a user follow-up to the
dialogue and measure the mean token log-likelihood the model gives it. A principle carries
*positive* follow-ups (a user saying the principle was met: "Thanks, that was short and to the
point.") and *negative* ones (saying it was not: "That was long-winded and wordy.")::

    score(c, y; p) = mean_{f in F+(p)} ll(f | c, y) - mean_{f in F-(p)} ll(f | c, y)

which is exactly FLR's raw reward with the principle as the objective, so :class:`PrincipleJudge`
*is* an :class:`~steer.rewards.flr.FLRScorer` (prefix cache, batching, fused log-probs) whose
objectives are the principles; nothing here computes a log-likelihood itself. Scores are raw
(uncalibrated nats): what is compared is the score of two responses to the same prompt under the
same principle, so the per-principle offset of the follow-ups cancels.

Follow-ups are written from a principle's ``statement`` ("short and to the point") and
``opposite`` ("long-winded and wordy"; default ``"not " + statement``) through templates
(:data:`DEFAULT_TEMPLATES`), or given whole. Naming the opposite quality instead of negating the
statement matters for a small model: "That was not short." shares its content word with "That
was short.", and a model that reads words more than negations moves both likelihoods together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from steer.errors import InvalidInput
from steer.rewards.flr import FLRConfig, FLRScorer
from steer.rewards.followups import FollowUps

Conversation = Sequence[Mapping[str, str]]

# {statement} / {opposite} are filled in per principle. Two phrasings per side, so one wording's
# quirks weigh half.
DEFAULT_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "positive": ("Thanks, that was {statement}.", "Great, your answer was {statement}."),
    "negative": ("That was {opposite}.", "Hmm, your answer was {opposite}."),
}
TEMPLATE_FIELDS = ("statement", "opposite")


@dataclass(frozen=True)
class JudgedPrinciple:
    """A principle and the follow-ups that judge it."""

    id: str  # short name: score columns, plots (letters, digits, '_' and '-')
    text: str  # the principle as a person reads it ("Select the shorter, more concise response.")
    positive: tuple[str, ...]  # follow-ups saying it was met
    negative: tuple[str, ...]  # follow-ups saying it was not
    statement: str | None = None  # what the templates were filled with, when they were used
    opposite: str | None = None
    source: str = ""  # file:line it was read from

    def __post_init__(self):
        object.__setattr__(self, "positive", tuple(self.positive))
        object.__setattr__(self, "negative", tuple(self.negative))
        FollowUps(self.positive, self.negative)  # non-empty, no surrounding spaces (ValueError otherwise)

    @classmethod
    def from_statement(cls, id: str, text: str, statement: str, opposite: str | None = None,
                       templates: Mapping[str, Sequence[str]] = DEFAULT_TEMPLATES, source: str = "") -> JudgedPrinciple:
        """Follow-ups from ``templates`` with ``{statement}`` and ``{opposite}`` (default ``not <statement>``)
        filled in."""
        opposite = opposite if opposite is not None else f"not {statement}"
        fill = {"statement": statement, "opposite": opposite}
        return cls(id, text, tuple(t.format(**fill) for t in templates["positive"]),
                   tuple(t.format(**fill) for t in templates["negative"]), statement, opposite, source)

    def to_dict(self) -> dict:
        """The fields a principles file holds for it (follow-ups written out, so the file is self-contained)."""
        out = {"id": self.id, "text": self.text}
        if self.statement is not None:
            out["statement"] = self.statement
            out["opposite"] = self.opposite
        out["positive"] = list(self.positive)
        out["negative"] = list(self.negative)
        return out


def check_templates(templates: Mapping[str, Sequence[str]], field: str = "followups") -> None:
    """Each side is a non-empty list of texts whose only ``{...}`` fields are statement and opposite."""
    import string

    for side in ("positive", "negative"):
        items = templates.get(side)
        if not isinstance(items, (list, tuple)) or not items:
            raise InvalidInput(f"{field}.{side}", "must be a non-empty list of follow-up templates "
                                                  "such as 'Thanks, that was {statement}.'")
        for i, t in enumerate(items):
            if not isinstance(t, str) or not t.strip() or t != t.strip():
                raise InvalidInput(f"{field}.{side}[{i}]", f"must be text without surrounding spaces, got {t!r}")
            try:
                names = [name for _, name, _, _ in string.Formatter().parse(t) if name is not None]
            except ValueError as e:
                raise InvalidInput(f"{field}.{side}[{i}]",
                                   f"is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
            unknown = [n for n in names if n not in TEMPLATE_FIELDS]
            if unknown:
                raise InvalidInput(f"{field}.{side}[{i}]",
                                   f"uses {{{unknown[0]}}}; a template may use only {{statement}} and {{opposite}}")


class PrincipleJudge:
    """Per-principle scores of responses: FLR whose objectives are the principles (module docstring).

    ``scores(conversations, responses)`` is ``(n, P)``, column ``j`` for ``principles[j]``."""

    def __init__(self, model, tokenizer, principles: Sequence[JudgedPrinciple], *, batch_size: int = 32,
                 prefix_batch: int = 8, progress: bool = False, context_length: int | None = None):
        if not principles:
            raise InvalidInput("principles", "no principles to judge by")
        ids = [p.id for p in principles]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise InvalidInput("principles", f"duplicate ids {dupes}")
        self.principles = tuple(principles)
        # FLR objective names must be identifiers; principle ids may carry '-', so columns get their own names.
        followups = {f"p{j}": FollowUps(p.positive, p.negative) for j, p in enumerate(principles)}
        config = FLRConfig(objectives=tuple(followups), followups=followups, batch_size=batch_size,
                           prefix_batch=prefix_batch, progress=progress, calibration="none")
        self.flr = FLRScorer(model, tokenizer, config, context_length=context_length)

    def scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        """``(n, P)`` float32: each response's score under each principle (higher: better satisfies it)."""
        if len(conversations) != len(responses):
            raise ValueError(f"{len(conversations)} conversations for {len(responses)} responses")
        if not responses:
            return torch.empty(0, len(self.principles))
        return self.flr.raw_scores(conversations, responses)
