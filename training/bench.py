"""Benchmark one DPO step (LoRA, sigmoid loss, adapter-disabled reference) with fused vs naive log-probs.

Each implementation runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

* ``fused``: completion rows only, through ``steer.kernels.linear_logprob`` (never ``N x V``).
* ``naive`` (baseline): full logits ``(B, T - 1, V)`` + ``log_softmax`` + ``gather``, as a plain
  transformers training loop computes them.

A step is the real trainer step (``PreferenceTrainer.train_step``): policy forward and backward
over the chosen and rejected sequences, a reference forward with the adapter off, AdamW. Inputs
are random token ids (the cost does not depend on the text): ``--pairs`` pairs of
``--seq-tokens`` tokens per sequence, the first ``--prompt-tokens`` of them prompt.

Examples:
  python -m steer.training.bench                                  # default model, 4 pairs x 256 tokens
  python -m steer.training.bench --pairs 8 --steps 5 --output bench-results/train-8.json
  python -m steer.training.bench --gradient-checkpointing          # activations recomputed: logits dominate memory
  python -m steer.training.bench --model runs/some-model --threads 2

Prints one JSON document (also written to --output) with tokens/s, seconds per step and peak RSS
per implementation, and the ratios naive / fused.
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

IMPLS = ("fused", "naive")


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


def child(args) -> dict:
    """Run in a fresh process: load, build a batch, time ``args.steps`` steps after ``args.warmup``."""
    import tempfile

    import torch

    from steer.training.distributed import DistContext
    from steer.training.pairs import EncodedExample, TokenizedSequence
    from steer.training.policy import build_policy
    from steer.training.settings import TrainerConfig
    from steer.training.trainer import PreferenceTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainerConfig(output=tempfile.mkdtemp(prefix="steer-bench-"), model=args.model, loss="sigmoid",
                           lora_r=args.lora_r, batch_size=args.pairs, max_length=args.seq_tokens + 1,
                           max_prompt_length=args.prompt_tokens, logprob_impl=args.impl, lr=1e-5, progress=False,
                           gradient_checkpointing=args.gradient_checkpointing)
    policy = build_policy(config.policy_spec())
    rss_loaded = _rss_mb()
    vocab = policy.base_model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    specials = set(policy.tokenizer.all_special_ids)

    def seq() -> TokenizedSequence:
        ids = [int(i) for i in torch.randint(0, vocab, (args.seq_tokens,), generator=g) if int(i) not in specials]
        while len(ids) < args.seq_tokens:
            ids.append(ids[-1])
        return TokenizedSequence(tuple(ids), args.prompt_tokens)

    data = [EncodedExample((seq(), seq())) for _ in range(args.pairs)]
    trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=args.warmup + args.steps)
    everything = [list(range(args.pairs))]
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step(data, everything)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(metrics["loss"])
    tokens = 2 * args.pairs * args.seq_tokens  # policy forward tokens per step (the reference pass reads them again)
    mean = sum(times) / len(times)
    return {
        "impl": args.impl, "threads": torch.get_num_threads(), "vocab": vocab,
        "tokens_per_step": tokens, "completion_tokens_per_step": 2 * args.pairs * (args.seq_tokens - args.prompt_tokens),
        "seconds_per_step": times, "mean_seconds_per_step": mean, "tokens_per_second": tokens / mean,
        "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "step_peak_over_load_mb": round(_peak_rss_mb() - rss_loaded, 1), "loss": losses,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m steer.training.bench", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="base model: 'default', a model directory or a .gguf file (default: default)")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step (default: 4)")
    p.add_argument("--seq-tokens", type=int, default=256, help="tokens per sequence, prompt included (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="of which prompt (masked, no loss) (default: 64)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder activations in backward, so "
                   "the log-prob part of the memory stands out (default: off)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to run (default: fused naive)")
    p.add_argument("--output", default="bench-results/train-step.json", help="where to write the JSON (default: %(default)s)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("pairs", "seq_tokens", "prompt_tokens", "steps"):
        if getattr(args, name) < 1:
            print(f"bench: error: {name}: must be >= 1", file=sys.stderr)
            return 2
    if args.prompt_tokens >= args.seq_tokens:
        print("bench: error: prompt_tokens: must be < seq_tokens", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for impl in args.impls:
        cmd = [sys.executable, "-m", "steer.training.bench", "--child", "--impl", impl, "--model", args.model,
               "--pairs", str(args.pairs), "--seq-tokens", str(args.seq_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--lora-r", str(args.lora_r), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        print(f"bench: {impl} ...", file=sys.stderr, flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if run.returncode != 0:
            print(run.stderr[-4000:], file=sys.stderr)
            return run.returncode
        results[impl] = json.loads(run.stdout.strip().splitlines()[-1])
    import torch

    report = {
        "benchmark": "one DPO step (sigmoid, LoRA, adapter-disabled reference), fused vs naive log-probs",
        "model": args.model, "pairs": args.pairs, "seq_tokens": args.seq_tokens, "prompt_tokens": args.prompt_tokens,
        "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing, "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "results": results,
    }
    if "fused" in results and "naive" in results:
        f, n = results["fused"], results["naive"]
        report["ratios"] = {
            "speedup_fused_over_naive": n["mean_seconds_per_step"] / f["mean_seconds_per_step"],
            "peak_rss_naive_over_fused": n["peak_rss_mb"] / f["peak_rss_mb"],
            "step_memory_naive_over_fused": n["step_peak_over_load_mb"] / max(f["step_peak_over_load_mb"], 1.0),
        }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    for impl, r in results.items():
        print(f"{impl:6s} {r['tokens_per_second']:8.1f} tokens/s  {r['mean_seconds_per_step']:6.2f} s/step  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['step_peak_over_load_mb']:.0f} MB over the loaded model)", file=sys.stderr)
    if "ratios" in report:
        r = report["ratios"]
        print(f"naive / fused: time x{r['speedup_fused_over_naive']:.2f}, peak RSS x{r['peak_rss_naive_over_fused']:.2f}, "
              f"step memory x{r['step_memory_naive_over_fused']:.2f}  (written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
