"""Serve a steerable model over gRPC (and, with --http-port, an OpenAI-compatible HTTP API).

Examples:
  python -m steer.serve                                  # default SmolLM2 + its shipped steering adapter
                                                         # on 127.0.0.1:50051
  python -m steer.serve --adapter none                   # the bare default model, no adapter
  python -m steer.serve --model ./my-model --port 6000   # any local transformers causal-LM dir (served bare)
  python -m steer.serve --model model.gguf --adapter runs/dpa/adapter
  python -m steer.serve --mixture runs/mixture/mixture   # also STRATEGY_MIXTURE: per-objective adapters mixed
                                                         # per request
  python -m steer.serve --scorer runs/rm                 # rewards from a trained reward model (steer.train reward)
  python -m steer.serve --scorer none                    # no scorer: no Score, no RERANK, no rewards
  python -m steer.serve --host 0.0.0.0 --auth-token-file token.txt --tls-cert cert.pem --tls-key key.pem
  python -m steer.serve --metrics-port 9100               # Prometheus metrics at :9100/metrics
  python -m steer.serve --http-port 8000                  # also OpenAI-compatible HTTP at :8000/v1 (chat completions,
                                                          # models)

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
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a model directory, or a .gguf file")
    p.add_argument(
        "--adapter", default=None,
        help="'default' (the steering adapter shipped in steer/adapters/default; fits only the default model), 'none' "
        "(the bare model), or a PEFT adapter directory; merged into the weights at load. Unset: 'default' with the "
        "default model, 'none' with any other --model. With an adapter, the FLR scorer judges with the base weights, "
        "so a second copy of the base model is loaded for it (float32: ~540 MB for the default 135M model; not with "
        "--scorer none, a reward model or --scorer-model)",
    )
    p.add_argument(
        "--mixture", default=None,
        help="per-objective adapters for STRATEGY_MIXTURE: a directory written by python -m steer.train mixture, "
        "'default' (the one shipped for the default model, when the package has one) or 'none'. Unset: 'default' with "
        "the default model. The --adapter stays merged into the weights and joins the mixture's stack once more, "
        "weighed -1 by MIXTURE rows, so CONDITIONED and MIXTURE requests share every batch",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs: auto (CUDA when present, else the CPU), cpu or cuda; "
                        "sampling stays on the CPU")
    p.add_argument("--linears", default="auto", choices=["auto", "torch", "prepacked", "int8"],
                   help="how linear layers compute: prepacked (oneDNN-reordered fp32 weights, same math, faster; "
                        "+540 MB for the default model), int8 (weight-only int8: faster for few streams, slower for "
                        "many, changes the numbers), torch; auto: prepacked on the CPU in float32, else torch")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-new-tokens-limit", type=int, default=1024,
                   help="largest sampling.max_new_tokens a request may ask for")
    p.add_argument("--default-max-new-tokens", type=int, default=256, help="used when a request leaves it unset")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before RESOURCE_EXHAUSTED")
    p.add_argument("--max-concurrent", type=int, default=32, help="sequences in the running batch")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="padded prompt tokens prefilled per engine step; longer prompts are chunked "
                        "(default: 256 on CPU, 2048 on GPU)")
    p.add_argument("--forward", default="steer", choices=["steer", "transformers"],
                   help="the engine's model call: steer (its own Llama forward where it covers the model, else "
                        "transformers') or transformers (always transformers' forward, the reference)")
    p.add_argument("--drain", type=float, default=2.0,
                   help="on SIGTERM/SIGINT, seconds health says NOT_SERVING while calls are still served "
                        "(load balancers move away)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="then, seconds in-flight calls get to finish; open streams end with a final chunk")
    p.add_argument(
        "--scorer", default="default",
        help="reward scorer for Score, RERANK and return_rewards: 'default' (FLR on the scorer model for helpfulness "
        "and creativity + the length signal -ln(1+tokens) for conciseness, all standardised on the built-in "
        "calibration set), 'flr' (FLR for every objective), 'none', a reward model directory, or parts joined by '+' "
        "(flr:helpfulness+length:conciseness+rm:DIR)",
    )
    p.add_argument("--scorer-model", default=None,
                   help="run FLR on this model ('default', a directory or .gguf) instead of the served one "
                        "(with an adapter: instead of the served base)")
    p.add_argument("--auth-token-file", default=None,
                   help="require 'authorization: Bearer <token>' (token read from this file)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024, help="largest request/response message")
    p.add_argument("--max-input-bytes", type=int, default=None,
                   help="UTF-8 bytes of text a conversation (or a Score response) may hold, checked before tokenising "
                        "(default: the context x the longest token's bytes, 663,552 for the default model)")
    p.add_argument("--max-score-pending", type=int, default=128,
                   help="responses waiting or being scored before Score answers RESOURCE_EXHAUSTED")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics over HTTP on this port")
    p.add_argument(
        "--http-port", type=int, default=None,
        help="also serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health) on this port of the "
        "same host, with the same engine, limits, token and TLS (default: off)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import asyncio
    import logging
    import os

    from steer.errors import InvalidInput
    from steer.models import default_adapter_for, default_mixture_for, load_model
    from steer.rewards.service import ScoringConfig
    from steer.sampling import SamplingParams
    from steer.server.app import ServerConfig, serve
    from steer.server.engine import EngineConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from steer.server.security import read_token_file

    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            grace_seconds=args.grace,
            drain_seconds=args.drain,
            max_message_bytes=args.max_message_bytes,
            max_input_bytes=args.max_input_bytes,
            scoring=ScoringConfig(max_pending_responses=args.max_score_pending),
            auth_token=read_token_file(args.auth_token_file) if args.auth_token_file else None,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            engine=EngineConfig(
                max_queue=args.max_queue, max_concurrent=args.max_concurrent, max_new_tokens=args.max_new_tokens_limit,
                max_prefill_tokens=args.max_prefill_tokens, forward=args.forward,
            ),
            sampling_defaults=SamplingParams(
                max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit)),
            scorer=args.scorer,
            scorer_model=args.scorer_model,
        )
        adapter = args.adapter if args.adapter is not None else default_adapter_for(args.model)
        mixture = args.mixture if args.mixture is not None else default_mixture_for(args.model)
        loaded = load_model(args.model, adapter=adapter, dtype=args.dtype, mixture=mixture, device=args.device,
                            linears=args.linears)
        stopped = asyncio.run(serve(loaded, config))
    except (InvalidInput, ValueError, FileNotFoundError, OSError) as e:
        print(f"steer.serve: error: {e}", file=sys.stderr)
        return 2
    if stopped is False:
        # The engine's worker is still inside a model step; every call has been answered. Tearing
        # the interpreter down under a thread that is inside torch can abort the process: leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
