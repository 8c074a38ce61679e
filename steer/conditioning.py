"""The one format that writes a direction into a conversation ("arithmetic prompting", DPA).

Directional Preference Alignment (Wang et al., 2024, "Arithmetic Control of LLMs for Diverse User
Preferences") conditions the policy on a preference direction written into the system prompt as a
weighted sum of ratings. steer uses exactly one line, with two decimals per weight, objectives in
the objective set's order::

    Your response should maximize weighted rating = helpfulness*0.70 + creativity*0.30 + conciseness*0.00

The line is appended to the conversation's own system message (after a blank line), or to
:data:`DEFAULT_SYSTEM` when the conversation has none. Training (DPA pairs) and serving
(CONDITIONED) both go through :func:`condition_messages`, so the policy sees at serving time the
exact text it was trained on. :func:`parse_direction` is the inverse, for data work.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from steer.errors import InvalidInput
from steer.objectives import Direction

DEFAULT_SYSTEM = "You are a helpful AI assistant."
PREFIX = "Your response should maximize weighted rating = "
FORMAT = PREFIX + "<objective>*<weight, 2 decimals> + ... (every objective, in order)"

# One term: name*0.70. Names are identifier-like (see objectives.validate_objectives).
_TERM = r"([A-Za-z0-9_]+)\*([0-9]+(?:\.[0-9]+)?)"
_LINE = re.compile(re.escape(PREFIX) + _TERM + r"(?:\s*\+\s*" + _TERM + r")*")
_TERMS = re.compile(_TERM)


def direction_line(direction: Direction) -> str:
    """``Your response should maximize weighted rating = helpfulness*0.70 + ...``"""
    return PREFIX + " + ".join(f"{name}*{w:.2f}" for name, w in zip(direction.objectives, direction.weights))


def system_prompt(direction: Direction, base: str | None = None) -> str:
    """The system message carrying ``direction``: ``base`` (or the default), a blank line, the line."""
    base = DEFAULT_SYSTEM if base is None else base.rstrip()
    return f"{base}\n\n{direction_line(direction)}" if base else direction_line(direction)


def condition_messages(messages: Sequence[dict[str, str]], direction: Direction) -> list[dict[str, str]]:
    """Return a copy of ``messages`` whose system message carries ``direction``.

    A conversation that already carries a direction line is refused rather than given two.
    """
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        if PREFIX in messages[0]["content"]:
            raise InvalidInput("messages[0].content", "already contains a direction line; send weights instead")
        messages[0]["content"] = system_prompt(direction, messages[0]["content"])
    else:
        messages.insert(0, {"role": "system", "content": system_prompt(direction)})
    return messages


def strip_direction_line(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A copy of ``messages`` without the direction line :func:`condition_messages` added (the system
    message goes when nothing else is left in it, or when it is the default one)."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system" and PREFIX in messages[0]["content"]:
        content = _LINE.sub("", messages[0]["content"]).rstrip()
        if content and content != DEFAULT_SYSTEM:
            messages[0]["content"] = content
        else:
            messages.pop(0)
    return messages


def render_prompt(tokenizer, messages: Sequence[dict[str, str]], direction: Direction | None) -> str:
    """The conditioned conversation through the tokenizer's chat template, ready for the reply."""
    if direction is not None:
        messages = condition_messages(messages, direction)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def parse_direction(text: str, objectives: Sequence[str] | None = None) -> Direction:
    """Find the direction line in ``text`` (a system prompt or a whole rendered prompt).

    The two-decimal weights are renormalised. With ``objectives``, the line must name exactly
    those objectives (in any order); without, the line's own names form the objective set.
    """
    match = _LINE.search(text)
    if match is None:
        raise InvalidInput("text", f"no direction line found (expected {FORMAT!r})")
    terms = _TERMS.findall(match.group(0)[len(PREFIX):])
    names = tuple(name for name, _ in terms)
    weights = {name: float(w) for name, w in terms}
    if objectives is None:
        objectives = names
    elif sorted(names) != sorted(objectives):
        raise InvalidInput("text", f"direction line names {list(names)}, expected {list(objectives)}")
    return Direction.from_weights(weights, objectives, field="text")
