"""Benchmark of the fused linear log-prob against the naive path and the GEMMs that bound it.

    python -m steer.kernels.bench                      # N=4096 H=576 V=49152, fp32 on CPU
    python -m steer.kernels.bench --n 512 --repeats 3  # quick run
    python -m steer.kernels.bench --out /tmp/k.json    # JSON elsewhere (default bench-results/kernels.json)

CPU (fp32, the chunked torch path), per shape:
  time    median over --repeats of fwd+bwd (grads of hidden and weight) of the fused path, of the
          naive path, and of the four GEMMs of the op at full size (X W^T, its recompute, dX = G W,
          dW = G^T X) into preallocated outputs: their sum is the GEMM floor. The same four GEMMs
          at the fused path's chunk shapes are reported too (the chunked floor: what the fused
          path would take with zero non-GEMM work). All measured interleaved in one run; the
          headline ratio is the median over repeats of fused / floor of the same repeat.
  memory  peak extra resident memory of one fwd+bwd, each path in its own fresh subprocess:
          inputs are allocated and touched, a 16-row warm-up initialises the BLAS/OpenMP pools,
          the kernel's peak-RSS mark is reset (/proc/self/clear_refs), the op runs keeping its
          gradients alive, and the new peak minus the RSS before is reported (dX and dW included).
On a shared machine, run with OMP_WAIT_POLICY=PASSIVE as well: by default idle OpenMP threads
spin, and when another process holds one of the cores every parallel region then waits out a
scheduler slice. That costs per region, so it penalises the chunked loop (hundreds of regions)
far more than four big GEMMs; the policy is recorded in the JSON.
CUDA (bf16, the Triton path): the same timings with CUDA events plus achieved TFLOP/s
(8 N H V FLOPs: four GEMM-sized products), peak memory from torch.cuda.max_memory_allocated,
and a second shape N=16384 H=4096 V=128256.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("bench-results/kernels.json")
CPU_SHAPE = (4096, 576, 49152)
CUDA_EXTRA_SHAPE = (16384, 4096, 128256)
# The targets for the CPU fused path, checked and reported (not asserted).
TARGET_TIME_OVER_FLOOR = 1.10
TARGET_MEMORY_OVER_NAIVE = 0.07


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_inputs(n, h, v, dtype, device, seed=0):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype)  # (N, H)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5 * 3).to(device, dtype)  # (V, H), logits std ~3
    targets = torch.randint(0, v, (n,), generator=gen).to(device)  # (N,)
    grad_out = torch.randn(n, generator=gen).to(device)  # (N,) upstream gradient
    return hidden, weight, targets, grad_out


def fwd_bwd(path: str, hidden, weight, targets, grad_out):
    """One forward + backward of `path` ('fused' or 'naive'); returns the leaves holding .grad."""
    from steer.kernels import linear_logprob, naive_linear_logprob

    x = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "fused":
        logp = linear_logprob(x, w, targets)
    else:
        logp, _, _ = naive_linear_logprob(x, w, targets)
    logp.backward(grad_out)
    return x, w


class Timer:
    """(wall, process CPU) seconds of a callable, synchronising CUDA around it.

    On a shared CPU, wall time also counts the time this process waited for a core (and every
    OpenMP barrier waits for the slowest thread); CPU time does not, so both are recorded.
    """

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def __call__(self, fn) -> tuple[float, float]:
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def time_shape(n, h, v, dtype, device, repeats, chunk_rows):
    """Interleaved timings: every repeat runs each candidate once, so load drifts hit all alike.

    `chunk_rows`: the CPU path's rows per chunk, for the chunked GEMM floor (None on CUDA: the
    Triton path does not chunk).
    """
    import torch

    timer = Timer(torch.device(device))
    hidden, weight, targets, grad_out = make_inputs(n, h, v, dtype, device)
    grad_logits = torch.empty(n, v, device=device, dtype=dtype).normal_()  # (N, V) stand-in for G
    logits = torch.empty(n, v, device=device, dtype=dtype)  # (N, V) GEMM output, preallocated
    dx = torch.empty(n, h, device=device, dtype=dtype)
    dw = torch.empty(v, h, device=device, dtype=dtype)
    candidates = {
        "fused_fwd_bwd": lambda: fwd_bwd("fused", hidden, weight, targets, grad_out),
        "naive_fwd_bwd": lambda: fwd_bwd("naive", hidden, weight, targets, grad_out),
        "gemm_fwd": lambda: torch.mm(hidden, weight.t(), out=logits),
        "gemm_recompute": lambda: torch.mm(hidden, weight.t(), out=logits),
        "gemm_dx": lambda: torch.mm(grad_logits, weight, out=dx),
        "gemm_dw": lambda: torch.mm(grad_logits.t(), hidden, out=dw),
    }
    if chunk_rows:
        c = min(chunk_rows, n)
        slab = torch.empty(v * c, device=device, dtype=dtype)  # (V * C,) viewed (V, c) as the CPU path does
        dw_acc = torch.zeros(v, h, device=device, dtype=dtype)

        def chunked(kind):  # the GEMMs of logprob_torch's chunk loop, same shapes and layouts
            for start in range(0, n, c):
                x = hidden[start : start + c]  # (c, H)
                z = slab[: v * x.shape[0]].view(v, x.shape[0])  # (V, c)
                if kind == "fwd":
                    torch.mm(weight, x.t(), out=z)
                elif kind == "dx":
                    torch.mm(z.t(), weight, out=dx[start : start + x.shape[0]])
                else:
                    dw_acc.addmm_(z, x)

        candidates.update({
            "chunked_gemm_fwd": lambda: chunked("fwd"),
            "chunked_gemm_dx": lambda: chunked("dx"),
            "chunked_gemm_dw": lambda: chunked("dw"),
        })
    samples = {name: [] for name in candidates}
    cpu_samples = {name: [] for name in candidates}
    for name, fn in candidates.items():  # warm-up: page in buffers, initialise BLAS / compile kernels
        try:
            fn()
        except torch.OutOfMemoryError:
            samples[name] = None
            torch.cuda.empty_cache()
    for r in range(repeats):
        for name, fn in candidates.items():
            if samples[name] is None:
                continue
            wall, cpu = timer(fn)
            samples[name].append(wall)
            cpu_samples[name].append(cpu)
        log(f"  repeat {r + 1}/{repeats}: fused {samples['fused_fwd_bwd'][-1]:.3f} s, "
            f"naive {samples['naive_fwd_bwd'][-1] if samples['naive_fwd_bwd'] else float('nan'):.3f} s, "
            f"GEMMs {sum(samples[k][-1] for k in ('gemm_fwd', 'gemm_recompute', 'gemm_dx', 'gemm_dw')):.3f} s")
    med = {name: (statistics.median(s) if s else None) for name, s in samples.items()}
    floor = med["gemm_fwd"] + med["gemm_recompute"] + med["gemm_dx"] + med["gemm_dw"]
    chunked = bool(chunk_rows)
    # the fused path runs the chunked forward GEMM twice (forward and recompute)
    chunked_floor = 2 * med["chunked_gemm_fwd"] + med["chunked_gemm_dx"] + med["chunked_gemm_dw"] if chunked else None
    # Per-repeat ratios (fused and the floor measured seconds apart) and their median: steadier
    # than a ratio of medians when the machine's load changes during the run.
    floor_r = [sum(samples[k][r] for k in ("gemm_fwd", "gemm_recompute", "gemm_dx", "gemm_dw")) for r in range(repeats)]
    per_repeat = {"fused_over_gemm_floor": [f / g for f, g in zip(samples["fused_fwd_bwd"], floor_r)]}
    if chunked:
        chunked_r = [2 * samples["chunked_gemm_fwd"][r] + samples["chunked_gemm_dx"][r] + samples["chunked_gemm_dw"][r]
                     for r in range(repeats)]
        per_repeat["fused_over_chunked_gemm_floor"] = [f / g for f, g in zip(samples["fused_fwd_bwd"], chunked_r)]
    best = {name: (min(s) if s else None) for name, s in samples.items()}
    best_floor = best["gemm_fwd"] + best["gemm_recompute"] + best["gemm_dx"] + best["gemm_dw"]
    flops = 8 * n * h * v  # fwd + recompute + dX + dW, 2 N H V each
    result = {
        "median_s": {**med, "gemm_floor": floor, "chunked_gemm_floor": chunked_floor},
        "samples_s": samples,
        "per_repeat_ratios": per_repeat,
    }
    if not timer.cuda:
        cpu_med = {name: (statistics.median(s) if s else None) for name, s in cpu_samples.items()}
        cpu_floor = cpu_med["gemm_fwd"] + cpu_med["gemm_recompute"] + cpu_med["gemm_dx"] + cpu_med["gemm_dw"]
        result["cpu_time"] = {
            "median_s": {**cpu_med, "gemm_floor": cpu_floor},
            "fused_over_gemm_floor": cpu_med["fused_fwd_bwd"] / cpu_floor,
            "naive_over_gemm_floor": cpu_med["naive_fwd_bwd"] / cpu_floor,
        }
    result.update({
        "ratios": {
            "fused_over_gemm_floor": statistics.median(per_repeat["fused_over_gemm_floor"]),
            "fused_over_gemm_floor_of_medians": med["fused_fwd_bwd"] / floor,
            # other load only ever adds time, so the fastest repeat of each is its least disturbed one
            "fused_over_gemm_floor_of_minima": best["fused_fwd_bwd"] / best_floor,
            "fused_over_chunked_gemm_floor": (
                statistics.median(per_repeat["fused_over_chunked_gemm_floor"]) if chunked else None),
            "naive_over_gemm_floor": med["naive_fwd_bwd"] / floor if med["naive_fwd_bwd"] else None,
            "naive_over_fused": med["naive_fwd_bwd"] / med["fused_fwd_bwd"] if med["naive_fwd_bwd"] else None,
        },
        "tflops": {
            "fused": flops / med["fused_fwd_bwd"] / 1e12,
            "gemm_floor": flops / floor / 1e12,
        },
    })
    return result


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def memory_probe(path: str, n: int, h: int, v: int) -> dict:
    """Runs in a fresh subprocess: peak extra RSS of one fwd+bwd of `path` on CPU, fp32."""
    import gc

    import torch

    hidden, weight, targets, grad_out = make_inputs(n, h, v, torch.float32, "cpu")
    # Warm-up on 16 rows with the full weight: thread pools and the BLAS library's packing buffers
    # (MKL keeps ~10 MB for these operands from the first GEMM on, for the life of the process)
    # belong to the process, not to the op.
    fwd_bwd(path, hidden[:16], weight, targets[:16], grad_out[:16])
    gc.collect()
    before, _ = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    x, w = fwd_bwd(path, hidden, weight, targets, grad_out)
    _, peak = rss_bytes()
    assert x.grad is not None and w.grad is not None  # gradients alive at the measurement
    return {"peak_extra_bytes": peak - before, "rss_before_bytes": before}


def measure_memory(n, h, v, threads: int | None = None) -> dict:
    out = {}
    for path in ("fused", "naive"):
        log(f"  memory of {path} (subprocess)")
        cmd = [sys.executable, "-m", "steer.kernels.bench", "--memory-probe", path,
               "--n", str(n), "--h", str(h), "--v", str(v)]
        cmd += ["--threads", str(threads)] if threads else []
        env = {**os.environ, "STEER_KERNELS": "torch"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe for {path} failed:\n{proc.stderr[-3000:]}")
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    grads = 4 * (n * h + v * h)  # dX and dW, fp32
    fused, naive = out["fused"]["peak_extra_bytes"], out["naive"]["peak_extra_bytes"]
    return {
        "method": "VmHWM - VmRSS around one fwd+bwd in a fresh subprocess per path, peak reset via "
                  "/proc/self/clear_refs after the inputs and a 16-row warm-up (BLAS buffers); "
                  "gradients kept alive",
        "fused_peak_extra_bytes": fused,
        "naive_peak_extra_bytes": naive,
        "fused_over_naive": fused / naive,
        "grads_bytes": grads,
        "grads_over_naive": grads / naive,
        "fused_workspace_bytes": fused - grads,
    }


def cuda_memory(n, h, v, dtype) -> dict:
    import torch

    hidden, weight, targets, grad_out = make_inputs(n, h, v, dtype, "cuda")
    out = {}
    for path in ("fused", "naive"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            x, w = fwd_bwd(path, hidden, weight, targets, grad_out)
            torch.cuda.synchronize()
            out[f"{path}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            del x, w
        except torch.OutOfMemoryError:
            out[f"{path}_peak_extra_bytes"] = None
    if out["naive_peak_extra_bytes"]:
        out["fused_over_naive"] = out["fused_peak_extra_bytes"] / out["naive_peak_extra_bytes"]
    out["method"] = "torch.cuda.max_memory_allocated() over the allocated bytes before the call"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steer.kernels.bench",
        description="Fused linear log-prob vs the naive path and the GEMM floor; prints a summary, writes JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m steer.kernels.bench\n"
               "  python -m steer.kernels.bench --n 512 --repeats 3 --skip-memory\n"
               "  python -m steer.kernels.bench --threads 1   # steadier on a shared machine\n"
               "  OMP_WAIT_POLICY=PASSIVE python -m steer.kernels.bench   # idle threads sleep, not spin\n"
               "  python -m steer.kernels.bench --out /tmp/kernels.json\n"
               "  make bench-kernels",
    )
    parser.add_argument("--n", type=int, default=CPU_SHAPE[0], help="tokens N (default %(default)s)")
    parser.add_argument("--h", type=int, default=CPU_SHAPE[1], help="hidden size H (default %(default)s)")
    parser.add_argument("--v", type=int, default=CPU_SHAPE[2], help="vocabulary V (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, median reported (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-memory", action="store_true", help="timings only")
    parser.add_argument("--memory-probe", choices=("fused", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("n", "h", "v", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    if args.memory_probe:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(memory_probe(args.memory_probe, args.n, args.h, args.v)))
        return 0

    import torch
    from steer.kernels.logprob import select_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    from steer.kernels.logprob_torch import chunk_rows_for

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [(args.n, args.h, args.v)]
    if cuda and (args.n, args.h, args.v) == CPU_SHAPE:
        shapes.append(CUDA_EXTRA_SHAPE)
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": select_backend(device, dtype),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": [],
    }
    for n, h, v in shapes:
        chunk = min(chunk_rows_for(v, dtype), n) if not cuda else None  # CPU path's rows per chunk
        log(f"N={n} H={h} V={v} {report['dtype']} on {report['device']} ({report['backend']} path"
            + (f", chunk {chunk} rows)" if chunk else ")"))
        run = {"shape": {"N": n, "H": h, "V": v}, "chunk_rows": chunk}
        run.update(time_shape(n, h, v, dtype, device, args.repeats, chunk))
        if not args.skip_memory:
            run["memory"] = cuda_memory(n, h, v, dtype) if cuda else measure_memory(n, h, v, args.threads)
        if not cuda:
            run["targets"] = {
                "time_over_gemm_floor_max": TARGET_TIME_OVER_FLOOR,
                "time_met": run["ratios"]["fused_over_gemm_floor"] <= TARGET_TIME_OVER_FLOOR,
                "memory_over_naive_max": TARGET_MEMORY_OVER_NAIVE,
                "memory_met": (
                    run["memory"]["fused_over_naive"] <= TARGET_MEMORY_OVER_NAIVE if "memory" in run else None),
            }
        report["runs"].append(run)
        print_summary(run)
    report["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def print_summary(run: dict) -> None:
    med, ratios = run["median_s"], run["ratios"]
    s = run["shape"]
    print(f"N={s['N']} H={s['H']} V={s['V']}" + (f", chunk {run['chunk_rows']} rows" if run["chunk_rows"] else "")
          + " (medians)")
    print(f"  fused fwd+bwd       {med['fused_fwd_bwd']:8.3f} s   {run['tflops']['fused']:.3f} TFLOP/s")
    if med["naive_fwd_bwd"]:
        print(f"  naive fwd+bwd       {med['naive_fwd_bwd']:8.3f} s   "
              f"({ratios['naive_over_fused']:.2f}x the fused time)")
    print(f"  GEMM floor          {med['gemm_floor']:8.3f} s   (fwd {med['gemm_fwd']:.3f} + recompute "
          f"{med['gemm_recompute']:.3f} + dX {med['gemm_dx']:.3f} + dW {med['gemm_dw']:.3f})")
    if med["chunked_gemm_floor"] is not None:
        print(f"  chunked GEMM floor  {med['chunked_gemm_floor']:8.3f} s")
    print(f"  fused / GEMM floor  {ratios['fused_over_gemm_floor']:8.3f}    (median of per-repeat ratios; "
          f"ratio of medians {ratios['fused_over_gemm_floor_of_medians']:.3f}, of minima "
          f"{ratios['fused_over_gemm_floor_of_minima']:.3f})")
    if ratios["fused_over_chunked_gemm_floor"] is not None:
        print(f"  fused / chunked GEMM floor {ratios['fused_over_chunked_gemm_floor']:.3f}")
    if "cpu_time" in run:
        print(f"  in CPU time         fused / GEMM floor {run['cpu_time']['fused_over_gemm_floor']:.3f}, "
              f"naive / GEMM floor {run['cpu_time']['naive_over_gemm_floor']:.3f}")
    mem = run.get("memory")
    if mem and mem.get("naive_peak_extra_bytes"):
        print(f"  peak extra memory   fused {mem['fused_peak_extra_bytes'] / 2**20:.1f} MiB, naive "
              f"{mem['naive_peak_extra_bytes'] / 2**20:.1f} MiB: {mem['fused_over_naive']:.2%} of naive"
              + (f" (dX + dW alone {mem['grads_over_naive']:.2%})" if "grads_over_naive" in mem else ""))
    if "targets" in run:
        t = run["targets"]
        print(f"  targets: time <= {t['time_over_gemm_floor_max']}x floor: {'met' if t['time_met'] else 'MISSED'}; "
              f"memory <= {t['memory_over_naive_max']:.0%} of naive: "
              f"{'met' if t['memory_met'] else ('MISSED' if t['memory_met'] is not None else 'not measured')}")


if __name__ == "__main__":
    sys.exit(main())
