"""\
Benchmark one DPO step (sigmoid, LoRA r16 on every linear layer) as ``python -m steer.train dpo`` runs it, against TRL.

Each configuration runs in its own subprocess, so that its peak RSS (``ru_maxrss``, the whole
process: load included) is its own. All of them train on the *same* token ids: ``--pairs`` pairs of
``--seq-tokens`` tokens per sequence, the first ``--prompt-tokens`` of them a prompt shared by the
chosen and the rejected sequence (random ids: the cost does not depend on the text).

* ``steer``: the defaults of ``python -m steer.train dpo`` (the configuration a user gets).
* ``steer-no-trim``: the defaults with ``--no-release-memory``: glibc keeps freed activation memory
  in its heap (faster, about twice the peak RSS; see ``steer.training.memory``).
* ``steer-fp32``: ``--precision fp32 --no-gradient-checkpointing --no-release-memory``, everything
  fp32 and every activation kept: the configuration for bit-for-bit studies, and the first wave's step.
* ``naive``: the defaults, but log-probs from full ``(B, T - 1, V)`` logits instead of the fused op.
* ``trl``: TRL's ``DPOTrainer`` with its own defaults (``DPOConfig``: gradient checkpointing, bf16
  autocast where the hardware has it) and a PEFT LoRA config of the same rank and targets; the
  reference is the adapter-disabled model, as in steer. Needs ``pip install 'steer[bench]'``;
  skipped with a note when TRL is not installed.
* ``trl-fp32``: the same with ``bf16=False``. On a CPU without native bf16 (AVX2), TRL's default
  autocast runs emulated bf16 matmuls, ~8x slower than fp32: this is TRL at its best there.

A step is one optimiser step: reference pass, policy forward and backward, clipping, AdamW.

Examples:
  python -m steer.training.bench                                  # every configuration but naive: 4 pairs x 256 tokens
  python -m steer.training.bench --impls steer trl --steps 5
  python -m steer.training.bench --impls steer naive --output bench-results/fused-vs-naive.json
  python -m steer.training.bench --threads 1                      # every configuration on one thread

Prints one JSON document (also written to --output) with tokens/s, seconds per step and peak RSS
per configuration, and the ratios the benchmark exists for: steer over TRL (speed, and TRL's peak
RSS over steer's), steer over steer-fp32, fused over naive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from steer.files import atomic_write_text

IMPLS = ("steer", "steer-no-trim", "steer-fp32", "naive", "trl", "trl-fp32")
DEFAULT_IMPLS = ("steer", "steer-no-trim", "steer-fp32", "trl", "trl-fp32")
TRL_IMPLS = ("trl", "trl-fp32")
# TrainerConfig overrides of each steer configuration (the rest: the dpo command's defaults).
STEER_OVERRIDES = {
    "steer": {},
    "steer-no-trim": {"release_memory": False},
    "steer-fp32": {"precision": "fp32", "gradient_checkpointing": False, "release_memory": False},
    "naive": {"logprob_impl": "naive"},
}


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KB


def bench_pairs(tokenizer, vocab: int, args) -> list[tuple[list[int], list[int]]]:
    """``args.pairs`` (chosen, rejected) id lists of ``args.seq_tokens``, sharing their first
    ``args.prompt_tokens`` ids; seeded, no special tokens; the same for every configuration."""
    import torch

    g = torch.Generator().manual_seed(0)
    specials = set(tokenizer.all_special_ids)

    def ids(n: int) -> list[int]:
        out = [int(i) for i in torch.randint(0, vocab, (n,), generator=g) if int(i) not in specials]
        while len(out) < n:
            out.append(out[-1])
        return out

    pairs = []
    for _ in range(args.pairs):
        prompt = ids(args.prompt_tokens)
        pairs.append((prompt + ids(args.seq_tokens - args.prompt_tokens),
                      prompt + ids(args.seq_tokens - args.prompt_tokens)))
    return pairs


def _summary(args, times: list[float], losses: list[float], rss_loaded: float, extra: dict) -> dict:
    tokens = 2 * args.pairs * args.seq_tokens  # policy forward tokens per step (the reference pass reads them again)
    mean = sum(times) / len(times)
    return {
        "impl": args.impl, **extra,
        "tokens_per_step": tokens,
        "completion_tokens_per_step": 2 * args.pairs * (args.seq_tokens - args.prompt_tokens),
        "seconds_per_step": times, "mean_seconds_per_step": mean, "tokens_per_second": tokens / mean,
        "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "step_peak_over_load_mb": round(_peak_rss_mb() - rss_loaded, 1), "loss": losses,
    }


def child_steer(args) -> dict:
    """One steer configuration in this (fresh) process: the trainer step ``steer.train dpo`` runs."""
    import tempfile

    import torch
    from steer.training.distributed import DistContext
    from steer.training.pairs import EncodedExample, TokenizedSequence
    from steer.training.policy import build_policy
    from steer.training.settings import TrainerConfig
    from steer.training.trainer import PreferenceTrainer

    from steer.threads import configure_threads

    config = TrainerConfig(output=tempfile.mkdtemp(prefix="steer-bench-"), model=args.model, loss="sigmoid",
                           lora_r=args.lora_r, batch_size=args.pairs, max_length=args.seq_tokens + 1,
                           max_prompt_length=args.prompt_tokens, lr=1e-5, progress=False, threads=args.threads,
                           **STEER_OVERRIDES[args.impl])
    configure_threads(config.threads)
    policy = build_policy(config.policy_spec())
    rss_loaded = _rss_mb()
    vocab = policy.base_model.get_output_embeddings().weight.shape[0]
    data = [EncodedExample((TokenizedSequence(tuple(c), args.prompt_tokens),
                            TokenizedSequence(tuple(r), args.prompt_tokens)))
            for c, r in bench_pairs(policy.tokenizer, vocab, args)]
    trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=args.warmup + args.steps)
    everything = [list(range(args.pairs))]
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step(data, everything)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(metrics["loss"])
    return _summary(args, times, losses, rss_loaded, {
        "threads": torch.get_num_threads(), "precision": trainer.precision, "vocab": vocab,
        "gradient_checkpointing": config.gradient_checkpointing, "logprob_impl": config.logprob_impl,
        "release_memory": config.release_memory, "heap_trims": trainer.trimmer.trims if trainer.trimmer else 0,
    })


def child_trl(args) -> dict:
    """TRL's DPOTrainer with its defaults on the same token ids (pre-tokenised: TRL's collator input)."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback

    from steer.models import load_tokenizer, resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    rss_loaded = _rss_mb()
    vocab = model.get_output_embeddings().weight.shape[0]
    P = args.prompt_tokens
    rows = [{"prompt_ids": c[:P], "chosen_ids": c[P:], "rejected_ids": r[P:]}
            for c, r in bench_pairs(tokenizer, vocab, args)]

    class PreTokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *unused, **unused_kw):  # the ids are TRL's tokenised columns already
            return dataset

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *unused, **unused_kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *unused, **unused_kw):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    config = trl.DPOConfig(output_dir=tempfile.mkdtemp(prefix="steer-bench-trl-"),
                           per_device_train_batch_size=args.pairs,
                           max_steps=args.warmup + args.steps, learning_rate=1e-5, max_length=None, logging_steps=1,
                           save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                           dataloader_num_workers=0, seed=0, disable_tqdm=True,
                           **({"bf16": False} if args.impl == "trl-fp32" else {}))
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = PreTokenized(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                           peft_config=peft_config, callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][args.warmup:]
    return _summary(args, timer.times[args.warmup:], losses, rss_loaded, {
        "threads": torch.get_num_threads(), "trl": trl.__version__, "bf16": bool(config.bf16), "vocab": vocab,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    })


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m steer.training.bench", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="base model: 'default', a model directory or a .gguf file (default: default)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (default: 4)")
    p.add_argument("--seq-tokens", type=int, default=256, help="tokens per sequence, prompt included (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="of which prompt (masked, no loss) (default: 64)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r, as steer's default) (default: 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for every configuration (default 0: "
                   "steer's choice from the CPUs this process may use; TRL gets torch's default)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(DEFAULT_IMPLS),
                   help=f"configurations to run (default: {' '.join(DEFAULT_IMPLS)}; "
                   "trl is skipped when not installed)")
    p.add_argument("--output", default="bench-results/train-step.json",
                   help="where to write the JSON (default: %(default)s)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    return p


# (label, numerator, denominator): each gives tokens_per_second_<label> and peak_rss_<label>.
RATIOS = (
    ("steer_over_trl", "steer", "trl"),
    ("steer_over_trl_fp32", "steer", "trl-fp32"),
    ("steer_no_trim_over_trl", "steer-no-trim", "trl"),
    ("steer_no_trim_over_trl_fp32", "steer-no-trim", "trl-fp32"),
    ("steer_over_fp32", "steer", "steer-fp32"),
)


def _ratios(results: dict) -> dict:
    out = {}
    for label, num, den in RATIOS:
        if num in results and den in results:
            out[f"tokens_per_second_{label}"] = results[num]["tokens_per_second"] / results[den]["tokens_per_second"]
            out[f"peak_rss_{label}"] = results[num]["peak_rss_mb"] / results[den]["peak_rss_mb"]
    if "steer" in results and "naive" in results:  # the fused op's own figures: how much the naive path costs
        out["tokens_per_second_fused_over_naive"] = (results["steer"]["tokens_per_second"]
                                                     / results["naive"]["tokens_per_second"])
        out["peak_rss_naive_over_fused"] = results["naive"]["peak_rss_mb"] / results["steer"]["peak_rss_mb"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("pairs", "seq_tokens", "prompt_tokens", "steps", "lora_r"):
        if getattr(args, name) < 1:
            print(f"bench: error: {name}: must be >= 1", file=sys.stderr)
            return 2
    for name in ("warmup", "threads"):
        if getattr(args, name) < 0:
            print(f"bench: error: {name}: must be >= 0", file=sys.stderr)
            return 2
    if args.prompt_tokens >= args.seq_tokens:
        print("bench: error: prompt_tokens: must be < seq_tokens", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(child_trl(args) if args.impl in TRL_IMPLS else child_steer(args)))
        return 0
    results, skipped = {}, {}
    for impl in dict.fromkeys(args.impls):
        if impl in TRL_IMPLS and not trl_available():
            skipped[impl] = "TRL is not installed: pip install 'steer[bench]'"
            print(f"bench: {impl} skipped: {skipped[impl]}", file=sys.stderr, flush=True)
            continue
        cmd = [sys.executable, "-m", "steer.training.bench", "--child", "--impl", impl, "--model", args.model,
               "--pairs", str(args.pairs), "--seq-tokens", str(args.seq_tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--lora-r", str(args.lora_r), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        print(f"bench: {impl} ...", file=sys.stderr, flush=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        # what `python -m steer.train` sets before torch loads; TRL runs with the environment as it is
        if impl not in TRL_IMPLS:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(run.stderr[-4000:], file=sys.stderr)
            return run.returncode
        results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
    import torch

    report = {
        "benchmark": "one DPO optimiser step (sigmoid, LoRA, adapter-disabled reference): "
                     "steer's defaults vs fp32 vs TRL",
        "model": args.model, "pairs": args.pairs, "seq_tokens": args.seq_tokens, "prompt_tokens": args.prompt_tokens,
        "lora_r": args.lora_r, "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": os.getloadavg(), "results": results, "skipped": skipped, "ratios": _ratios(results),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    for impl, r in results.items():
        print(f"{impl:10s} {r['tokens_per_second']:8.1f} tokens/s  {r['mean_seconds_per_step']:6.2f} s/step  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['step_peak_over_load_mb']:.0f} MB over the loaded model)",
              file=sys.stderr)
    for name, value in report["ratios"].items():
        print(f"{name}: x{value:.2f}", file=sys.stderr)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
