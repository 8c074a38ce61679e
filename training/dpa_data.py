"""The data of one DPA iteration (steps 1-4 of :mod:`steer.training.dpa`): the prompt schedule and the
sampled directions, the candidate pools (policy samples and principle-guided base-model samples),
their rewards, and the preference pairs chosen from them; also the JSONL rows written per
iteration and read back on ``--resume``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from steer.conditioning import condition_messages
from steer.errors import InvalidInput
from steer.files import json_lines
from steer.objectives import Direction

from .distributed import DistContext, all_gather_object
from .pairs import PairExample, pairs_to_unpaired, parse_prompt, read_rows
from .policy import Policy
from .settings import DPAConfig

log = logging.getLogger(__name__)


# -- prompts and directions -------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[tuple[dict[str, str], ...]]:
    """Conversations from rows ``{"prompt": text | messages}`` (other columns ignored); errors name file:line."""
    out = []
    for where, row in read_rows(path):
        try:
            if row.get("prompt") is None:
                raise InvalidInput("prompt", "is missing (a prompt row is {\"prompt\": text or messages})")
            conv = parse_prompt(row["prompt"])
            condition_messages(conv, Direction.uniform())  # refuses a system message that already carries a direction
        except InvalidInput as e:
            raise InvalidInput(where, str(e)) from None
        out.append(conv)
    return out


def prompt_schedule(n_prompts: int, per_iteration: int, iteration: int, seed: int) -> list[int]:
    """Prompt indices of one iteration: positions [k*m, (k+1)*m) of an endless stream of seeded
    shuffles, so every prompt is used once before any is used again."""
    out = []
    start = iteration * per_iteration
    for pos in range(start, start + per_iteration):
        round_, offset = divmod(pos, n_prompts)
        perm = np.random.default_rng([seed, 7, round_]).permutation(n_prompts)
        out.append(int(perm[offset]))
    return out


def quantize(direction: Direction) -> Direction:
    """The nearest direction whose weights are whole hundredths summing to exactly 1 (largest-remainder
    rounding), so the two-decimal conditioning line states it exactly and v . r uses what the policy reads.
    (Rounding each weight alone can sum to 0.99 or 1.01, and the line would then mean another direction.)"""
    scaled = [w * 100 for w in direction.weights]
    units = [int(math.floor(x)) for x in scaled]
    by_remainder = sorted(range(len(units)), key=lambda i: scaled[i] - units[i], reverse=True)
    for i in by_remainder[: 100 - sum(units)]:
        units[i] += 1
    return Direction.from_weights({o: u / 100 for o, u in zip(direction.objectives, units)}, direction.objectives)


def sample_directions(n: int, objectives: tuple[str, ...], rng: np.random.Generator, corner_share: float,
                      alpha: float) -> list[Direction]:
    """``round(corner_share * n)`` corners (objectives in turn from a random start) and Dirichlet(alpha)
    mixes for the rest, in a random order; each quantised to two decimals."""
    k = len(objectives)
    n_corner = int(round(corner_share * n))
    start = int(rng.integers(k))
    directions = [Direction.corner(objectives[(start + i) % k], objectives) for i in range(n_corner)]
    for _ in range(n - n_corner):
        w = rng.dirichlet([alpha] * k)
        directions.append(quantize(Direction.from_weights(dict(zip(objectives, w.tolist())), objectives)))
    order = rng.permutation(n)
    return [directions[i] for i in order]


# -- one iteration's data ---------------------------------------------------------------------

@dataclass
class IterationData:
    pairs: list[dict]  # rows of pairs.jsonl
    samples: list[dict]  # rows of samples.jsonl
    stats: dict  # the iteration record's numbers


def _score_context(policy: Policy, shares_policy_weights: bool):
    return policy.reference() if (policy.lora and shares_policy_weights) else contextlib.nullcontext()


POLICY, GUIDED, CONTRAST = "policy", "guided", "contrast"  # where a candidate came from


@dataclass(frozen=True)
class Candidate:
    text: str
    finished: bool  # ended with the end-of-turn token
    tokens: int
    source: str  # POLICY (current policy, direction line), GUIDED / CONTRAST (base model, instruction for / against v)
    instruction: str | None  # the principle text a base-model candidate was sampled under


def candidate_requests(config: DPAConfig, principles, directions: list[Direction], slot_ids: list[int],
                       iteration: int) -> list[tuple[int, str, str]]:
    """``(position in slot_ids, source, instruction)`` for every base-model candidate: ``guided_samples``
    instructions for the slot's direction, then ``contrast_samples`` against it. Each slot draws from
    its own seeded stream, so the instructions do not depend on how slots are split across ranks."""
    out = []
    for a, s in enumerate(slot_ids):
        rng = np.random.default_rng([config.seed, 13, iteration, s])
        out += [(a, GUIDED, principles.instruction(directions[s], "positive", rng))
                for _ in range(config.guided_samples)]
        out += [(a, CONTRAST, principles.instruction(directions[s], "negative", rng))
                for _ in range(config.contrast_samples)]
    return out


def choose_pair(scores: list[float], texts: list[str], min_margin: float, sft: bool) -> tuple[int, int, str | None]:
    """``(chosen, rejected, skip reason)``: argmax and argmin of ``v . r`` over the pool; a pair is
    skipped (reason ``"equal"`` or ``"margin"``) when both texts are the same or the margin is below
    ``min_margin`` (a near-tie is noise). ``sft`` keeps the best whatever the margin."""
    hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
    if sft:
        return hi, lo, None
    if texts[hi] == texts[lo]:
        return hi, lo, "equal"
    if scores[hi] - scores[lo] < min_margin:
        return hi, lo, "margin"
    return hi, lo, None


def _generate_sorted(model, tokenizer, conversations, params, *, batch_size, seed, progress, keys, end_ramp=None):
    """One sample per conversation, generated in order of ``keys`` (rows expected to be about as long
    share a batch, so short answers do not wait for long ones), returned in the input order."""
    from steer.generation import generate_batch

    order = sorted(range(len(conversations)), key=lambda i: keys[i])
    gens = generate_batch(model, tokenizer, [conversations[i] for i in order], [None] * len(order), params,
                          num_samples=1, batch_size=batch_size, seed=seed, progress=progress, end_ramp=end_ramp)
    out = [None] * len(order)
    for pos, i in enumerate(order):
        out[i] = gens[pos][0]
    return out


@dataclass
class SampledPools:
    """Steps 1-2 of one iteration on this rank: its slots' candidates (``pool[a]`` for ``slots[mine[a]]``)."""

    slots: list[int]  # prompt index of every (prompt, direction) slot of the iteration
    directions: list[Direction]  # per slot
    mine: list[int]  # the slots this rank sampled
    pool: list[list[Candidate]]  # per slot of ``mine``
    seconds: float

    def items(self) -> list[dict]:
        """This rank's pools as plain rows (what ranks exchange and ``samples.jsonl`` holds)."""
        return [{"slot": s, "prompt_index": self.slots[s], "weights": list(self.directions[s].weights),
                 "cands": [tuple(c.__dict__.values()) for c in self.pool[a]]} for a, s in enumerate(self.mine)]


def sample_pools(config: DPAConfig, iteration: int, prompts, policy: Policy, ctx: DistContext, principles=None,
                 base_model=None) -> SampledPools:
    """Steps 1-2 of the module docstring for iteration ``iteration``, this rank's share of the slots.

    ``principles`` (a :class:`steer.principles.Principles`) and ``base_model`` (the model the guided and
    contrast candidates come from: ``None`` means the policy with its adapter switched off) are needed
    when ``config.guided_samples + config.contrast_samples > 0``."""
    from steer.generation import EndRamp, generate_batch
    from steer.principles import instructed_messages
    from steer.sampling import SamplingParams

    rng = np.random.default_rng([config.seed, 11, iteration])
    prompt_idx = prompt_schedule(len(prompts), config.prompts_per_iteration, iteration, config.seed)
    slots = [p for p in prompt_idx for _ in range(config.directions_per_prompt)]
    directions = sample_directions(len(slots), config.objectives, rng, config.corner_share, config.dirichlet_alpha)
    mine = list(range(ctx.rank, len(slots), ctx.world_size))  # each rank samples and scores its share
    show = config.progress and ctx.is_main

    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                            dry_multiplier=config.dry_multiplier)
    ramp = EndRamp.over_cap(config.max_new_tokens, config.end_ramp_start, config.end_ramp_bias)
    policy.model.eval()  # no LoRA dropout while sampling
    t0 = time.monotonic()
    pool: list[list[Candidate]] = [[] for _ in mine]
    if config.samples:
        # dpa: the policy reads the direction line; a mixture answers the plain prompt through the mix of
        # its adapters for the direction (each row its own weights).
        line = config.prompt_carries_direction
        gens = generate_batch(
            policy.model, policy.tokenizer, [prompts[slots[s]] for s in mine],
            [directions[s] if line else None for s in mine], params,
            num_samples=config.samples, batch_size=config.generation_batch_size,
            seed=config.seed * 7919 + iteration * 104_729 + ctx.rank, progress=show,
            mix_weights=None if line else [directions[s].weights for s in mine], end_ramp=ramp,
        )
        for a, row in enumerate(gens):
            pool[a] += [Candidate(g.text, g.finished, len(g.token_ids), POLICY, None) for g in row]
    if config.guided_samples + config.contrast_samples:
        requests = candidate_requests(config, principles, directions, mine, iteration)
        conversations = [instructed_messages(prompts[slots[mine[a]]], text) for a, _, text in requests]
        # Contrast and guided rows apart, and rows of the same instruction objective together:
        # similar lengths per batch.
        keys = [(src, text.split(".")[0], a) for a, src, text in requests]
        context = policy.reference() if base_model is None else contextlib.nullcontext()
        with context:
            gens = _generate_sorted(base_model if base_model is not None else policy.model, policy.tokenizer,
                                    conversations, params, batch_size=config.generation_batch_size,
                                    seed=config.seed * 7919 + iteration * 104_729 + 7 * ctx.world_size + ctx.rank,
                                    progress=show, keys=keys, end_ramp=ramp)
        for (a, src, text), g in zip(requests, gens):
            pool[a].append(Candidate(g.text, g.finished, len(g.token_ids), src, text))
    policy.model.train()
    return SampledPools(slots, directions, mine, pool, time.monotonic() - t0)


def collect(config: DPAConfig, iteration: int, prompts, policy: Policy, scorer, scorer_shares_policy: bool,
            ctx: DistContext, principles=None, base_model=None) -> IterationData:
    """Steps 1-4 of the module docstring for iteration ``iteration``; every rank gets the same result.
    ``principles`` and ``base_model``: see :func:`sample_pools`. ``scorer`` is None under
    ``pair_by="instruction"``: the pools are paired unscored."""
    got = sample_pools(config, iteration, prompts, policy, ctx, principles, base_model)
    if scorer is None:  # --pair-by instruction: the instructions label the pairs, nothing is scored
        merged = sorted((item for part in all_gather_object(ctx, got.items()) for item in part),
                        key=lambda x: x["slot"])
        return pair_pool(config, iteration, prompts, merged, {"seconds/sample": round(got.seconds, 3)})
    t1 = time.monotonic()
    conversations = [list(prompts[got.slots[s]]) for a, s in enumerate(got.mine) for _ in got.pool[a]]
    texts = [c.text for cands in got.pool for c in cands]
    policy.model.eval()
    with _score_context(policy, scorer_shares_policy):
        # raw and scaled (n candidates, k), on the unconditioned conversation
        rewards = scorer.rewards(conversations, texts)
    policy.model.train()
    t2 = time.monotonic()

    local, at = got.items(), 0
    for a, item in enumerate(local):
        rows = slice(at, at + len(got.pool[a]))
        at += len(got.pool[a])
        item["scaled"], item["raw"] = rewards.scaled[rows].tolist(), rewards.raw[rows].tolist()  # (pool, k) each
    merged = sorted((item for part in all_gather_object(ctx, local) for item in part), key=lambda x: x["slot"])
    return pair_pool(config, iteration, prompts, merged,
                     {"seconds/sample": round(got.seconds, 3), "seconds/score": round(t2 - t1, 3)})


def collect_distill(config: DPAConfig, iteration: int, prompts, policy: Policy, ctx: DistContext, principles,
                    base_model=None) -> IterationData:
    """Steps 1-2, then the distillation rows of :mod:`steer.training.distill` (no scoring); every rank
    gets the same result. ``IterationData.pairs`` holds the rows."""
    from .distill import distill_rows

    got = sample_pools(config, iteration, prompts, policy, ctx, principles, base_model)
    merged = sorted((item for part in all_gather_object(ctx, got.items()) for item in part), key=lambda x: x["slot"])
    rows, samples, stats = distill_rows(config, iteration, prompts, merged, principles)
    return IterationData(rows, samples, {**stats, "seconds/sample": round(got.seconds, 3)})


def _saved_pool(config: DPAConfig, samples_file: Path) -> list[dict] | None:
    """The scored pools in ``samples_file`` when they fit this config (same slots and pool size), else None."""
    if not samples_file.is_file():
        return None
    rows = [row for _, row in json_lines(samples_file)]
    try:
        pools = pool_from_samples(rows, config.objectives, scored=config.scored)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s does not hold scored pools (%s); sampling again", samples_file, e)
        return None
    slots = config.prompts_per_iteration * config.directions_per_prompt
    if len(pools) != slots or any(len(p["cands"]) != config.pool_size for p in pools):
        log.warning("%s holds %d pools of sizes %s, this config asks for %d of %d; sampling again", samples_file,
                    len(pools), sorted({len(p["cands"]) for p in pools}), slots, config.pool_size)
        return None
    return pools


def pool_from_samples(rows: list[dict], objectives: tuple[str, ...], scored: bool = True) -> list[dict]:
    """The scored pools of an iteration, rebuilt from its ``samples.jsonl`` rows (what :func:`collect`
    gathers before pairing): ``--resume`` re-pairs a sampled iteration instead of sampling it again.
    ``scored=False`` (distillation, whose samples carry no rewards): the candidates only."""
    by_slot: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: (r["slot"], r["sample"])):
        item = by_slot.setdefault(r["slot"], {"slot": r["slot"], "prompt_index": r["prompt_index"],
                                              "weights": [float(r["direction"][o]) for o in objectives],
                                              "cands": [], "scaled": [], "raw": []})
        item["cands"].append((r["response"], r["finished"], r["tokens"], r["source"], r["instruction"]))
        if scored:
            item["scaled"].append([float(r["rewards"][o]) for o in objectives])
            item["raw"].append([float(r["rewards_raw"][o]) for o in objectives])
    return [by_slot[s] for s in sorted(by_slot)]


def _sample_row(iteration: int, item: dict, d: Direction, j: int, c: Candidate) -> dict:
    """One ``samples.jsonl`` row: candidate ``j`` of a pool, without its scores."""
    return {"iteration": iteration, "slot": item["slot"], "prompt_index": item["prompt_index"],
            "direction": _weights(d), "sample": j, "source": c.source, "instruction": c.instruction,
            "response": c.text, "finished": c.finished, "tokens": c.tokens}


def _source_stats(samples: list[dict]) -> dict:
    """Mean tokens and share ended, per candidate source."""
    out = {}
    for src in (POLICY, GUIDED, CONTRAST):
        rows = [r for r in samples if r["source"] == src]
        if rows:
            out[f"tokens/{src}"] = float(np.mean([r["tokens"] for r in rows]))
            out[f"finished/{src}"] = float(np.mean([r["finished"] for r in rows]))
    return out


def pair_by_instruction(config: DPAConfig, iteration: int, prompts, merged: list[dict],
                        timings: dict) -> IterationData:
    """Step 4 under ``pair_by="instruction"`` (RLCD's labels): in each (prompt, direction) pool, guided
    sample i is chosen over contrast sample i (the base model answered instructions for and against
    the direction), so nothing is scored; a pair of two equal texts is skipped. With
    ``chosen_must_end`` only guided samples that ended are paired (the i-th ended one with contrast
    sample i); a contrast sample left without one is skipped. With ``reject_cut_policy`` the i-th
    on-policy sample that did not end is rejected against ended guided sample i (cycling through them;
    skipped when the slot has none); on-policy samples that ended are left unpaired."""
    objectives = config.objectives
    pairs, samples, skipped, cut, policy_cut, no_chosen = [], [], 0, 0, 0, 0
    for item in merged:
        d = Direction.from_weights(dict(zip(objectives, item["weights"])), objectives)
        conv = list(prompts[item["prompt_index"]])
        cands = [Candidate(*c) for c in item["cands"]]
        samples += [_sample_row(iteration, item, d, j, c) for j, c in enumerate(cands)]
        guided = [c for c in cands if c.source == GUIDED]
        contrast = [c for c in cands if c.source == CONTRAST]
        ended = [c for c in guided if c.finished]
        if config.chosen_must_end:
            cut += min(len(guided), len(contrast)) - min(len(ended), len(contrast))
            guided = ended
        matched = list(zip(guided, contrast))
        if config.reject_cut_policy:
            cut_policy = [c for c in cands if c.source == POLICY and not c.finished]
            policy_cut += len(cut_policy)
            if ended:
                matched += [(ended[i % len(ended)], c) for i, c in enumerate(cut_policy)]
            else:
                no_chosen += len(cut_policy)
        for g, r in matched:
            if g.text == r.text:
                skipped += 1
                continue
            pairs.append({
                "prompt": condition_messages(conv, d) if config.prompt_carries_direction else list(conv),
                "chosen": g.text, "rejected": r.text, "direction": _weights(d),
                "chosen_instruction": g.instruction, "rejected_instruction": r.instruction,
                "chosen_finished": g.finished, "rejected_finished": r.finished,
                "chosen_source": GUIDED, "rejected_source": r.source, "relabeled": False,
                "iteration": iteration, "slot": item["slot"], "prompt_index": item["prompt_index"],
            })
    policy_stats = {}
    if config.reject_cut_policy:
        policy_stats = {"pairs/policy_rejected": sum(p["rejected_source"] == POLICY for p in pairs),
                        "policy_cut": policy_cut, "skipped/policy_no_ended_guided": no_chosen}
    stats = {
        "slots": len(merged), "samples": len(samples), "pairs": len(pairs), "skipped/equal": skipped,
        "skipped/chosen_cut": cut, **policy_stats,
        "finished": float(np.mean([r["finished"] for r in samples])) if samples else None,
        "chosen_finished": float(np.mean([p["chosen_finished"] for p in pairs])) if pairs else None,
        "response_tokens": float(np.mean([r["tokens"] for r in samples])) if samples else None,
        **_source_stats(samples), **timings,
    }
    return IterationData(pairs, samples, stats)


def pair_pool(config: DPAConfig, iteration: int, prompts, merged: list[dict], timings: dict) -> IterationData:
    """Step 4: score every candidate of every (prompt, direction) pool by ``v . r`` (minus
    ``missing_eos_penalty`` when it was cut at ``max_new_tokens``), pick the pairs, and describe them.
    Under ``pair_by="instruction"`` the pools are unscored: :func:`pair_by_instruction`."""
    if config.pair_by == "instruction":
        return pair_by_instruction(config, iteration, prompts, merged, timings)
    objectives = config.objectives
    pairs, samples = [], []
    skipped = {"margin": 0, "equal": 0}
    chosen_from = {POLICY: 0, GUIDED: 0, CONTRAST: 0}
    rejected_from = dict(chosen_from)
    all_scores, best, worst, margins, lengths, finished = [], [], [], [], [], []
    chosen_finished, corner = [], []
    for item in merged:
        s = item["slot"]
        d = Direction.from_weights(dict(zip(objectives, item["weights"])), objectives)
        conv = list(prompts[item["prompt_index"]])
        cands = [Candidate(*c) for c in item["cands"]]
        v = torch.tensor(d.weights, dtype=torch.float32)  # (k,)
        scores = (torch.tensor(item["scaled"], dtype=torch.float32) @ v).tolist()  # (pool,) v . r
        ranked = [sc - (0.0 if c.finished else config.missing_eos_penalty) for sc, c in zip(scores, cands)]
        for j, c in enumerate(cands):
            samples.append({**_sample_row(iteration, item, d, j, c),
                            "rewards": dict(zip(objectives, item["scaled"][j])),
                            "rewards_raw": dict(zip(objectives, item["raw"][j])),
                            "score": scores[j], "pair_score": ranked[j]})
            lengths.append(c.tokens)
            finished.append(c.finished)
        all_scores.extend(scores)
        if max(d.weights) == 1.0:
            corner.extend(scores)
        # The pool's own direction, then (corner_pairs) every corner it is not: the reward vectors do
        # not depend on the direction, so the same pool also says what each corner prefers.
        targets = [(d, False)]
        if config.corner_pairs:
            for i in range(len(objectives)):
                e = Direction.from_weights({objectives[i]: 1.0}, objectives)
                if e != d:
                    targets.append((e, True))
        for e, relabeled in targets:
            if relabeled:
                ve = torch.tensor(e.weights, dtype=torch.float32)
                e_scores = (torch.tensor(item["scaled"], dtype=torch.float32) @ ve).tolist()
                e_ranked = [sc - (0.0 if c.finished else config.missing_eos_penalty) for sc, c in zip(e_scores, cands)]
            else:
                e_scores, e_ranked = scores, ranked
            hi, lo, reason = choose_pair(e_ranked, [c.text for c in cands], config.min_margin, config.loss == "sft")
            if not relabeled:
                best.append(scores[hi])
                worst.append(scores[lo])
            if reason is not None:
                skipped[reason] += 1
                continue
            margin = e_ranked[hi] - e_ranked[lo]
            margins.append(margin)
            chosen_from[cands[hi].source] += 1
            rejected_from[cands[lo].source] += 1
            chosen_finished.append(cands[hi].finished)
            pairs.append({
                "prompt": condition_messages(conv, e) if config.prompt_carries_direction else list(conv),
                "chosen": cands[hi].text, "rejected": cands[lo].text if hi != lo else None,
                "direction": _weights(e), "chosen_rewards": dict(zip(objectives, item["scaled"][hi])),
                "rejected_rewards": dict(zip(objectives, item["scaled"][lo])), "chosen_score": e_scores[hi],
                "rejected_score": e_scores[lo], "margin": margin, "chosen_finished": cands[hi].finished,
                "rejected_finished": cands[lo].finished,
                "chosen_source": cands[hi].source, "rejected_source": cands[lo].source, "relabeled": relabeled,
                "iteration": iteration, "slot": s, "prompt_index": item["prompt_index"],
            })
    reward_means = torch.tensor([r for it in merged for r in it["scaled"]]).mean(0).tolist()  # (k,)
    by_source = _source_stats(samples)
    stats = {
        "slots": len(merged), "samples": len(all_scores), "pairs": len(pairs),
        "pairs/relabeled": sum(p["relabeled"] for p in pairs),
        "skipped/margin": skipped["margin"], "skipped/equal": skipped["equal"],
        **{f"chosen/{k}": v for k, v in chosen_from.items()}, **{f"rejected/{k}": v for k, v in rejected_from.items()},
        "score/mean": float(np.mean(all_scores)), "score/best": float(np.mean(best)),
        "score/worst": float(np.mean(worst)),
        "score/corner_mean": float(np.mean(corner)) if corner else None,
        "margin/mean": float(np.mean(margins)) if margins else None,
        **{f"reward/{o}": m for o, m in zip(objectives, reward_means)},
        "finished": float(np.mean(finished)),
        "chosen_finished": float(np.mean(chosen_finished)) if chosen_finished else None,
        "response_tokens": float(np.mean(lengths)), **by_source, **timings,
    }
    return IterationData(pairs, samples, stats)


def examples_from_pairs(rows: list[dict], loss: str, objectives: tuple[str, ...] | None = None) -> list[PairExample]:
    """Training examples from pairs.jsonl rows (for dpa the direction is already in the prompt's system
    message; with ``objectives``, a mixture's, each example carries its direction's weights in that order).
    A response that ran out of tokens gets no end-of-turn token, so stopping there is not taught."""
    out = []
    for r in rows:
        where = r.get("where") or f"iteration {r['iteration']} slot {r['slot']}"
        rejected = r["rejected"] if r["rejected"] is not None else ""
        direction = tuple(float(r["direction"][o]) for o in objectives) if objectives is not None else None
        out.append(PairExample(tuple(r["prompt"]), r["chosen"], rejected, where, bool(r["chosen_finished"]),
                               bool(r["rejected_finished"]), direction))
    return pairs_to_unpaired(out) if loss == "kto" else out


def _weights(d: Direction) -> dict[str, float]:
    """The direction for the JSONL files: two-decimal weights are exact after rounding away float noise."""
    return {o: round(w, 6) for o, w in d.as_dict().items()}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
