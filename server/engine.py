"""The engine owns the model and schedules generation for concurrent requests.

Callers (strategies, via the servicer) hand it token ids and :class:`SamplingParams` and read back
an async stream of :class:`TextDelta` events ending with one :class:`Finished`.

Scheduling is iteration-level ("continuous") batching on one worker thread:

* every iteration first admits waiting requests into free batch slots and prefills them together
  (left-padded to a common length, within a token budget), then runs one decode step for every
  running sequence; sequences join and leave between steps, so a long generation never holds
  up a short one and a new request waits at most one step to start;
* each sequence keeps its own sampling parameters, seeded generator, stop strings, token limit
  and deadline; its KV cache lives in a slot of :class:`~steer.server.kv_cache.SlotKVCache`;
* a request whose caller goes away (cancelled call: the event stream is closed) or whose
  deadline passes leaves the batch at the next step;
* beyond ``max_concurrent`` running and ``max_queue`` waiting, :class:`Overloaded` is raised at
  once (the servicer maps it to ``RESOURCE_EXHAUSTED``).

All model calls go through :meth:`Engine._forward`, the one place a per-row adapter mixture would
hook in.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from steer.models import LoadedModel
from steer.sampling import SamplingParams, StopStringDetokenizer, sample_tokens

from steer.server.kv_cache import SlotKVCache

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
    max_queue: int = 64  # requests waiting for a batch slot before RESOURCE_EXHAUSTED
    max_concurrent: int = 32  # sequences in the running batch
    max_new_tokens: int = 1024  # upper bound a request may ask for
    max_prefill_tokens: int = 2048  # padded prompt tokens prefilled per iteration (>= 1 request)

    def __post_init__(self):
        for name, low in (("max_queue", 0), ("max_concurrent", 1), ("max_new_tokens", 1), ("max_prefill_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EngineConfig.{name} must be an integer >= {low}, got {value!r}")


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
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass
class _Sequence:
    """A running sequence: its job, decoding state and place in the KV cache."""

    job: _Job
    generator: torch.Generator
    detok: StopStringDetokenizer
    limit: int  # completion tokens allowed (max_new_tokens, capped by the context)
    offset: int  # left-padding positions before the prompt in its cache slot
    length: int = 0  # cache positions used (padding + prompt + generated so far)
    last_token: int = 0
    started: float = 0.0
    first_token_at: float | None = None


class Engine:
    """Continuous-batching generation over one loaded model (see module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.config = config
        model = loaded.model
        self._pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        self._eos = loaded.eos_token_ids
        dtype = next(model.parameters()).dtype
        # Left padding can push a slot past the context by at most the padding, hence 2x.
        self.cache = SlotKVCache.for_model(model.config, config.max_concurrent, dtype, 2 * loaded.context_length)
        self._sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        self._mask_dtype = dtype
        self._running: list[_Sequence] = []  # index == cache slot
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        # Counters for metrics and benchmarks (read without the lock: monotonic ints).
        self.generated_tokens = 0
        self.steps = 0
        self.on_finish = None  # optional callable(Finished), called on the worker thread (metrics)
        self._worker = threading.Thread(target=self._run, name="steer-engine", daemon=True)
        self._worker.start()

    # -- public API (event loop side) ----------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": len(self._running)}

    async def generate(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> AsyncIterator[TextDelta | Finished]:
        """Stream the generation for ``prompt_ids``. Leaving the loop early cancels the sequence."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.context_length}")
        job = _Job(list(prompt_ids), params, deadline, asyncio.get_running_loop(), asyncio.Queue())
        self._admit(job)
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancelled.set()  # no-op once finished; otherwise the sequence leaves at the next step

    def _admit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            free = max(0, self.config.max_concurrent - len(self._running))
            if len(self._waiting) >= self.config.max_queue + free:
                raise Overloaded(
                    f"server is at capacity: {len(self._running)} running (max_concurrent="
                    f"{self.config.max_concurrent}) and {len(self._waiting)} waiting "
                    f"(max_queue={self.config.max_queue}); retry with backoff"
                )
            self._waiting.append(job)
            self._cond.notify()

    def close(self) -> None:
        """Stop accepting work; waiting and running sequences end as CANCELLED."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=30)

    # -- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = self._take_admissible()
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its sequences, never the worker
                    log.exception("generation step failed")
                    for seq in self._running:
                        seq.job.emit(exc)
                    for job in admitted:
                        job.emit(exc)
                    self._running.clear()
        with self._cond:
            leftovers = list(self._waiting)
            self._waiting.clear()
        for job in leftovers:
            job.cancelled.set()
            self._finish_unstarted(job, FinishReason.CANCELLED)
        for seq in self._running:
            self._finish(seq, FinishReason.CANCELLED)
        self._running.clear()

    def _take_admissible(self) -> list[_Job]:
        """Pop waiting jobs that fit in free slots and the prefill budget (called with the lock)."""
        taken: list[_Job] = []
        longest = 0
        while self._waiting and len(self._running) + len(taken) < self.config.max_concurrent:
            job = self._waiting[0]
            longest_if = max(longest, len(job.prompt_ids))
            if taken and longest_if * (len(taken) + 1) > self.config.max_prefill_tokens:
                break
            self._waiting.popleft()
            if job.cancelled.is_set() or self._expired(job):
                self._finish_unstarted(job, FinishReason.CANCELLED if job.cancelled.is_set() else FinishReason.TIME_LIMIT)
                continue
            taken.append(job)
            longest = longest_if
        return taken

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The engine's only model call: logits of the last position of each row, ``(rows, V)``."""
        out = self.loaded.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=self._as_attention_mask(mask),
            past_key_values=self.cache, use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _as_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean 'may attend' mask for SDPA; an additive float mask for eager attention."""
        if self._sdpa:
            return allowed
        zero = torch.zeros((), dtype=self._mask_dtype)
        return torch.where(allowed, zero, torch.finfo(self._mask_dtype).min)

    def _prefill(self, jobs: list[_Job]) -> None:
        first_slot = len(self._running)
        t = max(len(j.prompt_ids) for j in jobs)
        m = len(jobs)
        input_ids = torch.full((m, t), self._pad_id, dtype=torch.long)  # (m, T), left-padded
        offsets = torch.tensor([t - len(j.prompt_ids) for j in jobs])  # (m,)
        for i, job in enumerate(jobs):
            input_ids[i, int(offsets[i]):] = torch.tensor(job.prompt_ids)
        q = torch.arange(t)
        causal = q[None, :] <= q[:, None]  # (T, T): key <= query
        allowed = causal[None] & (q[None, None, :] >= offsets[:, None, None])  # (m, T, T)
        # A padding query would see no key at all (NaN rows in SDPA); let it see itself. Real
        # queries never see padding keys, so this changes nothing they compute.
        allowed = allowed | torch.eye(t, dtype=torch.bool)[None]
        positions = (q[None, :] - offsets[:, None]).clamp(min=0)  # (m, T): RoPE positions from 0
        self.cache.prepare_prefill(first_slot, m, t)
        now = time.monotonic()
        seqs = []
        for i, job in enumerate(jobs):
            seqs.append(_Sequence(
                job=job, generator=job.params.make_generator(),
                detok=StopStringDetokenizer(self.loaded.tokenizer, job.params.stop),
                limit=min(job.params.max_new_tokens, self.context_length - len(job.prompt_ids)),
                offset=int(offsets[i]), length=t, started=now,
            ))
        logits = self._forward(input_ids, positions, allowed[:, None])  # (m, V)
        self._running.extend(seqs)
        self._advance(seqs, logits, first_row=first_slot)

    def _decode_step(self) -> None:
        n = len(self._running)
        lengths = torch.tensor([s.length for s in self._running])  # (n,) next write position
        offsets = torch.tensor([s.offset for s in self._running])
        view = int(lengths.max()) + 1
        k = torch.arange(view)
        allowed = (k[None, :] >= offsets[:, None]) & (k[None, :] <= lengths[:, None])  # (n, L)
        input_ids = torch.tensor([[s.last_token] for s in self._running])  # (n, 1)
        positions = (lengths - offsets)[:, None]  # (n, 1)
        self.cache.prepare_decode(lengths)
        logits = self._forward(input_ids, positions, allowed[:, None, None, :])  # (n, V)
        for s in self._running:
            s.length += 1
        self.steps += 1
        self._advance(list(self._running), logits, first_row=0)

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor, first_row: int) -> None:
        """Sample one token for each sequence (rows of ``logits``), emit text, retire finished ones."""
        tokens = sample_tokens(logits, [s.job.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        done: list[tuple[_Sequence, FinishReason]] = []
        for seq, token in zip(seqs, tokens):
            if seq.first_token_at is None:
                seq.first_token_at = now
            reason = None
            if token in self._eos:
                reason = FinishReason.STOP
            else:
                self.generated_tokens += 1
                seq.last_token = token
                delta = seq.detok.push(token)
                if delta:
                    seq.job.emit(TextDelta(delta))
                if seq.detok.stopped:
                    reason = FinishReason.STOP_SEQUENCE
                elif len(seq.detok.ids) >= seq.limit:
                    reason = FinishReason.LENGTH
            if reason is None:
                if seq.job.cancelled.is_set():
                    reason = FinishReason.CANCELLED
                elif self._expired(seq.job):
                    reason = FinishReason.TIME_LIMIT
            if reason is not None:
                done.append((seq, reason))
        for seq, reason in done:
            self._finish(seq, reason)
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free ``seq``'s slot, moving the last running sequence into it to keep slots contiguous."""
        slot = self._running.index(seq)
        last = self._running.pop()
        if last is not seq:
            self.cache.move(len(self._running), slot, last.length)
            self._running[slot] = last

    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        if reason is not FinishReason.CANCELLED:
            tail = seq.detok.flush()
            if tail:
                seq.job.emit(TextDelta(tail))
        done = time.monotonic()
        job = seq.job
        self._emit_finished(job, Finished(
            text=seq.detok.text, finish_reason=reason, prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(seq.detok.ids) + (1 if reason is FinishReason.STOP else 0),
            queue_seconds=seq.started - job.arrived,
            time_to_first_token_seconds=(seq.first_token_at or done) - job.arrived,
            total_seconds=done - job.arrived, token_ids=tuple(seq.detok.ids),
        ))

    def _emit_finished(self, job: _Job, finished: Finished) -> None:
        job.emit(finished)
        if self.on_finish is not None:
            try:
                self.on_finish(finished)
            except Exception:  # observers must never break generation
                log.exception("on_finish observer failed")

    def _finish_unstarted(self, job: _Job, reason: FinishReason) -> None:
        done = time.monotonic()
        self._emit_finished(job, Finished(
            text="", finish_reason=reason, prompt_tokens=len(job.prompt_ids), completion_tokens=0,
            queue_seconds=done - job.arrived, time_to_first_token_seconds=done - job.arrived,
            total_seconds=done - job.arrived,
        ))

    @staticmethod
    def _expired(job: _Job) -> bool:
        return job.deadline is not None and time.monotonic() >= job.deadline
