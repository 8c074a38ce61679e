"""Context distillation of the principles into the direction line (``steer.train dpa --loss distill``).

The base model follows plain-language instructions ("Answer in one short sentence.") and ignores
the numeric direction line; preference pairs teach a 135M policy to read the line only weakly,
because a pair's direction shows in a handful of tokens (mostly where the answer stops). Context
distillation (Askell et al. 2021, arXiv 2112.00861, section 3; Snell et al. 2022, arXiv 2209.15189)
moves the whole behaviour instead: the *teacher* is the base model (adapter off) under an
instruction chosen for direction ``e`` (:mod:`steer.principles`), the *student* is the policy under
the direction line of ``e`` and no instruction, and on the same response tokens the student matches
the teacher's next-token distribution at every position (``steer.train mixture --loss distill``: the
student is the mixture of adapters weighted by ``e`` on the plain prompt):

    loss = (1 / N) sum_{completion tokens t} KL( p_teacher(. | instruction(e), y_<t) || p_student(. | line(e), y_<t) )

Every response in the pool (principle-guided base-model samples, contrast samples and on-policy
samples alike) is distilled under its own direction, and with ``--corner-pairs`` also under every
corner it was not sampled for: the same prompt and the same tokens with a different line and a
different target, so the only way to lower the loss is to read the line. No reward is needed, so
the run scores nothing.

Rows (``iterations/<k>/distill.jsonl``, one per (response, target direction)) keep both prompts,
the response, the direction and the teacher's instruction, so a run can be audited and re-read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from steer.conditioning import condition_messages
from steer.errors import InvalidInput
from steer.objectives import Direction

from .pairs import EncodedExample, Encoder, TokenizedSequence, cached_prompt_ids, parse_prompt

ROWS_FILE = "distill.jsonl"


@dataclass(frozen=True)
class DistillExample:
    """One response under one target direction: the student's and the teacher's prompt."""

    prompt: tuple  # the conversation with the direction line (the student's input)
    teacher_prompt: tuple  # the same conversation with the instruction for the direction (the teacher's input)
    completion: str
    eos: bool  # the response ended with the end-of-turn token (else it is not taught to stop there)
    where: str = ""
    # mixture: the weights of the student's adapters (its prompt has no line)
    direction: tuple[float, ...] | None = None


def targets(direction: Direction, corners: bool) -> list[tuple[Direction, bool]]:
    """``(target, relabeled)``: the pool's own direction, then (``corners``) each corner it is not."""
    out = [(direction, False)]
    if corners:
        for o in direction.objectives:
            e = Direction.corner(o, direction.objectives)
            if e != direction:
                out.append((e, True))
    return out


def distill_rows(config, iteration: int, prompts, pools: list[dict], principles) -> tuple[list[dict], list[dict], dict]:
    """``(rows, samples, stats)`` of one iteration from its sampled pools (``pools``: items with
    ``slot``, ``prompt_index``, ``weights`` and ``cands`` as :func:`steer.training.dpa.sample_pools`
    gathers them). Each target's instruction is drawn from a stream seeded by (seed, iteration, slot,
    sample, target), so rows do not depend on how slots were split across ranks."""
    from steer.principles import instructed_messages

    from .dpa import Candidate, _weights

    objectives = config.objectives
    rows, samples = [], []
    for item in pools:
        s = item["slot"]
        d = Direction.from_weights(dict(zip(objectives, item["weights"])), objectives)
        conv = list(prompts[item["prompt_index"]])
        for j, c in enumerate(Candidate(*c) for c in item["cands"]):
            samples.append({"iteration": iteration, "slot": s, "prompt_index": item["prompt_index"],
                            "direction": _weights(d), "sample": j, "source": c.source, "instruction": c.instruction,
                            "response": c.text, "finished": c.finished, "tokens": c.tokens})
            if not c.text.strip():
                continue  # nothing to distill on
            for t, (e, relabeled) in enumerate(targets(d, config.corner_pairs)):
                rng = np.random.default_rng([config.seed, 17, iteration, s, j, t])
                instruction = principles.instruction(e, "positive", rng)
                student = condition_messages(conv, e) if config.prompt_carries_direction else list(conv)
                rows.append({"prompt": student, "teacher_prompt": instructed_messages(conv, instruction),
                             "completion": c.text, "finished": c.finished, "direction": _weights(e),
                             "instruction": instruction, "source": c.source, "sample_instruction": c.instruction,
                             "relabeled": relabeled, "iteration": iteration, "slot": s,
                             "prompt_index": item["prompt_index"], "sample": j})
    lengths = [r["tokens"] for r in samples]
    stats = {"slots": len(pools), "samples": len(samples), "rows": len(rows),
             "rows/relabeled": sum(r["relabeled"] for r in rows),
             "finished": float(np.mean([r["finished"] for r in samples])) if samples else None,
             "response_tokens": float(np.mean(lengths)) if lengths else None}
    for src in sorted({r["source"] for r in samples}):
        toks = [r["tokens"] for r in samples if r["source"] == src]
        stats[f"tokens/{src}"] = float(np.mean(toks))
        stats[f"finished/{src}"] = float(np.mean([r["finished"] for r in samples if r["source"] == src]))
    return rows, samples, stats


def examples_from_rows(rows: list[dict], objectives: tuple[str, ...] | None = None) -> list[DistillExample]:
    """Examples from ``distill.jsonl`` rows; a malformed row is named by its iteration and slot. With
    ``objectives`` (a mixture), each example carries its direction's weights in that order."""
    out = []
    for r in rows:
        where = r.get("where") or f"iteration {r.get('iteration')} slot {r.get('slot')} sample {r.get('sample')}"
        try:
            for key in ("prompt", "teacher_prompt", "completion", "finished"):
                if key not in r:
                    raise InvalidInput(key, "is missing (a distill row has prompt, teacher_prompt, completion "
                                       "and finished)")
            if not isinstance(r["completion"], str) or not r["completion"].strip():
                raise InvalidInput("completion", "is empty: there is nothing to distill on")
            direction = None
            if objectives is not None:
                if not isinstance(r.get("direction"), dict) or set(r["direction"]) != set(objectives):
                    raise InvalidInput("direction", f"must name exactly {list(objectives)}, got {r.get('direction')!r}")
                direction = tuple(float(r["direction"][o]) for o in objectives)
            out.append(DistillExample(parse_prompt(r["prompt"]), parse_prompt(r["teacher_prompt"], "teacher_prompt"),
                                      r["completion"], bool(r["finished"]), where, direction))
        except InvalidInput as e:
            raise InvalidInput(where, str(e)) from None
    return out


def encode_distill(examples: list[DistillExample], encoder: Encoder) -> list[EncodedExample]:
    """``sequences = (student, teacher)``: the same completion tokens after each prompt, cut to the
    same count (the longer prompt may leave less room under ``max_length``), so the two sequences'
    completion-predicting rows pair up one to one."""
    out = []
    pids = cached_prompt_ids(encoder)
    for ex in examples:
        student = encoder.encode(ex.prompt, ex.completion, ex.eos, ex.where, pids(ex.prompt))
        teacher = encoder.encode(ex.teacher_prompt, ex.completion, ex.eos, ex.where, pids(ex.teacher_prompt))
        n = min(student.completion_len, teacher.completion_len)
        out.append(EncodedExample((_cut(student, n), _cut(teacher, n)), direction=ex.direction))
    return out


def _cut(seq: TokenizedSequence, n: int) -> TokenizedSequence:
    return TokenizedSequence(seq.input_ids[: seq.prompt_len + n], seq.prompt_len, seq.prompt_truncated)


def distill_loss(student_logp: Tensor, teacher_logp: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Token-mean forward KL(teacher || student) over ``(N, V)`` log-probability rows (fp32).

    Forward KL (the teacher's mass weighs the student's errors) is what context distillation and
    Hinton-style distillation minimise; its gradient in the student's logits is ``softmax_s - p_t``."""
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(f"student and teacher rows differ: {tuple(student_logp.shape)} vs {tuple(teacher_logp.shape)}")
    p_t = teacher_logp.exp()  # (N, V)
    per_token = (p_t * (teacher_logp - student_logp)).sum(-1)  # (N,)
    loss = per_token.mean()
    with torch.no_grad():
        agree = (student_logp.argmax(-1) == teacher_logp.argmax(-1)).float().mean().item()
    return loss, {"loss": loss.item(), "kl": loss.item(), "kl/max": per_token.max().item(), "top1_agreement": agree}
