"""Conversations as plain lists of ``{"role", "content"}`` dicts, validated in one place.

A request names its input as either a single ``prompt`` (one user turn) or ``messages``
(a conversation). Both become the same list here; errors name the request field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from steer.errors import InvalidInput

ROLES = ("system", "user", "assistant")


def build_conversation(
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    *,
    prompt_field: str = "prompt",
    messages_field: str = "messages",
) -> list[dict[str, str]]:
    """Validate ``prompt`` xor ``messages`` and return the conversation, ending with a user turn.

    Rules: exactly one of the two is given; roles are system/user/assistant; a system turn may
    only come first; the last turn is the user's; no turn is empty.
    """
    has_prompt = bool(prompt)
    has_messages = bool(messages)
    if has_prompt and has_messages:
        raise InvalidInput(prompt_field, f"set either {prompt_field} or {messages_field}, not both")
    if not has_prompt and not has_messages:
        raise InvalidInput(prompt_field, f"is empty: set {prompt_field} (text) or {messages_field} (a conversation)")
    if has_prompt:
        if not isinstance(prompt, str):
            raise InvalidInput(prompt_field, f"must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidInput(prompt_field, "is blank (only whitespace)")
        return [{"role": "user", "content": prompt}]
    out = []
    for i, m in enumerate(messages):
        where = f"{messages_field}[{i}]"
        if not isinstance(m, Mapping):
            raise InvalidInput(where, f"must be a mapping with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidInput(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise InvalidInput(f"{where}.role", "a system message may only be the first message")
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput(f"{where}.content", "is empty")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InvalidInput(f"{messages_field}[{len(out) - 1}].role",
                           f"the last message must be the user's, got {out[-1]['role']!r}")
    return out
