"""Preference data: TRL-format rows from local JSONL/Parquet, validated, tokenised with masked prompts.

Row formats (the ones TRL's DPO/KTO trainers read; other columns are ignored)::

    {"prompt": "text", "chosen": "text", "rejected": "text"}                         standard pair
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}          conversational pair
    {"chosen": [...whole conversation...], "rejected": [...]}                       implicit prompt (the
                                                                                    shared turns before the
                                                                                    last assistant turn)
    {"prompt": ..., "completion": ..., "label": true}                               unpaired (KTO)

A plain-text prompt becomes one user turn and goes through the tokenizer's chat template like any
conversation; a conversational prompt may carry a system message (a DPA direction line included).
A bad row stops reading with ``InvalidInput("<file>:<line>", "<column>: <reason>")`` (Parquet:
``<file>:row <n>``); every completion (``chosen``, ``rejected``, ``completion``) must hold text.
Files are read with ``datasets`` (Arrow, memory-mapped); UTF-8 and JSON syntax are checked line by
line first so that an error names its line.

Tokenisation: ``prompt_ids`` = the rendered conversation with the generation prompt (the
assistant header); ``completion_ids`` = the completion text's tokens plus the end-of-turn token
(omitted for a DPA sample that ran out of tokens, so the policy is not taught to stop there).
Labels are the input ids with every prompt and padding position set to ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.conditioning import render_prompt
from steer.conversation import build_conversation
from steer.errors import InvalidInput
from steer.files import json_lines, utf8_lines

IGNORE_INDEX = -100
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PairExample:
    """A prompt with a preferred and a dispreferred completion."""

    prompt: tuple[Mapping[str, str], ...]  # the conversation, ending with the user's turn
    chosen: str
    rejected: str
    where: str = ""  # file:line, for errors
    chosen_eos: bool = True  # end the completion with the end-of-turn token
    rejected_eos: bool = True
    direction: tuple[float, ...] | None = None  # mixture training: the weights the pair was chosen under


@dataclass(frozen=True)
class UnpairedExample:
    """KTO: one completion labelled desirable (True) or undesirable (False)."""

    prompt: tuple[Mapping[str, str], ...]
    completion: str
    label: bool
    where: str = ""
    eos: bool = True


Example = PairExample | UnpairedExample


# -- row parsing ------------------------------------------------------------------------------

def _present(row: Mapping, key: str) -> bool:
    # datasets fills a column missing from one row with None: treat None as absent.
    return key in row and row[key] is not None


def _messages(value, column: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise InvalidInput(column, "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise InvalidInput(f"{column}[{i}]", f"must be a {{role, content}} mapping, got {type(m).__name__}")
        out.append({"role": m.get("role"), "content": m.get("content")})
    return out


def parse_prompt(value, column: str = "prompt") -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return tuple(build_conversation(prompt=value, prompt_field=column))
    return tuple(build_conversation(messages=_messages(value, column), messages_field=column))


def _completion(value, column: str) -> str:
    """A completion is non-blank text, or a list holding exactly one assistant message with such text."""
    if isinstance(value, str):
        field, content = column, value
    else:
        messages = _messages(value, column)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            raise InvalidInput(column,
                               f"a conversational completion is exactly one assistant message, got roles {roles}")
        field, content = f"{column}[0].content", messages[0]["content"]
        if not isinstance(content, str):
            raise InvalidInput(field, f"must be a string, got {type(content).__name__}")
    if not content.strip():
        # An empty chosen answer teaches the policy to stop at once; an empty rejected one is no preference worth
        # learning.
        raise InvalidInput(field, f"is empty ({content!r}): every completion needs text; fill it in or drop the row")
    return content


def _split_implicit(chosen, rejected) -> tuple[tuple, str, str]:
    """TRL's implicit-prompt format: the prompt is the turns both conversations share before their
    final assistant turn."""
    c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for column, conv in (("chosen", c), ("rejected", r)):
        if conv[-1]["role"] != "assistant":
            raise InvalidInput(f"{column}[{len(conv) - 1}].role",
                               "without a prompt column, the conversation must end with the assistant's turn")
    if c[:-1] != r[:-1]:
        raise InvalidInput("chosen",
                           "without a prompt column, chosen and rejected must share every turn before their last one")
    return parse_prompt(c[:-1], "chosen"), _completion([c[-1]], "chosen"), _completion([r[-1]], "rejected")


def parse_row(row: Mapping, where: str) -> Example:
    """One row as an example; errors are ``InvalidInput(where, "<column>: <reason>")``."""
    try:
        if not isinstance(row, Mapping):
            raise InvalidInput("row", f"must be a JSON object, got {type(row).__name__}")
        if _present(row, "completion") or _present(row, "label"):
            for key in ("prompt", "completion", "label"):
                if not _present(row, key):
                    raise InvalidInput(key, "is missing (an unpaired KTO row has prompt, completion and label)")
            label = row["label"]
            if not isinstance(label, bool):
                raise InvalidInput("label", f"must be true or false, got {label!r}")
            return UnpairedExample(parse_prompt(row["prompt"]), _completion(row["completion"], "completion"),
                                   label, where)
        for key in ("chosen", "rejected"):
            if not _present(row, key):
                raise InvalidInput(key, "is missing (a preference row has prompt, chosen and "
                                        "rejected; a KTO row prompt, completion and label)")
        if _present(row, "prompt"):
            prompt = parse_prompt(row["prompt"])
            chosen, rejected = _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")
        else:
            prompt, chosen, rejected = _split_implicit(row["chosen"], row["rejected"])
        if chosen == rejected:
            raise InvalidInput("rejected", "is identical to chosen: the pair states no preference")
        return PairExample(prompt, chosen, rejected, where)
    except InvalidInput as e:
        raise InvalidInput(where, str(e)) from None


# -- files (JSONL lines: steer.files.json_lines, errors naming file:line) --------------------------

def _json_object_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """:func:`json_lines`, each line also checked to be a JSON object (errors: file:line)."""
    for lineno, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise InvalidInput(f"{path}:{lineno}", f"row: must be a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def data_file(path: str | Path) -> tuple[Path, str]:
    """``(path, the datasets builder that reads it)`` for a local training-data file; InvalidInput
    naming the file when its type is not one of SUFFIXES or it does not exist."""
    path = Path(path)
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise InvalidInput(str(path), f"unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise InvalidInput(str(path), "no such file")
    return path, builder


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for every row of a local JSONL/Parquet file, read through ``datasets``.

    JSONL lines are first checked one by one, so a syntax error names its line. A file whose rows
    mix shapes that Arrow cannot put in one column (say, text prompts in some rows and message
    lists in others) is still read: its rows are the JSON objects already parsed.
    """
    import datasets

    path, builder = data_file(path)
    parsed = list(_json_object_lines(path)) if path.suffix.lower() == ".jsonl" else None
    if builder == "json" and parsed is None:  # a .json file (one array): datasets would only say it could not decode
        for _ in utf8_lines(path):
            pass
    if parsed == []:
        raise InvalidInput(str(path), "has no rows")
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path.resolve()), split="train")
    except Exception as e:
        if parsed is None:
            raise InvalidInput(str(path), f"datasets could not read it: {type(e).__name__}: {e}") from e
        return [(f"{path}:{n}", obj) for n, obj in parsed]
    if len(table) == 0:
        raise InvalidInput(str(path), "has no rows")
    if parsed is not None and len(parsed) == len(table):
        where = [f"{path}:{n}" for n, _ in parsed]
    else:  # Parquet, or a .json file holding one array
        where = [f"{path}:row {i + 1}" for i in range(len(table))]
    return list(zip(where, table))


def read_examples(paths: Sequence[str | Path]) -> list[Example]:
    """Every row of every file as an example. All rows must be pairs, or all unpaired (KTO)."""
    examples: list[Example] = []
    for path in paths:
        for where, row in read_rows(path):
            ex = parse_row(row, where)
            if examples and type(ex) is not type(examples[0]):
                first = "preference pairs" if isinstance(examples[0], PairExample) else "unpaired KTO rows"
                raise InvalidInput(where, f"mixes formats: {examples[0].where} started {first}")
            examples.append(ex)
    if not examples:
        raise InvalidInput("data", "no rows")
    return examples


def pairs_to_unpaired(pairs: Sequence[PairExample]) -> list[UnpairedExample]:
    """KTO on pair data: each pair gives a desirable (chosen) and an undesirable (rejected) example."""
    out = []
    for p in pairs:
        out.append(UnpairedExample(p.prompt, p.chosen, True, p.where, p.chosen_eos))
        out.append(UnpairedExample(p.prompt, p.rejected, False, p.where, p.rejected_eos))
    return out


# -- tokenisation -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizedSequence:
    """``input_ids = prompt + completion``; the first ``prompt_len`` positions carry no loss."""

    input_ids: tuple[int, ...]
    prompt_len: int
    prompt_truncated: bool = False

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass(frozen=True)
class Encoder:
    """The tokenizer plus the length limits every sequence obeys."""

    tokenizer: object
    max_length: int = 512  # prompt + completion tokens
    max_prompt_length: int = 384  # longer prompts keep their end (the question and the assistant header)

    def prompt_ids(self, prompt: Sequence[Mapping[str, str]]) -> list[int]:
        text = render_prompt(self.tokenizer, list(prompt), None)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_ids(self, completion: str, eos: bool) -> list[int]:
        ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] if completion else []
        return ids + [self.tokenizer.eos_token_id] if eos else ids

    def encode(self, prompt: Sequence[Mapping[str, str]], completion: str, eos: bool = True, where: str = "",
               prompt_ids: list[int] | None = None) -> TokenizedSequence:
        p = self.prompt_ids(prompt) if prompt_ids is None else prompt_ids
        truncated = len(p) > self.max_prompt_length
        if truncated:
            p = p[-self.max_prompt_length:]
        c = self.completion_ids(completion, eos)[: self.max_length - len(p)]
        if not c:
            raise InvalidInput(where or "completion", "no completion token fits: the prompt takes "
                                                      f"{len(p)} of max_length={self.max_length} tokens")
        return TokenizedSequence(tuple(p + c), len(p), truncated)


@dataclass(frozen=True)
class EncodedExample:
    """A tokenised example. Pairs: ``sequences = (chosen, rejected)``; unpaired: ``(completion, kl)``
    where ``kl`` is the prompt with another example's completion (KTO's mismatched pair, fixed per
    dataset so it can be scored by a precomputed reference too); sft: ``(chosen,)``."""

    sequences: tuple[TokenizedSequence, ...]
    label: bool | None = None  # unpaired only
    direction: tuple[float, ...] | None = None  # mixture training: the weights this example was paired under


def cached_prompt_ids(tok: Encoder):
    """``prompt -> ids`` through ``tok``, each distinct conversation tokenised once (rows share prompts)."""
    cache: dict[tuple, list[int]] = {}

    def pids(prompt) -> list[int]:
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key not in cache:
            cache[key] = tok.prompt_ids(prompt)
        return cache[key]

    return pids


def encode_examples(examples: Sequence[Example], tok: Encoder, *, sft: bool = False) -> list[EncodedExample]:
    """Tokenise every example once. Unpaired example i's KL sequence is prompt i + completion (i+1) mod n."""
    out = []
    pids = cached_prompt_ids(tok)
    for i, ex in enumerate(examples):
        if isinstance(ex, PairExample):
            chosen = tok.encode(ex.prompt, ex.chosen, ex.chosen_eos, ex.where, pids(ex.prompt))
            if sft:
                out.append(EncodedExample((chosen,), direction=ex.direction))
            else:
                rejected = tok.encode(ex.prompt, ex.rejected, ex.rejected_eos, ex.where, pids(ex.prompt))
                out.append(EncodedExample((chosen, rejected), direction=ex.direction))
        else:
            other = examples[(i + 1) % len(examples)]
            seq = tok.encode(ex.prompt, ex.completion, ex.eos, ex.where, pids(ex.prompt))
            kl = tok.encode(ex.prompt, other.completion, other.eos, ex.where, pids(ex.prompt))
            out.append(EncodedExample((seq, kl), ex.label))
    return out


@dataclass
class Batch:
    """Right-padded sequences. Row order is the caller's (pairs: all chosen, then all rejected)."""

    input_ids: torch.Tensor  # (B, T) int64, padding = pad id
    attention_mask: torch.Tensor  # (B, T) int64, 0 on padding
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX on prompt and padding

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs: Sequence[TokenizedSequence], pad_id: int) -> Batch:
    """Right-pad to the longest sequence. Right padding keeps every real token at the positions
    (0..len-1) it has alone, so a sequence's log-prob does not depend on its batch."""
    T = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[b, :n] = 1
        labels[b, s.prompt_len:n] = ids[b, s.prompt_len:n]
    return Batch(ids, mask, labels)
