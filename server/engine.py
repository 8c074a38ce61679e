"""The engine owns the model and runs generation off the event loop.

Callers (strategies, via the servicer) hand it token ids and :class:`SamplingParams` and read
back an async stream of :class:`TextDelta` events ending with one :class:`Finished`. The engine
decides when work runs: it admits up to ``max_queue`` waiting requests (beyond that
:class:`Overloaded`, which the servicer turns into ``RESOURCE_EXHAUSTED``), runs decoding on a
worker thread, and stops a sequence at the next step when its caller goes away (cancelled call)
or its deadline passes.

Decoding is a plain prefill + incremental decode over the model's forward with a KV cache
(``DynamicCache``), one token per step, so per-request sampling, seeds and stop strings are exact
and the same loop can later step several sequences at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from steer.models import LoadedModel
from steer.sampling import SamplingParams, StopStringDetokenizer, sample_token

log = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-turn token
    LENGTH = "length"  # max_new_tokens or the model's context
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    TIME_LIMIT = "time_limit"


class Overloaded(Exception):
    """No room for another request right now (queue full or engine shutting down)."""


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64  # requests waiting for a slot before RESOURCE_EXHAUSTED
    max_concurrent: int = 1  # sequences decoded at once
    max_new_tokens: int = 1024  # upper bound a request may ask for

    def __post_init__(self):
        for name in ("max_queue", "max_concurrent", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")


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

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    """Schedules generation for concurrent requests over one loaded model."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.config = config
        self._pending: queue.Queue[_Job | None] = queue.Queue()
        self._waiting = 0  # admitted but not yet started
        self._running = 0
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"steer-engine-{i}", daemon=True)
            for i in range(config.max_concurrent)
        ]
        for w in self._workers:
            w.start()

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._waiting, "running": self._running}

    async def generate(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> AsyncIterator[TextDelta | Finished]:
        """Stream the generation for ``prompt_ids``. Leaving the loop early cancels the sequence."""
        job = self._admit(prompt_ids, params, deadline)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()  # no-op once finished; frees the slot at the next step otherwise

    def _admit(self, prompt_ids, params, deadline) -> _Job:
        with self._lock:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._waiting >= self.config.max_queue:
                raise Overloaded(
                    f"server is at capacity: {self._running} running and {self._waiting} waiting "
                    f"(max_queue={self.config.max_queue}); retry with backoff"
                )
            self._waiting += 1
        job = _Job(list(prompt_ids), params, deadline, asyncio.get_running_loop(), asyncio.Queue())
        self._pending.put(job)
        return job

    def close(self) -> None:
        """Stop accepting work; running sequences are cancelled at their next step."""
        with self._lock:
            self._closed = True
        for _ in self._workers:
            self._pending.put(None)

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self._pending.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                if self._closed:
                    job.cancelled.set()
                self._decode(job)
            except Exception as exc:  # surfaced to the caller, never kills the worker
                log.exception("generation failed")
                job.emit(exc)
            finally:
                with self._lock:
                    self._running -= 1

    @torch.inference_mode()
    def _decode(self, job: _Job) -> None:
        from transformers import DynamicCache

        model = self.loaded.model
        params = job.params
        started = time.monotonic()
        generator = params.make_generator()
        detok = StopStringDetokenizer(self.loaded.tokenizer, params.stop)
        eos = self.loaded.eos_token_ids
        limit = min(params.max_new_tokens, self.context_length - len(job.prompt_ids))
        first_token_at = None
        reason = self._interrupted(job)

        if reason is None:
            cache = DynamicCache(config=model.config)
            input_ids = torch.tensor([job.prompt_ids], dtype=torch.long)  # (1, T)
            logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        while reason is None:
            token = sample_token(logits, params, generator)
            if first_token_at is None:
                first_token_at = time.monotonic()
            if token in eos:
                reason = FinishReason.STOP
                break
            delta = detok.push(token)
            if delta:
                job.emit(TextDelta(delta))
            if detok.stopped:
                reason = FinishReason.STOP_SEQUENCE
            elif len(detok.ids) >= limit:
                reason = FinishReason.LENGTH
            else:
                reason = self._interrupted(job)
            if reason is not None:
                break
            step = torch.tensor([[token]], dtype=torch.long)  # (1, 1)
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]

        tail = detok.flush()
        if tail and reason not in (FinishReason.CANCELLED,):
            job.emit(TextDelta(tail))
        done = time.monotonic()
        job.emit(
            Finished(
                text=detok.text,
                finish_reason=reason,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=len(detok.ids),
                queue_seconds=started - job.arrived,
                time_to_first_token_seconds=(first_token_at or done) - job.arrived,
                total_seconds=done - job.arrived,
                token_ids=tuple(detok.ids),
            )
        )

    @staticmethod
    def _interrupted(job: _Job) -> FinishReason | None:
        if job.cancelled.is_set():
            return FinishReason.CANCELLED
        if job.deadline is not None and time.monotonic() >= job.deadline:
            return FinishReason.TIME_LIMIT
        return None
