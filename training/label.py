"""RLAIF labelling: the model judges which of two responses better satisfies a set of principles.

Reinforcement Learning from AI Feedback (Bai et al., 2022, "Constitutional AI", arXiv 2212.08073;
Lee et al., 2023, "RLAIF", arXiv 2309.00267) replaces the human preference label with an AI
judge's. The judge here is the model itself (:mod:`steer.rewards.principle_judge`, ``--judge``):
under principle ``p`` a response scores, by default, how much more likely the model makes it under
``p`` as an instruction than under its opposite (``instruction``), or the log-likelihood of a
follow-up saying ``p`` was met minus one saying it was not (``followup``, FLR).
For two responses ``a`` and ``b`` to the same prompt::

    d = mean_p (score_p(a) - score_p(b))      chosen = a if d > 0 else b,  margin = |d|

A pair whose margin is below ``--min-margin`` (or exactly 0: no preference) is skipped and counted;
two identical texts are skipped as ``equal``.

Input rows (JSONL or Parquet; other columns are ignored):

* ``{"prompt": text or messages, "responses": [r1, r2, ...]}``: every unordered pair of the (two or
  more) responses is labelled; a response is text or one assistant message.
* TRL pairs ``{"prompt", "chosen", "rejected"}`` (or the implicit-prompt form): the given order is
  ignored for labelling and only compared with afterwards (``agrees_with_input``, and the
  ``reproduced`` share in ``summary.json``: the input pairs whose label the judge reproduced; a
  skipped pair does not count as reproduced).

Output (``--output DIR``): ``pairs.jsonl``, TRL rows ready for ``python -m steer.train dpo --data``::

    {"prompt": ..., "chosen": ..., "rejected": ..., "margin": 0.31,
     "principle_scores": [{"id": "shorter", "chosen": -2.10, "rejected": -2.52}, ...],
     "source": "data.jsonl:7", "agrees_with_input": true}

(completions are assistant messages when the prompt is a message list, text otherwise);
``summary.json`` (counts, skipped by reason, reproduction, the principles by id and text);
``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from steer.errors import InvalidInput
from steer.files import atomic_write_text
from steer.rewards.principle_judge import check_judgeable

from .pairs import PairExample, _completion, _present, parse_prompt, parse_row, read_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelItem:
    """One input row: a prompt and the responses whose pairs are labelled."""

    prompt: object  # the prompt as given (text or a message list), written back unchanged
    conversation: tuple[Mapping[str, str], ...]  # the parsed conversation, ending with the user's turn
    responses: tuple[str, ...]
    where: str  # file:line
    given: tuple[int, int] | None = None  # TRL pair rows: (index of chosen, index of rejected) in responses

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def parse_label_row(row: Mapping, where: str) -> LabelItem:
    """A ``{prompt, responses}`` row or a TRL pair row; errors are ``InvalidInput(where, "<column>: <reason>")``."""
    if not isinstance(row, Mapping):
        raise InvalidInput(where, f"row: must be a JSON object, got {type(row).__name__}")
    if _present(row, "completion") or _present(row, "label"):
        raise InvalidInput(where, "completion: an unpaired (KTO) row has one response; label "
                                  "needs {prompt, responses} or {prompt, chosen, rejected}")
    if _present(row, "responses"):
        if _present(row, "chosen") or _present(row, "rejected"):
            raise InvalidInput(where, "responses: the row also has chosen/rejected; give one of the two forms")
        try:
            if not _present(row, "prompt"):
                raise InvalidInput("prompt", "is missing (a responses row has prompt and responses)")
            conversation = parse_prompt(row["prompt"])
            value = row["responses"]
            if not isinstance(value, (list, tuple)):
                raise InvalidInput("responses", f"must be a list of two or more responses, got {type(value).__name__}")
            if len(value) < 2:
                raise InvalidInput("responses", f"has {len(value)} response(s); a pair needs two or more")
            responses = tuple(_completion(r, f"responses[{k}]") for k, r in enumerate(value))
        except InvalidInput as e:
            raise InvalidInput(where, str(e)) from None
        return LabelItem(row["prompt"], conversation, responses, where)
    if not (_present(row, "chosen") or _present(row, "rejected")):
        missing = "responses" if _present(row, "prompt") else "prompt"
        raise InvalidInput(where, f"{missing}: is missing (a row has prompt and responses: "
                                  "[two or more], or prompt, chosen and rejected)")
    if not _present(row, "prompt") and (isinstance(row.get("chosen"), str) or isinstance(row.get("rejected"), str)):
        raise InvalidInput(where, "prompt: is missing (without a prompt column, "
                                  "chosen and rejected must be whole conversations)")
    pair = parse_row(row, where)
    assert isinstance(pair, PairExample)
    prompt = row["prompt"] if _present(row, "prompt") else [dict(m) for m in pair.prompt]
    return LabelItem(prompt, pair.prompt, (pair.chosen, pair.rejected), where, given=(0, 1))


def read_label_items(paths: Sequence[str]) -> list[LabelItem]:
    items = [parse_label_row(row, where) for path in paths for where, row in read_rows(path)]
    if not items:
        raise InvalidInput("data", "no rows")
    return items


def _as_message(item: LabelItem, text: str):
    return [{"role": "assistant", "content": text}] if item.conversational else text


def label_items(items: Sequence[LabelItem], scores: Sequence[np.ndarray], principle_ids: Sequence[str],
                min_margin: float) -> tuple[list[dict], dict]:
    """``(pairs.jsonl rows, counts)`` from each item's ``(responses, P)`` scores (module docstring)."""
    rows, skipped = [], {"margin": 0, "equal": 0}
    given = reproduced = 0
    for item, s in zip(items, scores):
        n = len(item.responses)
        for a in range(n):
            for b in range(a + 1, n):
                is_given = item.given is not None and {a, b} == set(item.given)
                given += is_given
                if item.responses[a] == item.responses[b]:
                    skipped["equal"] += 1
                    continue
                diff = s[a] - s[b]  # (P,)
                d = float(diff.mean())
                if d == 0.0 or abs(d) < min_margin:
                    skipped["margin"] += 1
                    continue
                hi, lo = (a, b) if d > 0 else (b, a)
                row = {
                    "prompt": item.prompt, "chosen": _as_message(item, item.responses[hi]),
                    "rejected": _as_message(item, item.responses[lo]),
                    "margin": abs(d),
                    "principle_scores": [{"id": pid, "chosen": float(s[hi, k]), "rejected": float(s[lo, k])}
                                         for k, pid in enumerate(principle_ids)],
                    "source": item.where,
                }
                if is_given:
                    row["agrees_with_input"] = hi == item.given[0]
                    reproduced += row["agrees_with_input"]
                rows.append(row)
    considered = sum(len(i.responses) * (len(i.responses) - 1) // 2 for i in items)
    counts = {"rows": len(items), "pairs": considered, "written": len(rows), "skipped": skipped,
              "input_pairs": given, "reproduced": reproduced, "reproduced_share": reproduced / given if given else None}
    return rows, counts


def run_label(config, make_judge=None) -> dict:
    """The ``label`` command on a :class:`~steer.training.judge_settings.LabelConfig`; returns summary.json's content.

    ``make_judge(config, principles) -> (judge, model id)``: as in :func:`steer.training.icai.run_icai`."""
    from .config import write_config
    from .judged_principles import read_principles_file
    from .judging import score_responses
    from .output_dir import check_output_dir

    started = time.monotonic()
    output = check_output_dir(config.output)
    items = read_label_items(config.data)
    principles = read_principles_file(config.principles)
    if config.ids:
        by_id = {p.id: p for p in principles}
        unknown = [i for i in config.ids if i not in by_id]
        if unknown:
            raise InvalidInput(config.principles,
                               f"ids: no principle {unknown[0]!r} in this file; its ids are {', '.join(by_id)}")
        principles = [by_id[i] for i in config.ids]
    elif config.top:
        if config.top > len(principles):
            log.warning("--top %d but %s holds %d principles: using all of them",
                        config.top, config.principles, len(principles))
        principles = principles[: config.top]
    log.info("%d rows, %d responses; judged by %d principle(s): %s", len(items), sum(len(i.responses) for i in items),
             len(principles), "; ".join(p.text for p in principles))
    check_judgeable(principles, config.judge)
    if make_judge is None:
        from .judging import load_judge as make_judge
    judge, model_id = make_judge(config, principles)
    flat = score_responses(judge, [i.conversation for i in items for _ in i.responses],
                           [r for i in items for r in i.responses])  # (R, P)
    bounds = np.cumsum([0] + [len(i.responses) for i in items])
    rows, counts = label_items(items, [flat[bounds[k]: bounds[k + 1]] for k in range(len(items))],
                               [p.id for p in principles], config.min_margin)
    margins = np.array([r["margin"] for r in rows])
    summary = {
        "model": model_id, "judge": config.judge, "data": list(config.data), "principles_file": config.principles,
        "principles": [{"id": p.id, "text": p.text} for p in principles], "min_margin": config.min_margin, **counts,
        "margin": {"mean": float(margins.mean()), "median": float(np.median(margins))} if len(rows) else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_config(config, output / "config.yaml")
    if not rows:
        log.warning("every pair was skipped (margins below --min-margin %.3g or equal texts): pairs.jsonl is empty",
                    config.min_margin)
    return summary
