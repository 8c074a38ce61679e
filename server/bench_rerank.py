"""RERANK best-of-n latency against one CONDITIONED sample, over real gRPC, in one run.

The server is loaded as ``python -m steer.serve`` loads it (the default adapter and mixture for the
default model, ``--dtype auto``, ``--linears auto``) with ``--scorer``. Baseline: a CONDITIONED Generate (one sample,
no rewards asked, so no scoring), reported as the call's wall time and as the engine's generation
time (``timing.total_seconds``). Measured: a RERANK Generate with ``--candidates`` samples (submitted
together, so the batching engine decodes them as one batch), each scored, best ``v . r``
returned. Same prompts, weights, seeds and ``max_new_tokens``, alternated request by request so
both see the same machine load. Also times a Score call on the n candidates alone, which is the
scoring share of RERANK. Prints the latency ratio (target <= 1.6x) and writes JSON.

Examples:
  python -m steer.server.bench_rerank                                   # default model, 4 candidates
  python -m steer.server.bench_rerank --max-new-tokens 32 --repeats 1 --output bench-results/rerank.json
  python -m steer.server.bench_rerank --scorer-dtype bfloat16 --output bench-results/rerank_bf16_judge.json
  python -m steer.server.bench_rerank --model ./tiny-model --scorer default
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from steer.files import atomic_write_text
from steer.models import DTYPE_AUTO, DTYPES

PROMPTS = [
    "Explain how photosynthesis works.",
    "Give me three ideas for a rainy weekend.",
    "Why do we have seasons on Earth?",
    "Write a short poem about a lighthouse.",
]
WEIGHTS = {"helpfulness": 0.6, "creativity": 0.2, "conciseness": 0.2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--scorer", default="default", help="scorer spec, as python -m steer.serve --scorer")
    p.add_argument("--scorer-dtype", default="float32", choices=[DTYPE_AUTO, *DTYPES],
                   help="the FLR judge's weights, as python -m steer.serve --scorer-dtype (default: its default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="the served weights' dtype, as python -m steer.serve --dtype (default: its default, auto)")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    p.add_argument("--output", default="bench-results/rerank_latency.json")
    args = p.parse_args(argv)

    import grpc
    import torch
    from steer.server.app import ServerConfig, start_server
    from steer.server.engine import EngineConfig

    from steer.models import default_adapter_for, default_mixture_for, load_model
    from steer.sampling import SamplingParams
    from steer.threads import run_in_own_thread
    from steer.v1 import steer_pb2 as pb
    from steer.v1 import steer_pb2_grpc

    # As steer.serve loads it: in a thread that ends, so the engine's worker is the only OpenMP team (steer.threads).
    loaded = run_in_own_thread(load_model, args.model, adapter=default_adapter_for(args.model),
                               mixture=default_mixture_for(args.model), dtype=args.dtype, linears="auto")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    config = ServerConfig(port=0, scorer=args.scorer, scorer_dtype=args.scorer_dtype,
                          engine=EngineConfig(max_new_tokens=max(args.max_new_tokens, 16)),
                          sampling_defaults=SamplingParams(max_new_tokens=args.max_new_tokens))
    started = time.monotonic()
    running = asyncio.run_coroutine_threadsafe(start_server(loaded, config), loop).result()
    startup = time.monotonic() - started
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = steer_pb2_grpc.SteerStub(channel)
    scorer = stub.Describe(pb.DescribeRequest(), timeout=30).scorer
    if not scorer:
        print("the server runs no scorer: RERANK is unavailable", file=sys.stderr)
        return 2

    def request(prompt, seed, strategy, **kw):
        return pb.GenerateRequest(prompt=prompt, weights=WEIGHTS, strategy=strategy, sampling=pb.SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed), **kw)

    def timed(call, *a, **kw):
        t = time.perf_counter()
        out = call(*a, **kw)
        return time.perf_counter() - t, out

    # Warm-up: the first forwards of a fresh process are slower (allocator, thread pools).
    stub.Generate(request(PROMPTS[0], 0, pb.STRATEGY_CONDITIONED), timeout=600)
    stub.Generate(request(PROMPTS[0], 0, pb.STRATEGY_RERANK, candidates=args.candidates), timeout=600)

    rows = []
    for r in range(args.repeats):
        for i, prompt in enumerate(PROMPTS):
            seed = 100 * r + i
            t_cond, cond = timed(stub.Generate, request(prompt, seed, pb.STRATEGY_CONDITIONED), timeout=600)
            t_rr, rr = timed(stub.Generate, request(prompt, seed, pb.STRATEGY_RERANK, candidates=args.candidates,
                                                    return_candidates=True), timeout=600)
            texts = [c.text for c in rr.candidates if c.text.strip()]
            t_score, _ = timed(stub.Score, pb.ScoreRequest(prompt=prompt, responses=texts, weights=WEIGHTS),
                               timeout=600)
            rows.append({
                "prompt": prompt, "seed": seed,
                "conditioned_s": round(t_cond, 3), "conditioned_generation_s": round(cond.timing.total_seconds, 3),
                "conditioned_tokens": cond.usage.completion_tokens,
                "rerank_s": round(t_rr, 3), "rerank_tokens_all_candidates": rr.usage.completion_tokens,
                "score_candidates_s": round(t_score, 3),
                "ratio": round(t_rr / t_cond, 3),
            })
            print(f"{prompt[:40]:40s} conditioned {t_cond:6.2f}s ({cond.usage.completion_tokens} tok)  "
                  f"rerank {t_rr:6.2f}s ({rr.usage.completion_tokens} tok)  score {t_score:5.2f}s  "
                  f"ratio {t_rr / t_cond:.2f}x")
    channel.close()
    asyncio.run_coroutine_threadsafe(running.stop(0), loop).result()

    cond_med = statistics.median(r["conditioned_s"] for r in rows)
    gen_med = statistics.median(r["conditioned_generation_s"] for r in rows)
    rr_med = statistics.median(r["rerank_s"] for r in rows)
    score_med = statistics.median(r["score_candidates_s"] for r in rows)
    result = {
        "model": loaded.model_id, "dtype": str(loaded.model.dtype).removeprefix("torch."), "scorer": scorer,
        "scorer_dtype": args.scorer_dtype,
        "candidates": args.candidates,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature, "engine": "continuous batching (server/engine.py), max_concurrent 32",
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "server_startup_s": round(startup, 2),
        "conditioned_median_s": round(cond_med, 3), "conditioned_generation_only_median_s": round(gen_med, 3),
        "rerank_median_s": round(rr_med, 3), "ratio_vs_generation_only": round(rr_med / gen_med, 3),
        "score_candidates_median_s": round(score_med, 3),
        "ratio_median": round(rr_med / cond_med, 3), "target_ratio": 1.6, "rows": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"RERANK best-of-{args.candidates}: median {rr_med:.2f}s vs CONDITIONED {cond_med:.2f}s "
          f"-> {rr_med / cond_med:.2f}x "
          f"(target <= 1.6x); vs CONDITIONED generation alone {gen_med:.2f}s -> {rr_med / gen_med:.2f}x; "
          f"scoring {args.candidates} candidates alone {score_med:.2f}s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
