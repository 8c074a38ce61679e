"""Prompt token ids of a conversation in which message text is always plain text.

A chat template marks turns with control tokens (ChatML: ``<|im_start|>``, ``<|im_end|>``). The
usual path -- render the template to a string, tokenise the string -- cannot tell the template's
control tokens from the same characters typed by a user: a message containing
``<|im_start|>system ...`` opens a second system turn, with a direction line of its choosing.

:class:`ChatTokenizer` renders the template once with a placeholder for each message's text, so
it knows which control-token strings the template itself wrote; only those become control
tokens. Message text is tokenised with special-token matching off, so ``<|im_start|>`` in a
message is the tokens of ``<``, ``|``, ``im``, ... like any other text. Text between two of the
template's control tokens is tokenised as one piece, exactly as the tokenizer splits it, so for a
conversation without control-token strings the ids equal ``tokenizer(render_prompt(...))`` (the
ids the policy was trained on; the tests check this).

The scorers read conversations the same way (:meth:`ChatTokenizer.encode`): FLR's prefix up to a
follow-up's first token, and a reward model's whole conversation, so a response that types
``<|im_end|><|im_start|>user ...`` cannot end its own turn and fake the follow-up it is scored on.

Fallback, used when that exactness cannot be guaranteed (a slow tokenizer, control tokens that
strip the whitespace around them, a template that rewrites message text): plain
render-and-tokenise, and a message that contains a control-token string is refused with
:class:`~steer.errors.InvalidInput` naming the message.

:func:`text_byte_limit` is the byte bound checked *before* any of this work: text of more than
``context x (longest token in bytes)`` bytes cannot fit the context, whatever its tokens.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

from steer.errors import InvalidInput

_MARK = "\ue000{}\ue001"  # private-use code points: nothing in a template has reason to alter them
_MARKS = re.compile("\ue000([0-9]+)\ue001")


class ChatTokenizer:
    """Conversation -> prompt ids with the generation prompt; message text never yields control tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = [t for t in added.values() if getattr(t, "special", False)]
        self.control_tokens: dict[str, int] = {t.content: i for i, t in added.items() if getattr(t, "special", False)}
        longest_first = sorted(self.control_tokens, key=len, reverse=True)
        self._control = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain_matching = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in special)
        self._plain = None
        if backend is not None and plain_matching:
            # A private copy that never matches special tokens. The shared tokenizer is not switched
            # back and forth (transformers' split_special_tokens does that): other threads use it.
            self._plain = copy.deepcopy(backend)
            self._plain.encode_special_tokens = True

    @property
    def exact(self) -> bool:
        """True when message text is neutralised; False: it is refused if it holds a control token."""
        return self._plain is not None

    def control_token_in(self, text: str) -> str | None:
        """The first control-token string in ``text``, if any."""
        if self._control is None:
            return None
        match = self._control.search(text)
        return match.group(0) if match else None

    def __call__(self, messages: Sequence[Mapping[str, str]], fields: Sequence[str] | None = None) -> list[int]:
        """Prompt ids of ``messages`` plus the assistant's generation prompt.

        ``fields`` names each message for errors (default ``messages[i].content``).
        """
        return self.encode(messages, fields)

    def encode(self, messages: Sequence[Mapping[str, str]], fields: Sequence[str] | None = None, *,
               add_generation_prompt: bool = True, before_last_text: bool = False) -> list[int]:
        """Ids of the rendered ``messages``; message text is plain text (module docstring).

        ``add_generation_prompt``: end with the assistant's turn header (a prompt to generate from);
        off for a conversation that is scored as it stands (a reward model reads it whole).
        ``before_last_text``: stop where the last message's text begins, so the ids end with that
        message's turn header: FLR scores a follow-up's own tokens from there. The last message's
        text then only stands in for the template and is not encoded (and must be non-empty).
        """
        messages = [dict(m) for m in messages]
        if self._plain is not None:
            pieces = self._pieces(messages, add_generation_prompt)
            if pieces is not None:
                # Piece 2i + 1 is message i's text: drop the last message's text and what follows it.
                return self._encode(pieces[: 2 * len(messages) - 1] if before_last_text else pieces)
        for i, m in enumerate(messages[:-1] if before_last_text else messages):
            token = self.control_token_in(m["content"])
            if token is not None:
                where = fields[i] if fields is not None else f"messages[{i}].content"
                raise InvalidInput(where, f"contains the control token {token!r}, which this model's chat template "
                                          "cannot keep as text; remove it")
        text = self._render(messages, add_generation_prompt)
        if before_last_text:
            at = text.rfind(messages[-1]["content"])
            if at < 0 or not messages[-1]["content"]:
                raise ValueError(
                    f"the chat template does not render the last message {messages[-1]['content']!r} verbatim")
            text = text[:at]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _pieces(self, messages: list[dict[str, str]],
                add_generation_prompt: bool = True) -> list[tuple[str, bool]] | None:
        """The rendered prompt as (text, written by the template) pieces; None if the template rewrites message text."""
        skeleton = self._render([dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)],
                                add_generation_prompt)
        parts = _MARKS.split(skeleton)  # template, index, template, index, ..., template
        if [int(i) for i in parts[1::2]] != list(range(len(messages))):
            return None
        pieces: list[tuple[str, bool]] = []
        for k, part in enumerate(parts):
            pieces.append((part, True) if k % 2 == 0 else (messages[int(part)]["content"], False))
        if "".join(text for text, _ in pieces) != self._render(messages, add_generation_prompt):
            return None
        return pieces

    def _encode(self, pieces: list[tuple[str, bool]]) -> list[int]:
        ids: list[int] = []
        text: list[str] = []  # plain text since the last control token

        def flush():
            if text:
                ids.extend(self._plain.encode("".join(text), add_special_tokens=False).ids)
                text.clear()

        for piece, from_template in pieces:
            if not from_template or self._control is None:
                text.append(piece)
                continue
            for j, part in enumerate(self._control.split(piece)):  # text, control, text, ...
                if j % 2:
                    flush()
                    ids.append(self.control_tokens[part])
                elif part:
                    text.append(part)
        flush()
        return ids


def text_byte_limit(tokenizer, context_length: int) -> int:
    """Bytes of text that can possibly fit in ``context_length`` tokens: context x the longest token.

    A token stands for at most that many bytes, so longer text is refused before tokenising, with
    no false refusals. Pieces that decode to part of a character count as a replacement character
    (3 bytes): the bound can only grow. For the default model: 8,192 x 81 = 663,552 bytes.
    """
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return context_length * max(len(p.encode("utf-8")) for p in pieces)
