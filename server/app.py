"""Assemble and run the gRPC server (and, with ``http_port``, the OpenAI-compatible HTTP API on the
same engine, in the same event loop): servicer, health, reflection, graceful shutdown.

Shutdown (SIGTERM or SIGINT, :meth:`RunningServer.stop`) goes in three steps:

1. **drain** (``drain_seconds``): health says NOT_SERVING for every service while the listener
   still accepts and answers calls, so load balancers that poll or watch health move traffic
   away before anything is refused;
2. **grace** (``grace_seconds``): new calls are refused (UNAVAILABLE); calls in flight finish.
   Shortly before grace runs out (:data:`FINAL_CHUNK_SECONDS` before, at most a fifth of it) the
   engine stops generating, so every stream still open ends with its final chunk
   (``FINISH_REASON_CANCELLED``, usage and timing) and status OK instead of being cut off, and
   scoring still running ends with UNAVAILABLE;
3. **stop**: calls still open after grace (a health Watch) are cancelled, and the engine's worker
   gets :data:`ENGINE_STOP_SECONDS` to leave its current model step.

The HTTP API (:mod:`steer.server.http_api`) follows the same steps: ``/health`` answers 503 from
the drain on, new calls get 503 once grace begins, and calls in flight get the grace period.

So a server exits within drain + grace + ENGINE_STOP_SECONDS. :func:`serve` reports whether the
engine's worker stopped in that time; if a model step outlasted it, ``python -m steer.serve``
leaves without interpreter teardown (tearing down under a thread that is inside torch can abort
the process) -- every call was answered by then.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from steer.server.engine import Engine, EngineConfig
from steer.server.observability import Metrics, ObservabilityInterceptor
from steer.server.security import BearerTokenInterceptor
from steer.server.servicer import SteerServicer
from steer.server.strategies import build_strategies
from steer.server.validation import ServiceInfo

from steer.chat_tokens import ChatTokenizer, text_byte_limit
from steer.models import LoadedModel
from steer.objectives import DEFAULT_OBJECTIVES
from steer.rewards.service import ScoringConfig, ScoringService
from steer.sampling import SamplingParams
from steer.threads import in_own_thread
from steer.v1 import steer_pb2, steer_pb2_grpc

if TYPE_CHECKING:
    from steer.server.http_api import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAME = steer_pb2.DESCRIPTOR.services_by_name["Steer"].full_name  # "steer.v1.Steer"
FINAL_CHUNK_SECONDS = 1.0  # before grace ends, streams get this long to send their final chunk
ENGINE_STOP_SECONDS = 3.0  # the engine worker's time to leave its current step (Engine.close's timeout)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the server is an explicit choice
    port: int = 50051  # 0 picks a free port (tests)
    grace_seconds: float = 5.0  # in-flight calls get this long to finish on SIGTERM/SIGINT (after the drain)
    drain_seconds: float = 2.0  # on SIGTERM/SIGINT, health says NOT_SERVING this long while calls are still served
    # UTF-8 bytes of text per conversation / Score response; None: context x longest token
    max_input_bytes: int | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling_defaults: SamplingParams = field(default_factory=SamplingParams)
    scorer: str = "none"  # reward scorer spec (steer.rewards.build): none | default | flr | <rm dir> | flr:a,b+length:c
    scorer_model: str | None = None  # FLR on this model instead of the served one (with an adapter: the served base)
    scorer_dtype: str = "float32"  # the FLR judge's weights: float32 | bfloat16 | float16 | auto (as --dtype)
    auth_token: str | None = None  # when set, calls need "authorization: Bearer <token>" (health stays open)
    tls_cert: str | None = None  # PEM certificate chain file; with tls_key, the port speaks TLS
    tls_key: str | None = None  # PEM private key file
    metrics_port: int | None = None  # Prometheus metrics over HTTP on this port (same host); None = off
    # OpenAI-compatible HTTP API on this port (same host, token and TLS); 0: a free port; None = off
    http_port: int | None = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)  # Score admission and chunking

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port!r}")
        if self.http_port is not None and (not isinstance(self.http_port, int) or not 0 <= self.http_port <= 65535):
            raise ValueError(f"--http-port must be in [0, 65535], got {self.http_port!r}")
        for name in ("grace_seconds", "drain_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"ServerConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.max_input_bytes is not None and (not isinstance(self.max_input_bytes, int) or self.max_input_bytes < 1):
            raise ValueError(
                f"ServerConfig.max_input_bytes must be an integer >= 1 or None, got {self.max_input_bytes!r}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"ServerConfig.max_message_bytes must be >= 1024, got {self.max_message_bytes!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    engine: Engine
    health: health.aio.HealthServicer
    metrics: Metrics
    scoring: ScoringService | None = None
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API, when ServerConfig.http_port is set
    adapter: str | None = None  # what Describe.adapter says (the CONDITIONED adapter and the mixture)

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def stop(self, grace: float | None = None, drain: float = 0.0) -> bool:
        """Drain, stop within ``grace`` and close the engine (module docstring). True when the engine's worker
        stopped."""
        await self.health.enter_graceful_shutdown()
        if self.http is not None:
            self.http.drain()
        if drain > 0:
            log.info("draining: health says NOT_SERVING; still serving for %.1fs", drain)
            await asyncio.sleep(drain)
        grace = grace or 0.0
        stopping = {asyncio.ensure_future(self.server.stop(grace))}
        if self.http is not None:
            stopping.add(asyncio.ensure_future(self.http.stop(grace)))
        if grace > 0:
            await asyncio.wait(stopping, timeout=grace - min(FINAL_CHUNK_SECONDS, 0.2 * grace))
        if self.scoring is not None:
            self.scoring.close()
        engine_stopped = await in_own_thread(self.engine.close, ENGINE_STOP_SECONDS)
        await asyncio.gather(*stopping)
        if not engine_stopped:
            log.warning("the engine is still inside a model step %.1fs after it was told to stop", ENGINE_STOP_SECONDS)
        return engine_stopped


def build_server_scorer(loaded: LoadedModel, config: ServerConfig, objectives=DEFAULT_OBJECTIVES):
    """The scorer ``config.scorer`` names, judging with the *base* model.

    Rewards must not be measured by the model being steered: when the served weights carry a
    merged adapter, FLR runs on a second, bare copy of the base model instead (``loaded.base_spec``,
    in float32 like ``--scorer-model``; ~540 MB for the default 135M model). The same copy judges
    when the served weights are stored in bfloat16/float16, so rewards do not depend on the serving
    precision. build_scorer loads it only if some part of the spec is FLR; ``config.scorer_model``
    still overrides it.
    """
    import torch

    from steer.models import resolve_dtype
    from steer.rewards.build import build_scorer

    scorer_model = config.scorer_model
    # The judge's precision is its own (rewards move with it), float32 unless config.scorer_dtype says otherwise.
    device = getattr(loaded.model, "device", None) or torch.device("cpu")
    judge_dtype = resolve_dtype(config.scorer_dtype, device, field="scorer_dtype")
    # A mixture model's adapters switch per forward on the engine's thread: FLR needs weights of its own too.
    # Weights stored in another dtype than the judge's would move the rewards off its calibration.
    other_precision = getattr(loaded.model, "dtype", torch.float32) != getattr(torch, judge_dtype)
    if scorer_model is None and (loaded.adapter is not None or getattr(loaded, "mixture", None) is not None
                                 or other_precision):
        served = f"adapter {loaded.adapter}" if loaded.adapter is not None else (
            "mixture adapters" if not other_precision else f"weights in {loaded.model.dtype}")
        if loaded.base_spec is None:
            raise ValueError(
                f"the served model carries {served} but does not say which base it was loaded from "
                "(LoadedModel.base_spec): set ServerConfig.scorer_model so FLR judges with the base weights"
            )
        log.info("scorer: FLR judges with a %s copy of the base model %s, not the served %s (loaded if FLR "
                 "is used)", judge_dtype, loaded.base_spec, served)
        scorer_model = loaded.base_spec
    return build_scorer(config.scorer, loaded, objectives, scorer_model=scorer_model, scorer_dtype=judge_dtype)


def _describe_adapters(loaded: LoadedModel, objectives) -> str | None:
    """Describe.adapter: the CONDITIONED adapter, and the mixture's adapters when MIXTURE is offered."""
    mixture = getattr(loaded, "mixture", None)
    if mixture is None:
        return loaded.adapter
    if tuple(mixture.objectives) != tuple(objectives):
        raise ValueError(f"the mixture {mixture.path} mixes {list(mixture.objectives)}; the server's objectives are "
                         f"{list(objectives)} (same order)")
    mixed = f"mixture {mixture.path}: {', '.join(mixture.objectives)}" + (
        f" ({mixture.description})" if mixture.description else "")
    return f"{loaded.adapter}; {mixed}" if loaded.adapter else mixed


async def start_server(loaded: LoadedModel, config: ServerConfig = ServerConfig(), objectives=DEFAULT_OBJECTIVES,
                       scorer=None) -> RunningServer:
    """Build and start the server; returns once it listens (``port`` is the bound port).

    ``scorer`` (a :class:`steer.rewards.Scorer` over ``objectives``) overrides ``config.scorer``.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        steer_version = version("steer")
    except PackageNotFoundError:
        steer_version = "unknown"
    if scorer is None and config.scorer != "none":
        # Off the loop: FLR may load the base model and calibrate itself on first use (a few model forwards).
        # In a thread that ends: the torch work of loading and calibrating must leave no OpenMP team behind.
        scorer = await in_own_thread(build_server_scorer, loaded, config, objectives)
    scoring = ScoringService(scorer, config.scoring) if scorer is not None else None
    chat = await asyncio.to_thread(ChatTokenizer, loaded.tokenizer)
    max_input_bytes = config.max_input_bytes
    if max_input_bytes is None:
        max_input_bytes = await asyncio.to_thread(text_byte_limit, loaded.tokenizer, loaded.context_length)
    engine = Engine(loaded, config.engine)
    info = ServiceInfo(
        model_id=loaded.model_id,
        adapter=_describe_adapters(loaded, objectives),
        objectives=tuple(objectives),
        sampling_defaults=config.sampling_defaults,
        max_message_bytes=config.max_message_bytes,
        scorer=scoring.describe() if scoring is not None else "",
        version=steer_version,
        max_input_bytes=max_input_bytes,
    )
    metrics = Metrics()
    metrics.watch_engine(engine)
    interceptors = [ObservabilityInterceptor(metrics)]
    if config.auth_token:
        interceptors.append(BearerTokenInterceptor(config.auth_token))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ],
    )
    strategies = build_strategies(engine, scoring, chat)
    steer_pb2_grpc.add_SteerServicer_to_server(SteerServicer(engine, strategies, info, scoring), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address} (in use, or not an address of this machine)")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    http = None
    if config.http_port is not None:
        from steer.server.http_api import HttpServer, OpenAIApi

        api = OpenAIApi(engine, strategies, info, scoring, auth_token=config.auth_token, metrics=metrics)
        try:
            http = await HttpServer.start(api, config.host, config.http_port, config.tls_cert, config.tls_key)
        except BaseException:  # e.g. the port is taken: leave nothing running behind the error
            await server.stop(0)
            if scoring is not None:
                scoring.close()
            engine.close(ENGINE_STOP_SECONDS)
            raise
    if config.metrics_port is not None:
        metrics.serve_http(config.metrics_port, config.host)
    log.info(
        "serving %s (adapter: %s) on %s:%d (tls=%s, auth=%s, http=%s)",
        loaded.model_id, info.adapter or "none", config.host, port, bool(config.tls_cert), bool(config.auth_token),
        "off" if http is None else f"{config.host}:{http.port}",
    )
    return RunningServer(server, port, engine, health_servicer, metrics, scoring, http, adapter=info.adapter)


async def serve(loaded: LoadedModel, config: ServerConfig = ServerConfig()) -> bool:
    """Run until SIGTERM/SIGINT, then drain and stop (module docstring). True when everything stopped."""
    running = await start_server(loaded, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    adapter = f" + adapter {running.adapter}" if running.adapter else ""
    http = ""
    if running.http is not None:
        scheme = "https" if config.tls_cert else "http"
        http = f", OpenAI-compatible HTTP at {scheme}://{config.host}:{running.http_port}/v1"
    print(f"steer: serving {loaded.model_id}{adapter} on {config.host}:{running.port}{http} (Ctrl-C to stop)",
          flush=True)
    await stop.wait()
    log.info("shutting down: drain %.1fs, then grace %.1fs", config.drain_seconds, config.grace_seconds)
    return await running.stop(config.grace_seconds, drain=config.drain_seconds)
