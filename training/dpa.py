"""``steer.train dpa``: Directional Preference Alignment, an online loop over directions.

Wang et al. 2024 ("Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference
Alignment with Multi-Objective Rewards"), with preference losses instead of rejection sampling
alone. Each iteration k:

1. **Directions.** ``prompts_per_iteration`` prompts (a seeded shuffle of the prompt file, cycled),
   ``directions_per_prompt`` directions each: a ``corner_share`` of them corners (all weight on
   one objective), the rest Dirichlet(``dirichlet_alpha``) mixes, all rounded to the two decimals
   the conditioning line shows (see :class:`steer.training.settings.DPAConfig`).
2. **Candidates.** A pool per (prompt, direction ``v``): ``samples`` responses of the *current*
   policy (adapter on), conditioned with :func:`steer.conditioning.condition_messages`; and,
   *principle-guided* (RLCD, Yang et al. 2023, arXiv 2307.12950), ``guided_samples`` responses of
   the *base* model (adapter off) under plain-language instructions chosen for ``v`` and
   ``contrast_samples`` under instructions against ``v`` (:mod:`steer.principles`). The base
   model follows such instructions where it ignores the numeric line, so the pool differs in
   what ``v`` weighs. ``--guided-samples 0 --contrast-samples 0`` is the plain on-policy loop.
3. **Rewards.** Each response's reward vector ``r`` (common scale) from the scorer, on the
   *unconditioned* conversation: the reward judges the answer to the user, not whether it obeyed
   the direction line. The scorer's model is the base (adapter switched off), a frozen copy for
   full fine-tuning, or ``--scorer-model``.
4. **Pairs.** For each (prompt, direction): chosen = argmax ``v . r``, rejected = argmin over the
   whole pool; the pair's prompt carries the direction line and no instruction; skipped
   when the margin is below ``min_margin`` (a near-tie is noise) or the two texts are equal.
   ``sft`` keeps every best response (rejection-sampling fine-tuning) and ignores the margin.
   ``--pair-by instruction`` skips step 3 and labels by the instructions instead (RLCD's own
   labels): each guided sample is chosen over a contrast sample of the same pool, for an
   objective the scorer cannot tell apart; ``--reject-cut-policy`` adds each on-policy sample
   that did not end as rejected against an ended guided sample (the policy's own loops).
5. **Train** ``epochs_per_iteration`` passes of the preference loss on the direction-conditioned
   prompts, continuing the same optimiser across iterations.

Every iteration writes ``iterations/<k>/samples.jsonl`` (every response, its reward vector and
``v . r``) and ``pairs.jsonl`` (TRL-format rows ``dpo`` can read again, with the direction, both
reward vectors and scores), and logs an ``iteration`` record to ``metrics.jsonl``. A checkpoint
is written at the end of every iteration (and every ``save_every`` steps); ``--resume`` continues
from it, re-reading a half-trained iteration's pairs instead of sampling them again.

Steps 1-4 are :mod:`steer.training.dpa_data`; this module runs the loop around them.
"""

from __future__ import annotations

import json
import logging
import sys

from steer.errors import InvalidInput
from steer.files import atomic_write_text, json_lines

from .checkpoint import CheckpointManager
from .config import config_to_dict, write_config
from .distributed import DistContext, barrier, run_in_process_group
from .dpa_data import (  # noqa: F401  (the data steps; re-exported for callers of this module)
    Candidate,
    IterationData,
    SampledPools,
    _jsonl,
    _saved_pool,
    _weights,
    choose_pair,
    collect,
    collect_distill,
    examples_from_pairs,
    pair_pool,
    pool_from_samples,
    prompt_schedule,
    read_prompts,
    sample_directions,
    sample_pools,
)
from .dpo import check_output, seed_everything
from .metrics import MetricsLogger, plot_curves
from .output_dir import check_output_dir
from .pairs import Encoder, encode_examples
from .policy import build_policy, load_base
from .settings import DPAConfig
from .trainer import PreferenceTrainer, reference_logps

log = logging.getLogger(__name__)
ITERATIONS = "iterations"


# -- the loop ---------------------------------------------------------------------------------

def run_dpa(config: DPAConfig) -> dict:
    """Run the whole command; returns a summary (also the last record of metrics.jsonl)."""
    return run_in_process_group(_run, config)


def _given_pairs(config: DPAConfig) -> list[dict] | None:
    """The pairs of ``--data`` (mixture only), read and checked; None when the run samples its own."""
    if not getattr(config, "data", ()):
        return None
    from .mixture import read_pair_files

    return read_pair_files(config.data, config.objectives)


def _pair_source(config: DPAConfig, scorer, given) -> str:
    """What chose the pairs, for the training curve's title."""
    if scorer is not None:
        return scorer.describe()
    return "given pairs" if given is not None else ("distilled" if config.loss == "distill" else "pairs by instruction")


def _build_scorer(config: DPAConfig, base, frozen, show_progress: bool = True):
    """The scorer, built on the *base* weights before any adapter is attached (FLR calibration is
    keyed by the weights it sees). Returns ``(scorer, shares_policy_weights)``."""
    from steer.models import LoadedModel
    from steer.rewards.build import build_scorer

    lm, tokenizer, base_dir = frozen if frozen is not None else base
    loaded = LoadedModel(model=lm, tokenizer=tokenizer, model_id=str(base_dir), adapter=None,
                         context_length=int(getattr(lm.config, "max_position_embeddings", 2048) or 2048))
    try:
        scorer = build_scorer(config.scorer, loaded, config.objectives, scorer_model=config.scorer_model,
                              calibration=config.scorer_calibration, field="scorer",
                              progress=config.progress and show_progress)
    except ValueError as e:  # InvalidInput included: name the flag
        raise e if isinstance(e, InvalidInput) else InvalidInput("scorer", str(e)) from e
    return scorer, frozen is None and config.scorer_model is None


def _run(config: DPAConfig, ctx: DistContext) -> dict:
    seed_everything(config.seed)
    output = check_output_dir(config.output)  # before the prompts and the model: creates nothing
    prompts = read_prompts(config.prompts_path)
    principles = None
    if config.uses_principles:
        from steer.principles import load_principles

        principles = load_principles(config.principles or None)
        principles.covers(config.objectives)
    base = load_base(config.model, config.dtype, ctx.device)
    # Full fine-tuning moves every weight, so scoring and the reference need a frozen copy of the start.
    frozen = None
    if config.full:
        frozen = load_base(str(base[2]), config.dtype, ctx.device)
        frozen[0].eval().requires_grad_(False)
    given = _given_pairs(config)  # mixture --data: pairs to train on, no sampling
    distill = config.loss == "distill"  # context distillation: rows, not pairs, and no rewards
    if given is not None or not config.scored:  # distill and instruction-labelled pairs score nothing
        scorer, scorer_shares_policy = None, False
    else:
        scorer, scorer_shares_policy = _build_scorer(config, base, frozen, show_progress=ctx.is_main)
    if config.prompt_carries_direction:
        policy = build_policy(config.policy_spec(), ctx.device, base=base)
    else:
        from .mixture import build_mixture_policy

        policy = build_mixture_policy(config.policy_spec(), config.objectives, ctx.device, base=base)
    encoder = Encoder(policy.tokenizer, config.max_length, config.max_prompt_length)
    if ctx.is_main:  # every input passed (the scorer spec included): a refused run leaves no empty directory
        output.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    manager = CheckpointManager(output, ctx, config.keep_checkpoints)
    ckpt = check_output(config, manager)

    command = "dpa" if config.prompt_carries_direction else "mixture"  # for progress lines and titles
    G = config.batch_size * config.grad_accum * ctx.world_size
    slots = config.prompts_per_iteration * config.directions_per_prompt
    per_slot = config.pool_size if distill else (config.instruction_pairs if config.pair_by == "instruction" else 1)
    if config.loss == "kto":
        per_slot *= 2  # a pair is two unpaired rows
    if config.corner_pairs:
        per_slot *= len(config.objectives)  # its own direction and the corners it is not
    iterations = 1 if given is not None else config.iterations
    per_iteration = len(given) if given is not None else slots * per_slot
    total = iterations * config.epochs_per_iteration * -(-per_iteration // G)  # at most; near-ties shrink it
    logger = MetricsLogger(output, ctx.is_main, resume_lines=ckpt.state["metrics_lines"] if ckpt else None,
                           elapsed=ckpt.state.get("elapsed", 0.0) if ckpt else 0.0)
    trainer = PreferenceTrainer(config, policy, ctx, total, manager, logger)

    start, cursor = 0, (0, 0)
    if ckpt is not None:
        state = trainer.restore(ckpt)
        start, cursor = state["extra"]["iteration"], tuple(state["cursor"])
        if cursor[0] >= config.epochs_per_iteration:  # that iteration was finished
            start, cursor = start + 1, (0, 0)
        log.info("resumed from %s (step %d, iteration %d)", ckpt.path, ckpt.step, start)
    else:
        if ctx.is_main:
            write_config(config, output / "config.yaml")
        logger.log({"type": "start", "step": 0, "prompts": len(prompts), "iterations": config.iterations,
                    "global_batch": G, "world_size": ctx.world_size,
                    "scorer": scorer.describe() if scorer is not None else None,
                    "trainable_parameters": sum(p.numel() for p in trainer.params)})

    for k in range(start, iterations):
        it_dir = output / ITERATIONS / f"{k:03d}"
        pairs_file = it_dir / ("distill.jsonl" if distill else "pairs.jsonl")
        samples_file = it_dir / "samples.jsonl"
        if given is not None:
            rows = given
        elif cursor != (0, 0) and pairs_file.is_file():  # resuming inside iteration k: train on the same pairs
            rows = [row for _, row in json_lines(pairs_file)]
        else:
            cursor = (0, 0)
            saved = _saved_pool(config, samples_file) if config.resume else None
            # sampled before the run stopped (or copied from another run): sample nothing
            if distill and saved is not None:
                from .distill import distill_rows

                log.info("iteration %d: distilling on the %d saved samples in %s", k,
                         sum(len(i["cands"]) for i in saved), samples_file)
                rows_, samples_, stats_ = distill_rows(config, k, prompts, saved, principles)
                got = IterationData(rows_, samples_, {**stats_, "seconds/sample": 0.0, "resampled": False})
            elif distill:
                got = collect_distill(config, k, prompts, policy, ctx, principles,
                                      base_model=frozen[0] if frozen is not None else None)
            elif saved is not None:  # sampled (and scored) before the run stopped: pair again, sample nothing
                log.info("iteration %d: re-pairing the %d saved samples in %s", k,
                         sum(len(i["cands"]) for i in saved), samples_file)
                got = pair_pool(config, k, prompts, saved,
                                {"seconds/sample": 0.0, "seconds/score": 0.0, "resampled": False})
            else:
                got = collect(config, k, prompts, policy, scorer, scorer_shares_policy, ctx, principles=principles,
                              base_model=frozen[0] if frozen is not None else None)
            rows = got.pairs
            if ctx.is_main:
                it_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(it_dir / "samples.jsonl", _jsonl(got.samples))
                atomic_write_text(pairs_file, _jsonl(rows))
            barrier(ctx)
            record = logger.log({"type": "iteration", "iteration": k, "step": trainer.step, **got.stats})
            if ctx.is_main and distill:
                print(f"{command} iteration {k}: {record['rows']} distillation rows from {record['samples']} responses "
                      f"({record['finished']:.0%} ended), sampling {record['seconds/sample']:.0f}s", file=sys.stderr)
            elif ctx.is_main and scorer is None:
                print(f"{command} iteration {k}: {record['pairs']} pairs labelled by instruction from "
                      f"{record['slots']} prompts x directions ({record['finished']:.0%} of responses ended), "
                      f"sampling {record['seconds/sample']:.0f}s", file=sys.stderr)
            elif ctx.is_main:
                print(f"{command} iteration {k}: {record['pairs']} pairs from {record['slots']} prompts x directions, "
                      f"mean v.r {record['score/mean']:+.3f} (best {record['score/best']:+.3f}), "
                      f"sampling {record['seconds/sample']:.0f}s, scoring {record['seconds/score']:.0f}s",
                      file=sys.stderr)
        if distill:
            from .distill import encode_distill, examples_from_rows

            examples = examples_from_rows(rows, None if config.prompt_carries_direction else config.objectives)
        else:
            examples = examples_from_pairs(rows, config.loss,
                                           None if config.prompt_carries_direction else config.objectives)
        if not examples:
            logger.log({"type": "skip", "iteration": k, "step": trainer.step, "reason": "every pair was a near-tie"})
            log.warning("iteration %d: no pairs (all below min_margin); no training this iteration", k)
        else:  # fewer than a global batch is fine: the trainer pads the epoch with repeats
            data = (encode_distill(examples, encoder) if distill
                    else encode_examples(examples, encoder, sft=config.loss == "sft"))
            trainer.ref = None
            if config.precomputes_reference:
                policy.model.eval()
                source = frozen[0] if frozen is not None else policy
                trainer.ref = reference_logps(source, data, ctx, batch_size=config.batch_size, impl=config.logprob_impl,
                                              precision=trainer.precision)
                policy.model.train()
            trainer.fit(data, epochs=config.epochs_per_iteration, cursor=cursor, salt=k + 1,
                        extra_state=lambda k=k: {"iteration": k}, record={"iteration": k},
                        desc=f"{command}/{config.loss} it {k}")
        cursor = (0, 0)
        latest = manager.latest()
        if latest is None or latest.step != trainer.step or latest.state["extra"].get("iteration") != k:
            trainer.save((config.epochs_per_iteration, 0), {"iteration": k})
    summary = {"type": "summary", "step": trainer.step, "config": config_to_dict(config)}
    if ctx.is_main:
        summary["saved"] = str(policy.save(output))
        logger.log(summary)
        plot_curves(output, title=f"steer {command} ({config.loss}, "
                                  f"{_pair_source(config, scorer, given)})")
        atomic_write_text(output / "summary.json", json.dumps(summary, indent=1))
    barrier(ctx)
    return summary
