"""The engine owns the model and schedules generation for concurrent requests.

Callers (strategies, via the servicer) hand it token ids and :class:`SamplingParams` and read back
an async stream of :class:`TextDelta` events ending with one :class:`Finished`.

Scheduling is iteration-level ("continuous") batching on one worker thread. Every iteration:

1. admits waiting requests into free batch slots (``max_concurrent``) and retires sequences whose
   caller went away (cancelled call: the event stream is closed) or whose deadline passed, whether
   they are decoding or halfway through their prompt;
2. prefills prompts within the token budget ``max_prefill_tokens`` (see
   :meth:`Engine._plan_prefill`): whole prompts, shortest first, left-padded together in one
   forward; a prompt too long to share the budget is read in chunks, one such prompt at a time,
   in a second forward. It is promised a quarter of every iteration's budget, so shorter prompts
   overtake it but cannot starve it, and between its chunks come cancellation and deadline
   checks and a decode step for everyone else;
3. runs one decode step for every sequence whose prompt is in the cache.

So an iteration computes at most ``max_prefill_tokens`` prompt tokens (padding included) plus one
token per decoding sequence: that bounds how long a stream waits between two tokens, whatever the
prompts of other requests, and a short prompt gets its first token in the iteration that admits
it unless other short prompts already fill the budget.

Each sequence keeps its own sampling parameters, seeded generator, stop strings, token limit and
deadline; its keys and values live in :class:`~steer.server.kv_cache.PagedKVCache`, whose memory
follows the tokens that are running. A failure while sampling or emitting one sequence's token
fails only that sequence (its caller gets :class:`SequenceFailed`); a failed forward fails only
the sequences in that forward. Beyond ``max_concurrent`` running and ``max_queue`` waiting,
:class:`Overloaded` is raised at once (the servicer maps it to ``RESOURCE_EXHAUSTED``); a request
whose caller left while it waited leaves the queue then, so it holds no place there.

All model calls go through :meth:`Engine._forward`: the engine's own forward for Llama-family models
(:mod:`steer.server.llama_forward`; ``EngineConfig.forward="transformers"`` keeps transformers'
forward, the reference), with each row's adapter mixture set around it.

The configuration, events, errors and per-request state are in :mod:`steer.server.engine_types`
(re-exported here), the batched forwards in :mod:`steer.server.engine_forward`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence

import torch
from steer.server.engine_forward import EngineForwards
from steer.server.engine_types import PREFILL_TOKENS_BY_DEVICE as PREFILL_TOKENS_BY_DEVICE
from steer.server.engine_types import PREFILL_TOKENS_OTHER as PREFILL_TOKENS_OTHER
from steer.server.engine_types import (
    EngineConfig,
    Finished,
    FinishReason,
    Overloaded,
    SequenceFailed,
    TextDelta,
    _Chunks,
    _Job,
    _Sequence,
    prefill_budget,
)
from steer.server.kv_cache import PagedKVCache
from steer.server.llama_forward import LlamaForward
from steer.server.llama_forward import supports as supports_lean

from steer.dry import apply_dry, sequence_breaker_ids
from steer.heap import glibc, keep_freed_memory
from steer.models import LoadedModel, pad_token_id
from steer.sampling import SamplingParams, StopStringDetokenizer, sample_tokens

log = logging.getLogger(__name__)



class Engine(EngineForwards):
    """Continuous-batching generation over one loaded model (see module docstring)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.config = config
        model = loaded.model
        self._pad_id = pad_token_id(loaded.tokenizer, getattr(model, "config", None))
        self._eos = loaded.eos_token_ids
        self._dry_breakers: frozenset[int] | None = None  # steer.dry's sequence breakers, built when first needed
        first = next(model.parameters())
        dtype = first.dtype
        self.device = first.device  # inputs go there; logits come back to the CPU, where sampling runs
        self.max_prefill_tokens = prefill_budget(config, self.device)
        # The engine's own forward (built on the worker thread: fusing the projections copies weights)
        self._lean: LlamaForward | None = None
        self._use_lean = config.forward == "steer" and supports_lean(model)
        self._cache_dtype = dtype
        self.cache: PagedKVCache | None = None  # built on the worker thread (see _run)
        self._sdpa = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        # Mixture adapters (steer.mixture): a forward with MIXTURE rows sets each row's adapter weights
        # (other rows get the default row, every adapter off); a forward without any runs the plain weights.
        self._mixture = getattr(loaded, "mixture", None)
        self._mask_dtype = dtype
        self._running: list[_Sequence] = []  # admitted: prefilling or decoding, in admission order
        self._waiting: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        # Counters for metrics, benchmarks and tests (read without the lock: monotonic ints).
        self.generated_tokens = 0
        self.steps = 0  # decode forwards
        self.prefill_forwards = 0
        self.on_finish = None  # optional callable(Finished), called on the worker thread (metrics)
        self._libc = glibc()  # None where the C library is not glibc: nothing to trim
        # Freed step tensors stay in the heap for the next step instead of faulting in again (steer.heap);
        # the worker trims when it goes idle.
        keep_freed_memory(self._libc)
        self._worked = False  # an iteration ran since the last heap trim
        self.heap_trims = 0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="steer-engine", daemon=True)
        self._worker.start()
        self._started.wait()
        if self._start_error is not None:
            self._worker.join()
            raise self._start_error

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

    async def generate(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None,
                       mix: Sequence[float] | None = None) -> AsyncIterator[TextDelta | Finished]:
        """Stream the generation for ``prompt_ids``. Leaving the loop early cancels the sequence.

        ``mix``: the weights of the model's mixture adapters for this request (one per adapter of the
        stack, :attr:`LoadedModel.mixture`); None: the default row. Rows of one batch mix independently.

        Raises :class:`Overloaded` when there is no room, :class:`SequenceFailed` when generating
        this request failed (other requests are not affected)."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in a context of {self.context_length}")
        row = None
        if mix is not None:
            if self._mixture is None:
                raise ValueError("this model carries no mixture adapters; mix must be None")
            row = torch.tensor(list(mix), dtype=torch.float32)
            if row.shape != (len(self._mixture.names),) or not bool(torch.isfinite(row).all()):
                raise ValueError(f"mix must hold {len(self._mixture.names)} finite weights "
                                 f"({list(self._mixture.names)}), got {list(mix)}")
        job = _Job(list(prompt_ids), params, deadline, asyncio.get_running_loop(), asyncio.Queue(), mix=row)
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
            job.cancelled.set()  # no-op once finished; a running sequence leaves at the next iteration
            self._forget(job)

    def _admit(self, job: _Job) -> None:
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            free = max(0, self.config.max_concurrent - len(self._running))
            # A job whose caller left while it waited holds no place: _forget drops it at once, and
            # one whose event loop died (emit could not reach it) is not counted until it is popped.
            waiting = sum(not j.cancelled.is_set() for j in self._waiting)
            if waiting >= self.config.max_queue + free:
                raise Overloaded(
                    f"server is at capacity: {len(self._running)} running (max_concurrent="
                    f"{self.config.max_concurrent}) and {waiting} waiting "
                    f"(max_queue={self.config.max_queue}); retry with backoff"
                )
            self._waiting.append(job)
            self._cond.notify()

    def _forget(self, job: _Job) -> None:
        """Take ``job`` out of the waiting queue if it is still there (its caller left before it started)."""
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:  # started, finished, or already dropped
                pass

    def close(self, timeout: float = 30) -> bool:
        """Stop accepting work; waiting and running sequences end as CANCELLED.

        Waits up to ``timeout`` seconds for the worker thread to leave its current step and end
        every sequence. True when it has stopped; False when it is still inside a model call (it
        stops when that returns; a caller may then exit without waiting for it)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=timeout)
        return not self._worker.is_alive()

    # -- worker thread: one iteration ------------------------------------------------------------

    def _run(self) -> None:
        # All of the engine's torch work happens on this thread, the fused projections' buffers and the
        # cache's allocation included: it is then the only thread with an OpenMP team of its own, whose
        # threads spin between the small GEMMs of a decode step (see steer.threads). The fused buffers
        # become the model's weights, so they are made outside inference mode (the model stays usable
        # by ordinary torch code); the cache's tensors are made inside it, so they are inference
        # tensors: every update of them, closing the last sequences at shutdown included, stays inside
        # inference mode.
        try:
            self._lean = LlamaForward(self.loaded.model) if self._use_lean else None
            with torch.inference_mode():
                self.cache = PagedKVCache.for_model(self.loaded.model.config, self.config.max_concurrent,
                                                    self._cache_dtype, self.loaded.context_length, device=self.device)
        except BaseException as e:  # raised by __init__
            self._start_error = e
            return
        finally:
            self._started.set()
        with torch.inference_mode():
            self._loop()
            self._cancel_everything()

    def _loop(self) -> None:
        while True:
            self._trim_if_idle()
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
                self._start_waiting()
            try:
                self._iterate()
            except Exception as exc:  # a scheduling bug: fail what runs, never the worker
                log.exception("engine iteration failed")
                for seq in list(self._running):
                    self._fail(seq, exc, "scheduling", traceback=False)

    def _cancel_everything(self) -> None:
        """Shutdown: every waiting and running request ends as CANCELLED (a final event for each caller)."""
        with self._cond:
            leftovers = list(self._waiting)
            self._waiting.clear()
        for job in leftovers:
            job.cancelled.set()
            self._finish_unstarted(job, FinishReason.CANCELLED)
        for seq in list(self._running):
            self._retire(seq, FinishReason.CANCELLED)

    def _trim_if_idle(self) -> None:
        """Going idle after work: give the heap's free pages back to the OS (glibc ``malloc_trim``).

        Prefill activations and a grown KV pool come from glibc's heap, which keeps them resident
        once freed: after one 6k-token prompt the server stayed 13% above its idle size for good.
        One trim when the last sequence has left costs milliseconds; a busy engine never trims."""
        if not self._worked or self._libc is None:
            return
        with self._cond:
            if self._waiting or self._running or self._closed:
                return
        self._worked = False
        self._libc.malloc_trim(0)
        self.heap_trims += 1

    def _iterate(self) -> None:
        self._worked = True
        for seq in list(self._running):  # between chunks and steps: callers gone, deadlines passed
            if seq.job.cancelled.is_set():
                self._retire(seq, FinishReason.CANCELLED)
            elif self._expired(seq.job):
                self._retire(seq, FinishReason.TIME_LIMIT)
        for chunks in self._plan_prefill():
            self._guarded([s for s, _ in chunks], "prefill", self._prefill, chunks)
        decoding = [s for s in self._running if s.prompt_left == 0]
        if decoding:
            self._guarded(decoding, "decode", self._decode, decoding)

    def _guarded(self, seqs: list[_Sequence], stage: str, step, *args) -> None:
        """Run one forward; if it raises, fail the sequences in it (and only those)."""
        try:
            step(*args)
        except Exception as exc:
            log.exception("%s forward failed for %d sequence(s)", stage, len(seqs))
            for seq in seqs:
                self._fail(seq, exc, stage, traceback=False)

    def _start_waiting(self) -> None:
        """Move waiting jobs into free slots (called with the lock)."""
        while self._waiting and len(self._running) < self.config.max_concurrent:
            job = self._waiting.popleft()
            if job.cancelled.is_set() or self._expired(job):
                self._finish_unstarted(
                    job, FinishReason.CANCELLED if job.cancelled.is_set() else FinishReason.TIME_LIMIT)
                continue
            self._running.append(_Sequence(
                job=job, slot=self.cache.open(), generator=job.params.make_generator(),
                detok=StopStringDetokenizer(self.loaded.tokenizer, job.params.stop),
                limit=min(job.params.max_new_tokens, self.context_length - len(job.prompt_ids)),
                started=time.monotonic(),
            ))

    def _plan_prefill(self) -> list[_Chunks]:
        """This iteration's prefill forwards, within ``max_prefill_tokens`` padded tokens in all.

        A prompt too long to share the budget (over three quarters of it) is read in chunks, one at
        a time, oldest first; it is promised a quarter of every iteration's budget, so it always
        progresses. The rest goes to whole prompts, shortest first, left-padded to the longest of
        them in one forward (rows x width within what is left); whatever they leave over also goes
        to the chunked prompt, in a second forward.
        """
        budget = self.max_prefill_tokens
        pending = [s for s in self._running if s.prompt_left > 0]  # admission order
        if not pending:
            return []
        quarter = max(1, budget // 4)
        chunked = next((s for s in pending if s.length > 0), None)  # at most one is part-way
        if chunked is None:
            chunked = next((s for s in pending if s.prompt_left > budget - quarter), None)
        promised = min(chunked.prompt_left, quarter) if chunked else 0
        whole: _Chunks = []
        width = 0
        for seq in sorted((s for s in pending if s is not chunked), key=lambda s: (s.prompt_left, s.job.arrived)):
            grown = max(width, seq.prompt_left)
            if (len(whole) + 1) * grown > budget - promised:
                break
            whole.append((seq, seq.prompt_left))
            width = grown
        plan = [whole] if whole else []
        if chunked is not None:
            plan.append([(chunked, min(chunked.prompt_left, budget - len(whole) * width))])
        return plan

    # -- tokens, per sequence --------------------------------------------------------------------

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each sequence (rows of ``logits``), emit text, retire finished ones.

        Whatever goes wrong for one sequence here (sampling, detokenising, stop strings) fails
        that sequence alone."""
        tokens = self._sample(seqs, logits)
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if isinstance(token, Exception):
                self._fail(seq, token, "sampling")
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            try:
                reason = self._accept(seq, token)
            except Exception as exc:
                self._fail(seq, exc, "detokenizing")
                continue
            if reason is not None:
                self._retire(seq, reason)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """Tokens for all rows in one call; if that raises, row by row, so one bad row fails alone.
        (``sample_tokens`` raises before advancing any generator, so the retry draws the same.)"""
        params, generators = [s.job.params for s in seqs], [s.generator for s in seqs]
        if any(p.dry_multiplier > 0 for p in params):
            if self._dry_breakers is None:  # once, on the first request that asks for DRY
                self._dry_breakers = sequence_breaker_ids(self.loaded.tokenizer)
            logits = apply_dry(logits, [s.detok.ids for s in seqs], params, self._dry_breakers)
        try:
            return sample_tokens(logits, params, generators)
        except Exception:
            out: list[int | Exception] = []
            for i in range(len(seqs)):
                try:
                    out.append(sample_tokens(logits[i:i + 1], params[i:i + 1], generators[i:i + 1])[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def _accept(self, seq: _Sequence, token: int) -> FinishReason | None:
        """Take one sampled token: emit its text; say why the sequence ends, if it does."""
        if token in self._eos:
            return FinishReason.STOP
        self.generated_tokens += 1
        seq.last_token = token
        delta = seq.detok.push(token)
        if delta:
            seq.job.emit(TextDelta(delta))
        if seq.detok.stopped:
            return FinishReason.STOP_SEQUENCE
        if len(seq.detok.ids) >= seq.limit:
            return FinishReason.LENGTH
        return None

    def _release(self, seq: _Sequence) -> None:
        """Give ``seq``'s cache blocks and slot back, then take it out of the batch (so that a
        batch seen without it has its memory back)."""
        self.cache.close(seq.slot)
        self._running.remove(seq)

    def _retire(self, seq: _Sequence, reason: FinishReason) -> None:
        """Free the slot, then tell the caller: a finished call never holds a slot."""
        self._release(seq)
        self._finish(seq, reason)

    def _fail(self, seq: _Sequence, exc: Exception, stage: str, traceback: bool = True) -> None:
        """End ``seq`` with :class:`SequenceFailed` (unless it already ended), freeing its slot."""
        if seq not in self._running:
            return
        log.error("request failed while %s (%d prompt tokens): %s: %s", stage, len(seq.job.prompt_ids),
                  type(exc).__name__, exc, exc_info=exc if traceback else None)
        error = SequenceFailed(f"generation failed while {stage} for this request: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        self._release(seq)
        seq.job.emit(error)

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
