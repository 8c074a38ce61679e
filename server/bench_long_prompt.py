"""Long-prompt benchmark: what one ~6k-token prompt costs everyone else, and what it leaves behind.

Starts ``python -m steer.serve`` as ``make serve`` runs it (a subprocess; clients over gRPC) and
measures, in one run:

1. **memory**: the server's resident set (``/proc/<pid>/status``) after a warm-up request, then
   after a ``--prompt-tokens`` prompt has been generated from and the server is idle again
   (``--settle`` seconds later). The ratio after / before is what stays behind.
2. **head-of-line blocking**: a 2-token request sent ``--delay`` seconds after the long prompt;
   its time to first token, against the same request's on an idle server in the same run.
3. **shutdown**: SIGTERM while another long prompt is being prefilled; the exit code and the time
   to exit, against the server's drain + grace (``--drain``/``--grace``, passed to the server).

Writes JSON and prints the three figures with their baselines.

Examples:
  python -m steer.server.bench_long_prompt
  python -m steer.server.bench_long_prompt --prompt-tokens 6000 --output bench-results/long-prompt.json
  python -m steer.server.bench_long_prompt --model tiny-dir/ --prompt-tokens 400 --settle 1
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from steer.server.bench import write_results


def rss_mb(pid: int) -> float:
    """Resident set of process ``pid`` in MB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


def long_prompt(tokenizer, tokens: int) -> str:
    """A plain-text prompt of about ``tokens`` tokens (counted with ``tokenizer``; the chat template adds a few)."""
    words = " ".join(f"Item {i} on the list is the word w{i % 97}." for i in range(tokens))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids) + "\nSummarise the list above in one sentence."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steer.server.bench_long_prompt",
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--prompt-tokens", type=int, default=6000, help="length of the long prompt (default 6000)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds between the long prompt and the 2-token request")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds the server is left idle before memory is read again")
    p.add_argument("--drain", type=float, default=2.0, help="the server's --drain")
    p.add_argument("--grace", type=float, default=5.0, help="the server's --grace")
    p.add_argument("--output", default="bench-results/long-prompt.json")
    args = p.parse_args(argv)
    if args.prompt_tokens < 1:
        p.error(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")

    import grpc

    from steer.client import free_port, wait_until_serving
    from steer.models import load_tokenizer
    from steer.v1 import steer_pb2 as pb
    from steer.v1 import steer_pb2_grpc

    text = long_prompt(load_tokenizer(args.model), args.prompt_tokens)
    weights = {"helpfulness": 1.0}

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "steer.serve", "--model", args.model, "--port", str(port),
                                 "--drain", str(args.drain), "--grace", str(args.grace), "--log-level", "WARNING"])
        target = f"127.0.0.1:{port}"
        print(f"bench: waiting for the server on {target} ...", flush=True)
        wait_until_serving(target, proc, timeout=600)
        return proc, target

    def stream(stub, prompt: str, max_new_tokens: int) -> dict:
        req = pb.GenerateRequest(prompt=prompt, weights=weights,
                                 sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
        start = time.perf_counter()
        first, last = None, None
        for chunk in stub.GenerateStream(req, timeout=900):
            if first is None and chunk.delta:
                first = time.perf_counter()
            last = chunk
        end = time.perf_counter()
        return {"ttft_s": round((first or end) - start, 3), "total_s": round(end - start, 3),
                "prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens}

    results: dict = {"model": args.model, "prompt_tokens_asked": args.prompt_tokens, "delay_s": args.delay}
    proc, target = start()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = steer_pb2_grpc.SteerStub(channel)
            stream(stub, "Say hello.", 8)  # warm-up
            short_idle = stream(stub, "Name one colour.", 2)
            time.sleep(args.settle)
            before = rss_mb(proc.pid)
            out: dict = {}
            long_thread = threading.Thread(target=lambda: out.update(stream(stub, text, 8)))
            long_thread.start()
            time.sleep(args.delay)
            short_behind = stream(stub, "Name one colour.", 2)
            long_thread.join()
            peak = rss_mb(proc.pid)
            time.sleep(args.settle)
            after = rss_mb(proc.pid)
        results["memory"] = {"rss_before_mb": round(before, 1), "rss_right_after_mb": round(peak, 1),
                             "rss_after_settle_mb": round(after, 1), "after_over_before": round(after / before, 3)}
        results["long_request"] = out
        results["short_request_idle"] = short_idle
        results["short_request_behind_long"] = short_behind
        print(f"long prompt: {out['prompt_tokens']} tokens, {out['total_s']:.1f}s")
        print(f"RSS: {before:.0f} MB before, {peak:.0f} MB right after, {after:.0f} MB after {args.settle:.0f}s idle "
              f"-> after/before x{after / before:.3f} (target <= 1.10)")
        print(f"2-token request: TTFT {short_behind['ttft_s']:.2f}s behind the long prompt "
              f"(sent {args.delay:.1f}s after it) "
              f"vs {short_idle['ttft_s']:.2f}s on an idle server (target <= 2 s)")

        # Shutdown: SIGTERM in the middle of a long prefill.
        errors: list[str] = []

        def doomed():
            try:
                with grpc.insecure_channel(target) as ch:
                    stream(steer_pb2_grpc.SteerStub(ch), text, 8)
            except grpc.RpcError as e:
                errors.append(e.code().name)

        t = threading.Thread(target=doomed)
        t.start()
        time.sleep(args.delay)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=args.drain + args.grace + 60)
        took = time.monotonic() - sent
        t.join()
        budget = args.drain + args.grace + 5
        results["sigterm_during_prefill"] = {"exit_code": code, "exit_s": round(took, 2), "budget_s": budget,
                                             "client_error": errors[0] if errors else None}
        print(f"SIGTERM during a long prefill: exit code {code} after {took:.1f}s "
              f"(budget drain + grace + 5 = {budget:.0f}s); "
              f"the client got {errors[0] if errors else 'its final chunk'}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
