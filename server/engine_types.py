"""The engine's configuration, the events and errors its callers see, and each request's state.

:mod:`steer.server.engine` re-exports the public names; the scheduling lives there.
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from dataclasses import dataclass, field

import torch

from steer.sampling import SamplingParams, StopStringDetokenizer


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-turn token
    LENGTH = "length"  # max_new_tokens or the model's context
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TIME_LIMIT = "time_limit"


class Overloaded(Exception):
    """No room for another request right now (queue full or engine shutting down)."""


# The prefill budget by device type when EngineConfig leaves it unset. It bounds how long every
# other stream waits behind a long prompt: one iteration computes at most this many prompt tokens.
# CPU (SmolLM2-135M, 2 cores, fp32): about 3 ms per prompt token at short context and 5 ms at 6k,
# so a 2,048-token chunk held everyone for 5-10 s; 256 keeps an iteration under ~1.4 s at 6k tokens
# of context and, prefilling a 6k prompt, costs no throughput (22.2 s vs 23.6 s in all).
PREFILL_TOKENS_BY_DEVICE = {"cpu": 256}
PREFILL_TOKENS_OTHER = 2048  # accelerators: the usual chunked-prefill budget


def prefill_budget(config: EngineConfig, device: torch.device) -> int:
    """The prompt tokens one iteration computes: ``config.max_prefill_tokens``, or the device's default."""
    if config.max_prefill_tokens is not None:
        return config.max_prefill_tokens
    return PREFILL_TOKENS_BY_DEVICE.get(torch.device(device).type, PREFILL_TOKENS_OTHER)


class SequenceFailed(RuntimeError):
    """Generating this one request failed (the message says where and why); others went on."""


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64  # requests waiting for a batch slot before RESOURCE_EXHAUSTED
    max_concurrent: int = 32  # sequences in the running batch (decoding or prefilling)
    max_new_tokens: int = 1024  # upper bound a request may ask for
    # Prompt tokens (padding included) computed per iteration; longer prompts are chunked. None: by
    # device (PREFILL_TOKENS_BY_DEVICE), so that one iteration stays well under a second.
    max_prefill_tokens: int | None = None
    # "steer": the engine's own forward where it covers the model (steer.server.llama_forward), else
    # transformers'; "transformers": always transformers' forward (the reference).
    forward: str = "steer"

    def __post_init__(self):
        for name, low in (("max_queue", 0), ("max_concurrent", 1), ("max_new_tokens", 1), ("max_prefill_tokens", 1)):
            value = getattr(self, name)
            if value is None and name == "max_prefill_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EngineConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.forward not in ("steer", "transformers"):
            raise ValueError(f"EngineConfig.forward must be 'steer' or 'transformers', got {self.forward!r}")


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str  # the whole generated text (stop strings and end-of-turn removed)
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    token_ids: tuple[int, ...] = ()


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None  # time.monotonic() value, or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # (n,) this request's row of adapter weights (mixture models; None: the default row)
    mix: torch.Tensor | None = None

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass
class _Sequence:
    """A running sequence: its job, decoding state and slot in the KV cache."""

    job: _Job
    slot: int
    generator: torch.Generator
    detok: StopStringDetokenizer
    limit: int  # completion tokens allowed (max_new_tokens, capped by the context)
    length: int = 0  # cache positions written: prompt tokens prefilled, then + tokens fed back
    last_token: int = 0
    started: float = 0.0
    first_token_at: float | None = None

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the cache (0 once the sequence decodes)."""
        return max(0, len(self.job.prompt_ids) - self.length)


# One prefill forward: (sequence, number of its next prompt tokens to compute).
_Chunks = list[tuple[_Sequence, int]]
