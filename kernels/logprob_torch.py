"""Linear log-prob in pure torch: the naive reference and the chunked CPU path.

Both compute, for hidden states X (N, H), an LM head W (V, H), optional bias b (V,) and targets t (N,),

    z      = (X W^T + b) / T                      # (N, V) temperature-scaled logits
    logp_i = z[i, t_i] - logsumexp(z[i, :])       # (N,)  0 where t_i == ignore_index

`naive_linear_logprob` materialises z; `torch_linear_logprob` never holds more than one
(V, chunk) slab of it (two for half inputs: the GEMM output and its fp32 copy) and has the same
signature as the Triton path (`logprob_triton.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

# Bytes of (V, chunk) workspace the chunked path may hold at once (the logits slab in the input
# dtype, plus an fp32 one for half inputs). 32 MiB gives 160 rows at V = 49152; measured on the
# dev CPU (MKL, one thread, CPU time) fwd+bwd then takes 1.05x the four full-size GEMMs, about as
# fast as 192 or 256 rows, whose extra 6-19 MiB would push peak memory towards 7% of the naive
# path's; below ~128 rows the GEMMs themselves slow down.
WORKSPACE_BYTES = 32 * 2**20
# Fewer rows than this per GEMM and the chunked loop stops being GEMM-bound, whatever V is.
# At 16 rows even V = 256k needs only 16 MiB, so chunking over the vocabulary is never needed.
MIN_CHUNK_ROWS = 16
LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax maths and outputs run in fp32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def naive_linear_logprob(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, **options: Any
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reference: full logits, log_softmax, gather. Plain autograd; returns (logp, lse, entropy).

    `options` are the fused paths' keyword options, named and defaulted as in `LogprobOptions`
    (another name raises TypeError), so a test calls the reference and a path alike.

    Memory traffic (fp32, 4 bytes/element; N = 4096, V = 49152 makes one N x V tensor 805 MB):
      forward   write logits (NV), read logits + write log-probs (2NV, kept for backward)
      backward  write grad of log-probs (NV, zeros + scatter), read it and the saved log-probs,
                write grad of logits (3NV), then read grad of logits twice in the dX/dW GEMMs (2NV)
    so about 8 NV-sized passes and three N x V tensors alive at the peak of backward (~2.4 GB),
    against the O(NH + VH) the fused path needs beyond its chunk workspace.
    """
    temperature, ignore_index, return_lse, return_entropy = LogprobOptions(**options)
    valid = targets != ignore_index  # (N,)
    safe_targets = targets.masked_fill(~valid, 0)  # (N,) gather needs an in-range index
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    logits = logits.to(accumulation_dtype(logits.dtype))  # (N, V) fp32 copy for half inputs only
    if temperature != 1.0:
        logits = logits / temperature  # (N, V) another N x V tensor; skipped at T = 1
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    logp = logp.masked_fill(~valid, 0.0)
    lse = entropy = None
    if return_lse:
        lse = torch.logsumexp(logits, dim=-1).masked_fill(~valid, 0.0)  # (N,)
    if return_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~valid, 0.0)  # (N,)
    return logp, lse, entropy


def chunk_rows_for(vocab_size: int, dtype: torch.dtype, budget_bytes: int = WORKSPACE_BYTES) -> int:
    """Rows per chunk so that the (V, chunk) workspace fits `budget_bytes` (a multiple of 16)."""
    # A slab in the accumulation dtype always; half inputs add one in their own dtype for the GEMM output.
    itemsize = torch.finfo(dtype).bits // 8
    acc_itemsize = torch.finfo(accumulation_dtype(dtype)).bits // 8
    bytes_per_row = vocab_size * (acc_itemsize + (itemsize if dtype in LOW_PRECISION else 0))
    rows = budget_bytes // max(bytes_per_row, 1)
    return max(MIN_CHUNK_ROWS, rows // 16 * 16)


class _Rows:
    """The rows the op works on: all of them (views, no copies) or the non-ignored ones (gathers)."""

    def __init__(self, valid: Tensor):
        n = valid.numel()
        # A boolean reduction is cheap on CPU; ignored rows (prompt, padding) are skipped entirely.
        self.index = None if bool(valid.all()) else valid.nonzero().squeeze(1)  # (N_valid,)
        self.count = n if self.index is None else self.index.numel()

    def take(self, src: Tensor, start: int, stop: int) -> Tensor:
        if self.index is None:
            return src[start:stop]
        return src.index_select(0, self.index[start:stop])

    def put(self, dst: Tensor, start: int, stop: int, values: Tensor) -> None:
        if self.index is None:
            dst[start:stop].copy_(values)
        else:
            dst.index_copy_(0, self.index[start:stop], values.to(dst.dtype))


class _Slab:
    """A reusable (V, c) workspace: column j holds the logits of the chunk's j-th row.

    Transposed on purpose: MKL computes W @ X_c^T ((V, H) @ (H, c)) ~15% faster than
    X_c @ W^T at c = 160 (it packs the small X_c once and streams W, instead of re-packing all of
    W for every chunk), which outweighs running the softmax along the slab's outer dimension.
    Backed by one flat buffer so that the last, shorter chunk is still a contiguous (V, c) view.
    """

    def __init__(self, like: Tensor, rows: int, vocab: int, dtype: torch.dtype):
        self.flat = like.new_empty(rows * vocab, dtype=dtype)  # (C * V,)
        self.vocab = vocab

    def view(self, c: int) -> Tensor:
        return self.flat[: self.vocab * c].view(self.vocab, c)  # (V, c)


def _logits_t(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, inv_t: float) -> Tensor:
    """out (V, c) = ((x W^T + b) / T)^T, the 1/T folded into the GEMM's alpha/beta: no extra pass."""
    if bias is None:
        if inv_t == 1.0:
            return torch.mm(weight, x.t(), out=out)
        # beta = 0: the (uninitialised) `out` passed as addmm's input is ignored, NaNs included.
        return torch.addmm(out, weight, x.t(), beta=0.0, alpha=inv_t, out=out)
    return torch.addmm(bias.unsqueeze(1), weight, x.t(), beta=inv_t, alpha=inv_t, out=out)


def _shifted_logits_t(out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, inv_t: float, lse: Tensor) -> Tensor:
    """out (V, c) = z^T - lse: the shift is written first and the GEMM accumulates onto it (beta = 1),
    so exp_() alone then gives the softmax, one pass over the slab instead of sub_ and exp_."""
    if bias is None:
        out.copy_(lse.neg().unsqueeze(0).expand_as(out))  # (V, c) <- -lse (1, c)
    else:
        torch.sub(bias.unsqueeze(1) * inv_t, lse.unsqueeze(0), out=out)  # (V, 1) - (1, c)
    return out.addmm_(weight, x.t(), alpha=inv_t)


class ChunkedLinearLogprob(torch.autograd.Function):
    """Chunked over tokens; saves (hidden, weight, bias, targets, lse) and recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy, chunk_rows):
        # hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64
        n, _ = hidden.shape
        v = weight.shape[0]
        inv_t = 1.0 / temperature
        rows = _Rows(targets != ignore_index)
        half = hidden.dtype in LOW_PRECISION
        acc = accumulation_dtype(hidden.dtype)
        logp = hidden.new_zeros(n, dtype=acc)  # (N,)
        lse = hidden.new_zeros(n, dtype=acc)  # (N,)
        entropy = hidden.new_zeros(n if return_entropy else 0, dtype=acc)  # (N,) | (0,)
        c = min(chunk_rows, rows.count)
        if c > 0:
            slab = _Slab(hidden, c, v, hidden.dtype)  # GEMM output, input dtype
            slab32 = slab if not half else _Slab(hidden, c, v, acc)  # softmax maths in fp32
            for start in range(0, rows.count, c):
                stop = min(start + c, rows.count)
                x = rows.take(hidden, start, stop)  # (c, H)
                t = rows.take(targets, start, stop).unsqueeze(0)  # (1, c)
                z = _logits_t(slab.view(stop - start), x, weight, bias, inv_t)  # (V, c)
                z32 = z if not half else slab32.view(stop - start).copy_(z)  # (V, c) fp32
                z_t = z32.gather(0, t).squeeze(0)  # (c,) target logit, read before the slab is overwritten
                # In place: the kernel reduces max and sum of exp into temporaries before it writes
                # z - max - log(sum), so the slab turns into log-probs without a second buffer.
                torch.log_softmax(z32, 0, out=z32)  # (V, c) log-probs
                logp_t = z32.gather(0, t).squeeze(0)  # (c,)
                rows.put(logp, start, stop, logp_t)
                rows.put(lse, start, stop, z_t - logp_t)
                if return_entropy:
                    # H = -sum p log p; entr(p) = -p log p, both in place on the slab (exp then entr).
                    rows.put(entropy, start, stop, torch.special.entr(z32.exp_(), out=z32).sum(0))
        ctx.save_for_backward(hidden, weight, bias, targets, lse)  # never the logits
        ctx.rows = rows
        ctx.inv_t = inv_t
        ctx.chunk = c
        ctx.mark_non_differentiable(lse, entropy)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows, inv_t, c = ctx.rows, ctx.inv_t, ctx.chunk
        n, h = hidden.shape
        v = weight.shape[0]
        half = hidden.dtype in LOW_PRECISION
        acc = accumulation_dtype(hidden.dtype)
        grad_x = None
        if need_x:  # (N, H); ignored rows must be 0, other rows are all written below
            grad_x = torch.zeros_like(hidden) if rows.index is not None else torch.empty_like(hidden)
        # dW accumulates over all chunks, in fp32 for half inputs so they do not round at every
        # chunk. The first chunk writes it (beta = 0), sparing a 4VH-byte zero fill.
        grad_w = None
        if need_w:  # (V, H)
            grad_w = weight.new_empty(v, h, dtype=acc) if c > 0 else weight.new_zeros(v, h, dtype=acc)
        grad_b = weight.new_zeros(v, dtype=acc) if need_b else None  # (V,)
        if c > 0 and (need_x or need_w or need_b):
            # d logp_i / d (x_i W^T + b) = (onehot(t_i) - p_i) / T. We form (p - onehot) in the slab
            # and fold the per-row scale -g_i / T into the small operands of the GEMMs (dX rows,
            # X rows, the bias GEMV): the slab sees one elementwise pass, the exp.
            scale = grad_logp.to(acc).mul(-inv_t)  # (N,)
            slab = _Slab(hidden, c, v, hidden.dtype)
            slab32 = slab if not half else _Slab(hidden, c, v, acc)
            for start in range(0, rows.count, c):
                stop = min(start + c, rows.count)
                x = rows.take(hidden, start, stop)  # (c, H)
                t = rows.take(targets, start, stop).unsqueeze(0)  # (1, c)
                s = rows.take(scale, start, stop).unsqueeze(1)  # (c, 1)
                lse_c = rows.take(lse, start, stop)  # (c,)
                if not half:
                    p = _shifted_logits_t(slab.view(stop - start), x, weight, bias, inv_t, lse_c).exp_()  # (V, c)
                else:  # the shift is applied in fp32, after the half GEMM output is upcast
                    z = _logits_t(slab.view(stop - start), x, weight, bias, inv_t)  # (V, c) half
                    p = slab32.view(stop - start).copy_(z).sub_(lse_c.unsqueeze(0)).exp_()  # (V, c) fp32
                p.scatter_add_(0, t, p.new_full(t.shape, -1.0))  # (V, c) p - onehot
                if need_x:
                    g = p if not half else z.copy_(p)  # (V, c) in the GEMM dtype
                    if rows.index is None and not half:  # straight into dX's rows
                        torch.mm(g.t(), weight, out=grad_x[start:stop]).mul_(s)  # (c, H)
                    else:
                        rows.put(grad_x, start, stop, torch.mm(g.t(), weight).to(acc).mul_(s))  # (c, H)
                if need_w:
                    torch.addmm(grad_w, p, x.to(acc) * s, beta=1.0 if start else 0.0, out=grad_w)  # (V, c) @ (c, H)
                if need_b:
                    grad_b.addmv_(p, s.squeeze(1))  # (V, c) @ (c,)
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class LogprobOptions(NamedTuple):
    """The keyword options of `naive_linear_logprob` and the fused paths (`torch_linear_logprob`,
    `logprob_triton.triton_linear_logprob`)."""

    temperature: float = 1.0
    ignore_index: int = -100
    return_lse: bool = False
    return_entropy: bool = False


def fused_linear_logprob(
    function: type[torch.autograd.Function],
    config: object,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    options: Mapping[str, Any],
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Runs a fused path's autograd Function; returns (logp, lse, entropy) with None for what was not asked for.

    `function` is `ChunkedLinearLogprob` or `logprob_triton.TritonLinearLogprob`, both applied as
    (hidden, weight, bias, targets, temperature, ignore_index, return_entropy, config), `config`
    being the chunk rows or the tile sizes. `options` are the caller's keyword options, named and
    defaulted as in `LogprobOptions` (another name raises TypeError).
    """
    temperature, ignore_index, return_lse, return_entropy = LogprobOptions(**options)
    logp, lse, entropy = function.apply(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(return_entropy), config
    )
    return logp, (lse if return_lse else None), (entropy if return_entropy else None)


def torch_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_rows: int | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Chunked torch path; returns (logp, lse, entropy) with None for what was not asked for.

    hidden (N, H) and targets (N,) are already flattened and validated by the dispatcher
    (`logprob.linear_logprob`). `options` are temperature, ignore_index, return_lse and
    return_entropy (`LogprobOptions`). `chunk_rows` overrides the workspace-derived
    chunk (tests use it to cross chunk boundaries on small shapes).
    """
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(weight.shape[0], hidden.dtype)
    return fused_linear_logprob(ChunkedLinearLogprob, int(rows), hidden, weight, targets, bias, options)
