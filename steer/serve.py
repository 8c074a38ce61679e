"""Serve a steerable model over gRPC.

Examples:
  python -m steer.serve                                  # default SmolLM2 on 127.0.0.1:50051
  python -m steer.serve --model ./my-model --port 6000   # any local transformers causal-LM dir
  python -m steer.serve --model model.gguf --adapter runs/dpa/adapter
  python -m steer.serve --host 0.0.0.0                   # listen on all interfaces (explicit)

Then: python -m steer.client "Tell me about owls" --weights helpfulness=0.7,creativity=0.3
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steer.serve", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a model directory, or a .gguf file")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory, merged into the weights at load")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-new-tokens-limit", type=int, default=1024, help="largest sampling.max_new_tokens a request may ask for")
    p.add_argument("--default-max-new-tokens", type=int, default=256, help="used when a request leaves it unset")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    p.add_argument("--max-concurrent", type=int, default=1, help="sequences generated at once")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM/SIGINT")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import asyncio
    import logging

    from steer.errors import InvalidInput
    from steer.models import load_model
    from steer.sampling import SamplingParams
    from steer.server.app import ServerConfig, serve
    from steer.server.engine import EngineConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            grace_seconds=args.grace,
            engine=EngineConfig(max_queue=args.max_queue, max_concurrent=args.max_concurrent, max_new_tokens=args.max_new_tokens_limit),
            sampling_defaults=SamplingParams(max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit)),
        )
        loaded = load_model(args.model, adapter=args.adapter, dtype=args.dtype)
        asyncio.run(serve(loaded, config))
    except (InvalidInput, ValueError, FileNotFoundError, OSError) as e:
        print(f"steer.serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
