"""Serving benchmark: continuous batching vs one `generate()` per request, in one run.

For each concurrency level, N closed-loop clients stream requests (a fixed mix of prompts and
objective weights, sampled, `--max-new-tokens` each) and we record aggregate generated tokens/s
and p50/p99 latency and time to first token. Two systems, same requests, same machine, same run:

* steer: `python -m steer.serve` started as a subprocess, clients over gRPC;
* baseline: the same model in this process running one Hugging Face `generate()` per request,
  one at a time (concurrent generate() calls on a small CPU only thrash), with a streamer for
  the first token. No gRPC in between, which favours the baseline.

It also checks the served numerics (``--dtype``, ``--linears``) against plain fp32 torch: greedy
token agreement and teacher-forced log-prob drift. With `--strategies conditioned,mixture` the same
server (loaded with its mixture adapters) is measured for both strategies, level by level, and the
MIXTURE / CONDITIONED throughput ratio is printed. Writes JSON and prints the ratios.

Examples:
  python -m steer.server.bench                                  # the server's defaults, concurrency 1,4,16,32
  python -m steer.server.bench --dtype float32 --output bench-results/serve-fp32.json   # fp32 wherever it runs
  python -m steer.server.bench --concurrency 1,8 --max-new-tokens 32 --skip-baseline
  # MIXTURE vs CONDITIONED
  python -m steer.server.bench --strategies conditioned,mixture --concurrency 1,32 --skip-baseline
  python -m steer.server.bench --concurrency 1,32 --skip-baseline --linears int8   # weight-only int8 (and its quality)
  python -m steer.server.bench --concurrency 1,32 --skip-baseline --server-args="--max-prefill-tokens 2048"
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from steer.files import atomic_write_text

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works.",
    "Give me five ideas for a rainy weekend.",
    "What are the pros and cons of remote work?",
    "Describe the ocean to someone who has never seen it.",
    "How do I make a good cup of tea?",
    "Write a limerick about a forgetful cat.",
    "Why do we have seasons on Earth?",
]
OBJECTIVES = ("helpfulness", "creativity", "conciseness")


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


def write_results(path: str | Path, results: dict) -> None:
    """Write ``results`` as indented JSON to ``path`` (creating its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
    print(f"wrote {path}")


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        draws = [rng.expovariate(1.0) for _ in OBJECTIVES]
        out.append((PROMPTS[i % len(PROMPTS)], {k: d / sum(draws) for k, d in zip(OBJECTIVES, draws)}, 1000 + i))
    return out


def summarise(samples: list[Sample], wall: float) -> dict:
    lat = sorted(s.latency for s in samples)
    ttft = sorted(s.ttft for s in samples)

    def pct(xs, q):
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples), "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(pct(lat, 0.5), 3), "latency_p99_s": round(pct(lat, 0.99), 3),
        "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "tokens_per_request_mean": round(statistics.mean(s.tokens for s in samples), 1),
    }


def closed_loop(concurrency: int, jobs, run_one) -> dict:
    """``concurrency`` clients take jobs from a shared list until it is empty."""
    lock = threading.Lock()
    pending = list(jobs)
    samples: list[Sample] = []

    def client():
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop(0)
            samples.append(run_one(*job))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return summarise(samples, time.perf_counter() - start)


STRATEGIES = ("conditioned", "mixture")


def steer_runner(target: str, max_new_tokens: int, strategy: str = "conditioned"):
    import grpc

    from steer.v1 import steer_pb2 as pb
    from steer.v1 import steer_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = steer_pb2_grpc.SteerStub(channel)

    def run_one(prompt, weights, seed) -> Sample:
        req = pb.GenerateRequest(prompt=prompt, weights=weights, strategy=getattr(pb, f"STRATEGY_{strategy.upper()}"),
                                 sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9,
                                                            seed=seed))
        start = time.perf_counter()
        first = None
        tokens = 0
        for chunk in stub.GenerateStream(req, timeout=900):
            if first is None and chunk.delta:
                first = time.perf_counter()
            if chunk.finish_reason:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return Sample((first or end) - start, end - start, tokens)

    return run_one, channel


def baseline_runner(loaded, max_new_tokens: int):
    import torch
    from transformers.generation.streamers import BaseStreamer

    from steer.conditioning import render_prompt
    from steer.objectives import Direction

    tok = loaded.tokenizer
    model_lock = threading.Lock()

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls = 0
            self.first = None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def run_one(prompt, weights, seed) -> Sample:
        text = render_prompt(tok, [{"role": "user", "content": prompt}], Direction.from_weights(weights))
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        streamer = FirstToken()
        with model_lock, torch.inference_mode():
            torch.manual_seed(seed)
            out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                                        streamer=streamer, pad_token_id=tok.pad_token_id)
        end = time.perf_counter()
        return Sample((streamer.first or end) - start, end - start, int(out.shape[1] - ids.shape[1]))

    return run_one


def precision_quality(model_spec: str, prompts, dtype: str = "float32", linears: str = "auto",
                      new_tokens: int = 32) -> dict:
    """Greedy continuations of the served numerics (``dtype``, ``linears``) against plain fp32 torch:
    token agreement up to the first difference, and teacher-forced log-prob drift on the fp32 text."""
    import torch

    from steer.conditioning import render_prompt
    from steer.models import load_model
    from steer.objectives import Direction

    fp32 = load_model(model_spec, dtype="float32")
    served = load_model(model_spec, dtype=dtype, linears=linears)  # the served numerics
    tok = fp32.tokenizer
    agree, total, drift = 0, 0, []
    for prompt in prompts:
        text = render_prompt(tok, [{"role": "user", "content": prompt}], Direction.uniform())
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            a = fp32.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            b = served.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            n = min(a.shape[1], b.shape[1]) - ids.shape[1]
            # Position of the first disagreement counts as agreement up to there.
            same = (a[0, ids.shape[1]:ids.shape[1] + n] == b[0, ids.shape[1]:ids.shape[1] + n]).int()
            agree += int(same.cumprod(0).sum())
            total += n
            lp32 = torch.log_softmax(fp32.model(a).logits[0, ids.shape[1] - 1:-1].float(), -1)
            lpx = torch.log_softmax(served.model(a).logits[0, ids.shape[1] - 1:-1].float(), -1)
            targets = a[0, ids.shape[1]:]
            drift.append((lp32.gather(1, targets[:, None]) - lpx.gather(1, targets[:, None])).abs().mean().item())
    return {"dtype": dtype, "linears": linears, "greedy_prefix_agreement": round(agree / max(total, 1), 3),
            "mean_abs_logprob_drift": round(statistics.mean(drift), 4)}


def start_server(model: str, dtype: str, port: int, max_concurrent: int, scorer: str, mixture: str | None = None,
                 server_args: str = "") -> subprocess.Popen:
    extra = (["--mixture", mixture] if mixture is not None else []) + shlex.split(server_args)
    return subprocess.Popen([sys.executable, "-m", "steer.serve", "--model", model, "--dtype", dtype,
                             "--port", str(port), "--max-concurrent", str(max_concurrent), "--scorer", scorer,
                             "--log-level", "WARNING", *extra])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m steer.server.bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the server's --dtype (default: its default, auto: bfloat16 where the CPU/GPU multiplies it "
                        "natively, else float32); the baseline runs the same dtype")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: max(concurrency, 4))")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--scorer", default="default",
                   help="server's --scorer (default: 'default', what make serve runs; requests do not ask for rewards, "
                        "so generation is measured alone, like the baseline)")
    p.add_argument("--strategies", default="conditioned",
                   help="comma-separated: conditioned, mixture (both: the ratio at each level)")
    p.add_argument("--mixture", default=None,
                   help="the server's --mixture (default: its own default, the shipped mixture)")
    p.add_argument("--linears", default="auto", choices=["auto", "torch", "prepacked", "int8"],
                   help="the server's --linears (default: its default)")
    p.add_argument("--server-args", default="",
                   help="more flags for the server, e.g. '--max-prefill-tokens 2048' (recorded in the JSON)")
    p.add_argument("--output", default=None, help="JSON path (default bench-results/serve-<dtype>.json)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    strategies = [x.strip() for x in args.strategies.split(",") if x.strip()]
    if not strategies or any(x not in STRATEGIES for x in strategies):
        p.error(f"--strategies: choose from {', '.join(STRATEGIES)}, got {args.strategies!r}")

    import os

    from steer.client import free_port, wait_until_serving
    from steer.models import load_model, resolve_device, resolve_dtype
    from steer.threads import run_in_own_thread

    args.dtype = resolve_dtype(args.dtype, resolve_device("auto"))  # what the server will resolve it to
    output = Path(args.output or f"bench-results/serve-{args.dtype}.json")

    results = {"model": args.model, "dtype": args.dtype, "linears": args.linears, "max_new_tokens": args.max_new_tokens,
               "scorer": args.scorer, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "levels": {}}
    port = free_port()
    results["server_args"] = args.server_args
    server = start_server(args.model, args.dtype, port, max(levels), args.scorer, args.mixture,
                          f"--linears {args.linears} {args.server_args}")
    results["strategies"] = strategies
    try:
        target = f"127.0.0.1:{port}"
        print(f"bench: waiting for the server on {target} ...", flush=True)
        wait_until_serving(target, server, timeout=600)
        runners = {x: steer_runner(target, args.max_new_tokens, x) for x in strategies}
        for run_one, _ in runners.values():
            run_one(*workload(1, seed=99)[0])  # warm-up
        for c in levels:
            jobs = workload(args.requests or max(c, 4), seed=c)
            level = results["levels"].setdefault(str(c), {})
            for x, (run_one, _) in runners.items():
                stats = closed_loop(c, jobs, run_one)
                level["steer" if x == "conditioned" else f"steer_{x}"] = stats
                print(f"steer {x:<11} c={c:>3}: {stats['tokens_per_s']:8.1f} tok/s  p50 {stats['latency_p50_s']:.2f}s  "
                      f"p99 {stats['latency_p99_s']:.2f}s  ttft p50 {stats['ttft_p50_s']:.2f}s "
                      f"p99 {stats['ttft_p99_s']:.2f}s", flush=True)
            if "steer" in level and "steer_mixture" in level:
                level["mixture_vs_conditioned"] = round(
                    level["steer_mixture"]["tokens_per_s"] / level["steer"]["tokens_per_s"], 3)
                print(f"  -> MIXTURE / CONDITIONED throughput at c={c}: x{level['mixture_vs_conditioned']}", flush=True)
        for _, channel in runners.values():
            channel.close()
    finally:
        server.terminate()
        server.wait(timeout=60)

    if not args.skip_baseline:
        # Loaded in a thread that ends, as the server loads its model: at one stream the baseline's one
        # generating thread then has the only OpenMP team, like the engine's worker (steer.threads).
        loaded = run_in_own_thread(load_model, args.model, dtype=args.dtype)
        run_base = baseline_runner(loaded, args.max_new_tokens)
        run_base(*workload(1, seed=99)[0])  # warm-up
        for c in levels:
            jobs = workload(args.requests or max(c, 4), seed=c)
            stats = closed_loop(c, jobs, run_base)
            level = results["levels"][str(c)]
            level["baseline"] = stats
            ours = level.get("steer") or level[f"steer_{strategies[0]}"]
            level["throughput_ratio"] = round(ours["tokens_per_s"] / stats["tokens_per_s"], 2)
            level["ttft_p99_ratio"] = round(ours["ttft_p99_s"] / max(stats["ttft_p99_s"], 1e-9), 3)
            print(f"baseline  c={c:>3}: {stats['tokens_per_s']:8.1f} tok/s  p50 {stats['latency_p50_s']:.2f}s  "
                  f"p99 {stats['latency_p99_s']:.2f}s  ttft p50 {stats['ttft_p50_s']:.2f}s "
                  f"p99 {stats['ttft_p99_s']:.2f}s"
                  f"  -> steer/baseline throughput x{level['throughput_ratio']}", flush=True)
        del loaded
    results["quality"] = precision_quality(args.model, PROMPTS, args.dtype, args.linears)
    print(f"served numerics ({args.dtype}, linears {args.linears}) vs fp32 torch: {results['quality']}")
    write_results(output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
