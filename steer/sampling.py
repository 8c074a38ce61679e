"""Sampling parameters, the next-token sampler and incremental detokenisation with stop strings.

These are the per-request pieces of decoding, model-free and batch-agnostic. The server's engine
(which owns batching and the KV cache) samples with :func:`sample_tokens` and one seeded generator
per request, so a request's text does not depend on its batch. Offline generation (DPA candidates,
evaluation: :mod:`steer.generation`) shares :class:`SamplingParams`, the meaning of every field and
the stop-string handling, but samples through transformers' ``generate`` with one seed per batch,
so its results depend on the batch size (fixed per run, recorded in the run's config).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch

from steer.errors import InvalidInput

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
# Temperatures below this decode greedily, as vLLM does (its _SAMPLING_EPS): the tempered
# distribution is then the argmax up to exact ties, and an explicit argmax needs no random draw.
# Unlike vLLM we do not raise temperatures in [1e-5, 1e-2) to 1e-2: the sampler is exact there.
GREEDY_TEMPERATURE = 1e-5
_FLOAT32_MAX = torch.finfo(torch.float32).max  # a larger Python float temperature would become inf


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Errors name the request field (``sampling.<name>``)."""

    max_new_tokens: int = 256  # generated tokens at most (the end-of-turn token not counted)
    temperature: float = 0.7  # logits are divided by it; 0 (or < GREEDY_TEMPERATURE) = greedy
    top_p: float = 0.9  # nucleus mass kept, in (0, 1]; 1 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    seed: int | None = None  # same seed + same request -> same text; None = fresh entropy
    stop: tuple[str, ...] = field(default_factory=tuple)  # text stops before the first of these
    # DRY loop penalty (steer.dry): a token that would extend a repeat of L >= dry_allowed_length
    # generated tokens loses dry_multiplier * dry_base ** (L - dry_allowed_length) from its logit.
    dry_multiplier: float = 0.0  # 0 disables
    dry_base: float = 1.75
    dry_allowed_length: int = 2

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInput("sampling.max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if (not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature)
                or self.temperature < 0):
            raise InvalidInput("sampling.temperature",
                               f"must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidInput("sampling.top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInput("sampling.top_k", f"must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise InvalidInput("sampling.seed", f"must be an integer in [0, 2**64), got {self.seed!r}")
        for name, low in (("dry_multiplier", 0.0), ("dry_base", 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < low):
                raise InvalidInput(f"sampling.{name}", f"must be finite and >= {low:g}, got {value!r}")
        if (isinstance(self.dry_allowed_length, bool) or not isinstance(self.dry_allowed_length, int)
                or self.dry_allowed_length < 1):
            raise InvalidInput("sampling.dry_allowed_length",
                               f"must be an integer >= 1, got {self.dry_allowed_length!r}")
        stop = tuple(self.stop)
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidInput("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise InvalidInput(f"sampling.stop[{i}]", "must be a non-empty string")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidInput(f"sampling.stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or so small (< GREEDY_TEMPERATURE) that it is the same."""
        return self.temperature < GREEDY_TEMPERATURE

    def with_overrides(self, **overrides) -> SamplingParams:
        """A copy with the given fields replaced (``None`` values are ignored: they mean 'default')."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def make_generator(self) -> torch.Generator:
        """A CPU generator seeded from ``seed`` (or fresh entropy when unset)."""
        g = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        # torch seeds are int64-wide; fold a uint64 seed into range without losing distinctness.
        g.manual_seed(seed % (2**63))
        return g


# Candidates examined per row before falling back to a full sort: the nucleus of a chat model's
# next-token distribution is almost always far smaller, and topk(256) is much cheaper than sort(V).
_CANDIDATES = 256


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Sample one token per row of ``logits`` ``(n, V)``, each row with its own params and generator.

    Every sampled row draws exactly one uniform number from its generator per call and inverts the
    CDF of its filtered distribution (tokens in descending probability order), so a sequence gets
    the same tokens whether it is sampled alone or in a batch (up to float noise in the logits).
    Greedy rows (``params.greedy``) take the argmax and draw nothing.

    Safe for every temperature the params admit: each row is shifted so its maximum is exactly 0
    before it is divided by the temperature, so the scaled row is <= 0 and holds no inf/NaN at any
    temperature (a tiny one sends the rest to -inf, a huge one flattens the row to uniform); the
    top-k/top-p order is taken from the unscaled row, which division cannot reorder or tie.
    Raises ``ValueError`` naming the row when a row has NaN, +inf or no finite logit; it raises
    before any generator is advanced, so a caller can retry the healthy rows alone.
    """
    n, vocab = logits.shape
    row_max = logits.max(dim=-1).values  # (n,): NaN if the row has one, +inf if it has one
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        what = "NaN" if bool(torch.isnan(logits[i]).any()) else "+inf" if float(row_max[i]) > 0 else "no finite value"
        raise ValueError(f"the model's logits for row {i} of {n} contain {what}: no token can be sampled from them")
    out = [0] * n
    rows = [i for i in range(n) if not params[i].greedy]
    for i in range(n):
        if params[i].greedy:
            out[i] = int(torch.argmax(logits[i]))
    if not rows:
        return out
    # Temperatures >= GREEDY_TEMPERATURE here; a Python float beyond float32 would round to inf.
    temps = torch.tensor([min(params[i].temperature, _FLOAT32_MAX) for i in rows],
                         dtype=torch.float32)[:, None]  # (m, 1)
    raw = logits[rows].float()  # (m, V)
    shift = row_max[rows].float()[:, None]  # (m, 1)
    lse = torch.logsumexp((raw - shift) / temps, dim=-1, keepdim=True)  # (m, 1): the full normaliser, in [0, log V]
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32)
    k = min(vocab, max(_CANDIDATES, int(top_k[top_k < vocab].max()) if (top_k < vocab).any() else 0))
    u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows])  # (m,): one draw per sampled row
    raw_vals, order = torch.topk(raw, k, dim=-1)  # (m, k), descending
    probs, cum = _nucleus_probs((raw_vals - shift) / temps, lse, top_k, vocab)
    # A row whose kept set may extend past the k candidates needs its whole vocabulary sorted; only
    # that row pays for it (a batch of 32 rows where one is flat must not sort all 32).
    covered = (cum[:, -1] >= top_p) | (top_k <= k) | (k == vocab)  # (m,)
    chosen = torch.empty(len(rows), dtype=torch.long)  # (m,)
    part = torch.nonzero(covered).flatten()
    if len(part):
        chosen[part] = _draw(probs[part], cum[part], order[part], top_k[part], top_p[part], u[part])
    part = torch.nonzero(~covered).flatten()
    if len(part):
        raw_vals, order = torch.sort(raw[part], dim=-1, descending=True)  # (f, V)
        probs, cum = _nucleus_probs((raw_vals - shift[part]) / temps[part], lse[part], top_k[part], vocab)
        chosen[part] = _draw(probs, cum, order, top_k[part], top_p[part], u[part])
    for j, i in enumerate(rows):
        out[i] = int(chosen[j])
    return out


def _draw(probs: torch.Tensor, cum: torch.Tensor, order: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
          u: torch.Tensor) -> torch.Tensor:
    """The token each row's uniform ``u`` (m,) picks by inverting the CDF of its kept candidates:
    ``probs``/``cum`` (m, k) in descending order (``order``: their token ids), kept while within
    ``top_k`` and while the mass before them is below ``top_p``."""
    k = probs.shape[1]
    position = torch.arange(k)[None, :]
    # The first candidate is always kept (position 0 < top_k, and no mass lies before it).
    keep = (position < top_k[:, None]) & ((cum - probs) < top_p[:, None])  # (m, k)
    kept = torch.where(keep, probs, torch.zeros_like(probs)).cumsum(dim=-1)  # (m, k)
    target = u * kept[:, -1]
    idx = torch.searchsorted(kept, target[:, None], right=True).clamp_(max=k - 1)  # (m, 1)
    # Never land on a dropped tail position because of rounding at the boundary.
    idx = torch.minimum(idx, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(1, idx)[:, 0]


def _nucleus_probs(vals: torch.Tensor, lse_full: torch.Tensor, top_k: torch.Tensor, vocab: int):
    """Probabilities of the sorted candidates ``vals`` (m, k) as top-p sees them, and their cumsum.

    As in transformers' and vLLM's samplers, top-p applies to the distribution renormalised over
    the top-k survivors, so rows with a top-k use the log-sum-exp of their first top_k candidates.
    """
    position = torch.arange(vals.shape[1])[None, :]
    lse_k = torch.logsumexp(vals.masked_fill(position >= top_k[:, None], float("-inf")), dim=-1, keepdim=True)
    lse = torch.where((top_k < vocab)[:, None], lse_k, lse_full)  # top_k == vocab means "no top-k"
    probs = torch.exp(vals - lse)  # (m, k)
    return probs, probs.cumsum(dim=-1)


class StopStringDetokenizer:
    """Turns a growing list of token ids into safe-to-send text deltas, honouring stop strings.

    Text is re-decoded from all ids each step (byte-level BPE can only be decoded safely on whole
    sequences). A delta is held back while it ends in an incomplete UTF-8 character or could be the
    beginning of a stop string; once a stop string appears, text is cut before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.text = ""
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that may be sent now (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.text = text
        if self.stop:
            cut = self._first_stop(text)
            if cut is not None:
                self.text = text[:cut]
                self.stopped = True
                return self._emit(self.text)
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        safe -= self._stop_prefix_len(text[:safe])
        return self._emit(text[: max(safe, self.sent)])

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        return self._emit(self.text)

    def _emit(self, upto: str) -> str:
        delta = upto[self.sent:]
        self.sent = len(upto)
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Only text near the unsent tail can hold a new match.
        start = max(0, self.sent - max(len(s) for s in self.stop))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
