"""A principle judged by the model: by follow-ups that say it was met, or by instructions that ask for it.

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

**The instruction judge** (``method="instruction"``) asks the other way round: how much more
likely does the model make the response, end of turn included, when the principle is its
instruction than when the opposite is? With ``I+(p)`` the instructions for ``p`` ("Make your answer
short and to the point.") and ``I-(p)`` those against it ("Make your answer long-winded and
wordy."), each placed in the system message as guided sampling places principles
(:func:`steer.principles.instructed_messages`)::

    score(c, y; p) = mean_{I in I+(p)} log p(y, eot | c + I) - mean_{I in I-(p)} log p(y, eot | c + I)

summed over the response's tokens, not averaged: it is the log-likelihood ratio of "written under
``I+``" against "written under ``I-``", and the end-of-turn token is where a length principle
speaks (under "Answer in one short sentence." the model ends after "Canberra.", under "Answer in
detail" it goes on). What a small model reads here is what it *does* under an instruction, which
it does reliably (``STEERING.md``: 68 vs 187 tokens for "Answer in one short sentence."), rather
than what it *says* about an answer, where any praise tends to go with the shorter one. Concrete
requests work, adjectives much less: on the shipped ICAI example (the shorter answer wins) the
default model's held-out agreement for "shorter" is 0.95 with the library's instructions ("Answer
in one short sentence." / "Answer in detail, with several sentences of explanation."), about 0.6
with the statement template ("Make your answer short and to the point." / "... long-winded and
wordy."), and 0.725 with the follow-up judge, which ranks "formal" first at 0.95 (README,
Training). Both judges are offered (``--judge``); the instruction judge is the default.

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
# The instruction judge's texts for a principle given by statement: for it, and against it.
INSTRUCTION_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "positive": ("Make your answer {statement}.",),
    "negative": ("Make your answer {opposite}.",),
}
JUDGE_METHODS = ("instruction", "followup")


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
    instructions: tuple[str, ...] = ()  # the instruction judge's instructions asking for it ...
    counter_instructions: tuple[str, ...] = ()  # ... and against it (both empty: not judged that way)

    def __post_init__(self):
        for name in ("positive", "negative", "instructions", "counter_instructions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        FollowUps(self.positive, self.negative)  # non-empty, no surrounding spaces (ValueError otherwise)
        if bool(self.instructions) != bool(self.counter_instructions):
            raise ValueError(f"principle {self.id!r}: instructions and counter_instructions come together")
        for text in self.instructions + self.counter_instructions:
            if not isinstance(text, str) or not text.strip() or text != text.strip():
                raise ValueError(f"principle {self.id!r}: instruction {text!r} must be text without surrounding spaces")

    @classmethod
    def from_statement(cls, id: str, text: str, statement: str, opposite: str | None = None,
                       templates: Mapping[str, Sequence[str]] = DEFAULT_TEMPLATES, source: str = "") -> JudgedPrinciple:
        """Follow-ups from ``templates`` with ``{statement}`` and ``{opposite}`` (default ``not <statement>``)
        filled in."""
        opposite = opposite if opposite is not None else f"not {statement}"
        fill = {"statement": statement, "opposite": opposite}
        return cls(id, text, tuple(t.format(**fill) for t in templates["positive"]),
                   tuple(t.format(**fill) for t in templates["negative"]), statement, opposite, source,
                   tuple(t.format(**fill) for t in INSTRUCTION_TEMPLATES["positive"]),
                   tuple(t.format(**fill) for t in INSTRUCTION_TEMPLATES["negative"]))

    def to_dict(self) -> dict:
        """The fields a principles file holds for it (follow-ups written out, so the file is self-contained)."""
        out = {"id": self.id, "text": self.text}
        if self.statement is not None:
            out["statement"] = self.statement
            out["opposite"] = self.opposite
        out["positive"] = list(self.positive)
        out["negative"] = list(self.negative)
        if self.instructions:
            out["instructions"] = list(self.instructions)
            out["counter_instructions"] = list(self.counter_instructions)
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


def check_judgeable(principles: Sequence[JudgedPrinciple], method: str) -> None:
    """InvalidInput unless ``method`` is a judge and every principle carries what it judges by
    (commands call it before loading the judge model)."""
    if method not in JUDGE_METHODS:
        raise InvalidInput("judge", f"must be one of {', '.join(JUDGE_METHODS)}, got {method!r}")
    if method == "instruction":
        missing = [f"{p.id} ({p.source})" if p.source else p.id for p in principles if not p.instructions]
        if missing:
            raise InvalidInput("principles", f"the instruction judge needs instructions for and against each "
                                             f"principle (a statement gives them); these have none: "
                                             f"{', '.join(missing)}; add them or use --judge followup")


class PrincipleJudge:
    """Per-principle scores of responses, by follow-ups (FLR whose objectives are the principles) or by
    instructions (module docstring).

    ``scores(conversations, responses)`` is ``(n, P)``, column ``j`` for ``principles[j]``."""

    def __init__(self, model, tokenizer, principles: Sequence[JudgedPrinciple], *, batch_size: int = 32,
                 prefix_batch: int = 8, progress: bool = False, context_length: int | None = None,
                 method: str = "instruction"):
        if not principles:
            raise InvalidInput("principles", "no principles to judge by")
        check_judgeable(principles, method)
        ids = [p.id for p in principles]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise InvalidInput("principles", f"duplicate ids {dupes}")
        self.method = method
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
        if self.method == "followup":
            return self.flr.raw_scores(conversations, responses)
        return self._instruction_scores(conversations, responses)

    def _instruction_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        from steer.principles import instructed_messages

        chat, eot = self.flr.chat, self.flr.tokenizer.eos_token_id
        texts = sorted({t for p in self.principles for t in p.instructions + p.counter_instructions})
        # Each (conversation + instruction, response) is encoded whole; the response is scored as the
        # continuation of exactly the ids before it, so the (conversation, instruction) prefixes are
        # shared by all responses to that conversation and each prefix runs once.
        prefixes: dict[tuple[int, ...], int] = {}
        continuations: list[list[list[int]]] = []
        slots: list[dict[str, tuple[int, int]]] = []  # per response: instruction -> (prefix, continuation)
        headers: dict[tuple, list[int]] = {}  # (conversation, instruction) -> its generation prompt's ids
        for i, (conv, response) in enumerate(zip(conversations, responses)):
            slot = {}
            conv_key = tuple((m["role"], m["content"]) for m in conv)
            for text in texts:
                messages = instructed_messages(conv, text) + [{"role": "assistant", "content": response}]
                fields = _fields(conv, messages, i)
                if (conv_key, text) not in headers:
                    headers[conv_key, text] = chat.encode(messages[:-1], fields[:-1], add_generation_prompt=True)
                prefix, cont = _split_response(chat, messages, fields, headers[conv_key, text], eot)
                u = prefixes.setdefault(prefix, len(prefixes))
                if u == len(continuations):
                    continuations.append([])
                slot[text] = (u, len(continuations[u]))
                continuations[u].append(cont)
            slots.append(slot)
        values = self.flr.continuation_loglik([list(p) for p in prefixes], continuations, desc="judging")
        out = torch.empty(len(responses), len(self.principles))
        for i, slot in enumerate(slots):
            ll = {text: float(values[u][k]) for text, (u, k) in slot.items()}
            for j, p in enumerate(self.principles):
                plus = sum(ll[t] for t in p.instructions) / len(p.instructions)
                minus = sum(ll[t] for t in p.counter_instructions) / len(p.counter_instructions)
                out[i, j] = plus - minus
        return out


def _fields(conv: Conversation, messages: Sequence[Mapping[str, str]], i: int) -> list[str]:
    """Names for error messages of ``messages`` = instructed ``conv`` + the response."""
    named = [f"conversations[{i}][{k}].content" for k in range(len(conv))]
    if len(messages) > len(conv) + 1:  # instructed_messages added a system message
        named = ["principle instruction"] + named
    return named + [f"responses[{i}]"]


def _split_response(chat, messages: list[dict[str, str]], fields: Sequence[str], header: list[int],
                    eot: int | None) -> tuple[tuple[int, ...], list[int]]:
    """``(prefix ids, response ids)`` of a conversation whose last message is the assistant's response,
    ``header`` being the ids of the rest with the generation prompt: the prefix ends with the
    assistant's turn header (where generation would start), the response ids run through its
    end-of-turn token (added when the template does not write it)."""
    full = chat.encode(messages, fields, add_generation_prompt=False)
    start = 0  # the response's ids begin where the generation prompt and the whole conversation part
    while start < min(len(header), len(full)) and header[start] == full[start]:
        start += 1
    ids = full[start:]
    if eot is not None:
        ids = ids[: ids.index(eot) + 1] if eot in ids else ids + [eot]
    return tuple(full[:start]), ids
