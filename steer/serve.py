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
  python -m steer.serve --scorer-dtype bfloat16          # FLR judge in bf16: ~3x faster scoring, rewards move a little
  python -m steer.serve --host 0.0.0.0 --auth-token-file token.txt --tls-cert cert.pem --tls-key key.pem
  python -m steer.serve --metrics-port 9100               # Prometheus metrics at :9100/metrics
  python -m steer.serve --http-port 8000                  # also OpenAI-compatible HTTP at :8000/v1 (chat completions,
                                                          # models)
  python -m steer.serve --config serve.yaml --port 6000   # options from a YAML file (keys: the flags with
                                                          # underscores); flags override it

Then: python -m steer.client "Tell me about owls" --weights helpfulness=0.7,creativity=0.3
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from steer.config import option
from steer.models import DTYPE_AUTO, DTYPES

PROG = "python -m steer.serve"


@dataclass(frozen=True)
class ServeConfig:
    """Every field is a ``python -m steer.serve`` flag (``--field-name``, :mod:`steer.config`); the server
    checks the values (``steer.server.app.ServerConfig``, ``EngineConfig``, ``steer.models.load_model``)."""

    model: str = field(default="default", metadata=option(
        "'default' (embedded SmolLM2-135M-Instruct), a model directory, or a .gguf file"))
    adapter: str | None = field(default=None, metadata=option(
        "'default' (the steering adapter shipped in steer/adapters/default; fits only the default model), 'none' "
        "(the bare model), or a PEFT adapter directory; merged into the weights at load. With an adapter, the FLR "
        "scorer judges with the base weights, so a second copy of the base model is loaded for it (float32: ~540 MB "
        "for the default 135M model; not with --scorer none, a reward model or --scorer-model)",
        unset="'default' with the default model, 'none' with any other --model"))
    mixture: str | None = field(default=None, metadata=option(
        "per-objective adapters for STRATEGY_MIXTURE: a directory written by python -m steer.train mixture, "
        "'default' (the one shipped for the default model, when the package has one) or 'none'. The --adapter stays "
        "merged into the weights and joins the mixture's stack once more, weighed -1 by MIXTURE rows, so CONDITIONED "
        "and MIXTURE requests share every batch", unset="'default' with the default model"))
    dtype: str = field(default="auto", metadata=option(
        "storage dtype of the model's weights; auto: bfloat16 where the device multiplies it natively (CUDA with "
        "bf16, CPUs with AVX512-BF16 or AMX), else float32 (bfloat16 against float32 on the default model: greedy "
        "agreement and log-prob drift in the README; make bench-serve measures them). The FLR scorer always judges "
        "in float32 (--scorer-dtype)", choices=(DTYPE_AUTO, *DTYPES)))
    device: str = field(default="auto", metadata=option(
        "where the model runs: auto (CUDA when present, else the CPU), cpu or cuda; sampling stays on the CPU",
        choices=("auto", "cpu", "cuda")))
    linears: str = field(default="auto", metadata=option(
        "how linear layers compute: prepacked (oneDNN-reordered fp32 weights, same math, faster; +540 MB for the "
        "default model), int8 (weight-only int8: faster for few streams, slower for many, changes the numbers), "
        "torch; auto: prepacked on the CPU in float32, else torch", choices=("auto", "torch", "prepacked", "int8")))
    host: str = field(default="127.0.0.1", metadata=option("bind address (loopback by default)"))
    port: int = field(default=50051, metadata=option("gRPC port (0: any free port)"))
    max_new_tokens_limit: int = field(default=1024, metadata=option(
        "largest sampling.max_new_tokens a request may ask for", metavar="N"))
    default_max_new_tokens: int = field(default=256, metadata=option(
        "used when a request leaves it unset", metavar="N"))
    default_dry_multiplier: float | None = field(default=None, metadata=option(
        "DRY loop penalty (sampling.dry_multiplier, steer.dry) when a request leaves it unset; 0: off",
        unset="SamplingParams' default"))
    max_queue: int = field(default=64, metadata=option(
        "requests waiting for a slot before RESOURCE_EXHAUSTED", metavar="N"))
    max_concurrent: int = field(default=32, metadata=option("sequences in the running batch", metavar="N"))
    max_prefill_tokens: int | None = field(default=None, metadata=option(
        "padded prompt tokens prefilled per engine step; longer prompts are chunked", metavar="N",
        unset="256 on CPU, 2048 on GPU"))
    forward: str = field(default="steer", metadata=option(
        "the engine's model call: steer (its own Llama forward where it covers the model, else transformers') or "
        "transformers (always transformers' forward, the reference)", choices=("steer", "transformers")))
    drain: float = field(default=2.0, metadata=option(
        "on SIGTERM/SIGINT, seconds health says NOT_SERVING while calls are still served (load balancers move "
        "away)", metavar="SECONDS"))
    grace: float = field(default=5.0, metadata=option(
        "then, seconds in-flight calls get to finish; open streams end with a final chunk", metavar="SECONDS"))
    scorer: str = field(default="default", metadata=option(
        "reward scorer for Score, RERANK and return_rewards: 'default' (FLR on the scorer model for helpfulness "
        "and creativity + the length signal -ln(1+tokens) for conciseness, all standardised on the built-in "
        "calibration set), 'flr' (FLR for every objective), 'none', a reward model directory, or parts joined by '+' "
        "(flr:helpfulness+length:conciseness+rm:DIR)"))
    scorer_model: str | None = field(default=None, metadata=option(
        "run FLR on this model ('default', a directory or .gguf) instead of the served one (with an adapter: "
        "instead of the served base)", unset="the served model"))
    scorer_dtype: str = field(default="float32", metadata=option(
        "the FLR judge's weights: float32 (rewards do not depend on the serving precision), or bfloat16 / float16 / "
        "auto (as --dtype) for faster scoring at rewards that move a little with the precision (default model, "
        "AVX512-BF16 CPU: scoring ~3x faster, raw FLR within 0.016); its calibration is computed once and cached",
        choices=(DTYPE_AUTO, *DTYPES)))
    auth_token_file: str | None = field(default=None, metadata=option(
        "require 'authorization: Bearer <token>' (token read from this file)", metavar="FILE",
        unset="no authentication"))
    tls_cert: str | None = field(default=None, metadata=option(
        "PEM certificate chain: serve TLS (with --tls-key)", metavar="FILE", unset="plaintext"))
    tls_key: str | None = field(default=None, metadata=option("PEM private key for --tls-cert", metavar="FILE"))
    max_message_bytes: int = field(default=4 * 1024 * 1024, metadata=option(
        "largest request/response message", metavar="N"))
    max_input_bytes: int | None = field(default=None, metadata=option(
        "UTF-8 bytes of text a conversation (or a Score response) may hold, checked before tokenising", metavar="N",
        unset="the context x the longest token's bytes, 663,552 for the default model"))
    max_score_pending: int = field(default=128, metadata=option(
        "responses waiting or being scored before Score answers RESOURCE_EXHAUSTED", metavar="N"))
    metrics_port: int | None = field(default=None, metadata=option(
        "serve Prometheus metrics over HTTP on this port", metavar="PORT", unset="off"))
    http_port: int | None = field(default=None, metadata=option(
        "also serve an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health) on this port of the "
        "same host, with the same engine, limits, token and TLS", metavar="PORT", unset="off"))
    log_level: str = field(default="INFO", metadata=option(
        "what the server logs to stderr: a logging level name, any case"))


def sampling_defaults(args: ServeConfig):
    """What a request that leaves a sampling field unset gets; a bad value names its flag."""
    from steer.errors import InvalidInput
    from steer.sampling import SamplingParams

    given = {"max_new_tokens": min(args.default_max_new_tokens, args.max_new_tokens_limit),
             "dry_multiplier": args.default_dry_multiplier}
    try:
        return SamplingParams().with_overrides(**given)
    except InvalidInput as e:
        name = e.field.removeprefix("sampling.")
        raise InvalidInput(f"default_{name}" if name in given else e.field, e.reason) from None


def main(argv: list[str] | None = None) -> int:
    from steer.config import merge_config, split_doc
    from steer.errors import InvalidInput

    description, epilog = split_doc(__doc__)
    try:  # defaults < --config YAML < flags; a bad YAML file or value is named like the errors below
        args = merge_config(ServeConfig, sys.argv[1:] if argv is None else list(argv), prog=PROG,
                            description=description, epilog=epilog)
    except InvalidInput as e:
        print(f"steer.serve: error: {e}", file=sys.stderr)
        return 2
    import asyncio
    import logging
    import os

    from steer.models import default_adapter_for, default_mixture_for, load_model
    from steer.rewards.service import ScoringConfig
    from steer.server.app import ServerConfig, serve
    from steer.server.engine import EngineConfig
    from steer.threads import run_in_own_thread

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
            sampling_defaults=sampling_defaults(args),
            scorer=args.scorer,
            scorer_model=args.scorer_model,
            scorer_dtype=args.scorer_dtype,
        )
        adapter = args.adapter if args.adapter is not None else default_adapter_for(args.model)
        mixture = args.mixture if args.mixture is not None else default_mixture_for(args.model)
        # Loaded in a thread that then ends, so that the engine's worker is the only thread left with
        # an OpenMP team (steer.threads: with two, a decode step runs at about half speed on 2 cores).
        loaded = run_in_own_thread(load_model, args.model, adapter=adapter, dtype=args.dtype, mixture=mixture,
                                   device=args.device, linears=args.linears)
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
