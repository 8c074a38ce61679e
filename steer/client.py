"""Ask a steer server for a steered generation.

Examples:
  python -m steer.client "Write a haiku about rain" --weights helpfulness=0.3,creativity=0.7
  python -m steer.client "Explain DNS" --weights conciseness=1 --stream
  python -m steer.client "Explain DNS" --weights helpfulness=1 --seed 7 --max-new-tokens 64
  python -m steer.client --describe --target localhost:50051
  python -m steer.client "Hi" --target host:50051 --tls-ca cert.pem --auth-token-file token.txt
"""

from __future__ import annotations

import argparse
import sys


def parse_weights(text: str) -> dict[str, float]:
    """``helpfulness=0.7,creativity=0.3`` -> dict; the server validates names and values."""
    weights: dict[str, float] = {}
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"--weights item {i + 1} {part!r}: expected name=value")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--weights item {i + 1} {part!r}: {value!r} is not a number") from None
    if not weights:
        raise argparse.ArgumentTypeError("--weights is empty: give e.g. helpfulness=0.7,creativity=0.3")
    return weights


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers started by tools and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(target: str, process=None, timeout: float = 300.0) -> None:
    """Poll the standard health service at ``target`` until SERVING; fail early if ``process`` exits."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before serving")
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {target} is not serving after {timeout:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steer.client", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the user's message")
    p.add_argument("--weights", type=parse_weights, default={"helpfulness": 1.0},
                   help="objective=weight,... (default helpfulness=1)")
    p.add_argument("--target", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--strategy", default="conditioned", choices=["conditioned", "rerank", "mixture"])
    p.add_argument("--candidates", type=int, default=0, help="RERANK: samples to choose from")
    p.add_argument("--rewards", action="store_true",
                   help="also measure the answer's reward vector (a scorer pass after generation)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dry-multiplier", type=float, help="DRY loop penalty strength (0 disables)")
    p.add_argument("--dry-base", type=float)
    p.add_argument("--dry-allowed-length", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    p.add_argument("--describe", action="store_true", help="print the server's Describe answer and exit")
    p.add_argument("--auth-token-file", default=None, help="send 'authorization: Bearer <token>' from this file")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate(s): connect with TLS")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.describe and not args.prompt:
        parser.error("a prompt is required (or --describe)")
    import grpc
    from google.protobuf import json_format

    from steer.v1 import steer_pb2, steer_pb2_grpc

    metadata = ()
    if args.auth_token_file:
        from pathlib import Path

        metadata = (("authorization", "Bearer " + Path(args.auth_token_file).read_text().strip()),)
    if args.tls_ca:
        from pathlib import Path

        channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        stub = steer_pb2_grpc.SteerStub(channel)
        try:
            if args.describe:
                reply = stub.Describe(steer_pb2.DescribeRequest(), timeout=args.timeout, metadata=metadata)
                print(json_format.MessageToJson(reply))
                return 0
            sampling = steer_pb2.SamplingParams(stop=args.stop)
            for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "dry_multiplier", "dry_base",
                         "dry_allowed_length"):
                if getattr(args, name) is not None:
                    setattr(sampling, name, getattr(args, name))
            request = steer_pb2.GenerateRequest(
                prompt=args.prompt, weights=args.weights, sampling=sampling, candidates=args.candidates,
                strategy=steer_pb2.Strategy.Value(f"STRATEGY_{args.strategy.upper()}"), return_rewards=args.rewards,
            )
            if args.stream:
                direction, last = {}, None
                for chunk in stub.GenerateStream(request, timeout=args.timeout, metadata=metadata):
                    direction = direction or dict(chunk.direction)
                    print(chunk.delta, end="", flush=True)
                    last = chunk
                print()
                _print_meta(direction, last.finish_reason, last.usage, dict(last.rewards))
            else:
                reply = stub.Generate(request, timeout=args.timeout, metadata=metadata)
                print(reply.text)
                _print_meta(dict(reply.direction), reply.finish_reason, reply.usage, dict(reply.rewards))
        except grpc.RpcError as e:
            print(f"steer.client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _print_meta(direction, finish_reason, usage, rewards) -> None:
    from steer.objectives import DEFAULT_OBJECTIVES
    from steer.v1 import steer_pb2

    # protobuf maps are unordered: print the default objectives in their usual order, others after
    rank = {name: i for i, name in enumerate(DEFAULT_OBJECTIVES)}
    fmt = lambda d: ", ".join(f"{k}={d[k]:.2f}" for k in sorted(d, key=lambda k: (rank.get(k, len(rank)), k)))  # noqa: E731
    print(f"-- direction: {fmt(direction)}", file=sys.stderr)
    if rewards:
        print(f"-- rewards: {fmt(rewards)}", file=sys.stderr)
    print(
        f"-- finish: {steer_pb2.FinishReason.Name(finish_reason)}; tokens: {usage.prompt_tokens} prompt, "
        f"{usage.completion_tokens} completion",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
