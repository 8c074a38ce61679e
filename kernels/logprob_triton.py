"""Linear log-prob in Triton: jit kernels, a launcher, an autograd.Function (Liger-Kernel layering).

Same maths and signature as `logprob_torch.torch_linear_logprob`:
    z = (X W^T + b) / T,   logp_i = z[i, t_i] - logsumexp_v z[i, v]

Forward: one program per BLOCK_N rows walks the vocabulary in BLOCK_V tiles, computing each logits
tile with a K-loop over H (fp32 accumulator) and folding it into an online log-sum-exp
(running max m, running sum s, and for the entropy the running sum u of e^(z-m) (z-m)).
Only lse (N,) is written for backward; no (N, V) tensor exists at any point.

Backward: one program per (BLOCK_N rows, BLOCK_V vocab) tile recomputes its logits tile, forms
G = (onehot - p) * g / T in registers, and adds G @ W_tile into dX and G^T @ X_tile into dW with
fp32 atomics, H in BLOCK_H slices. Why atomics rather than a second pass over vocab tiles that owns
dW rows: the second pass would recompute the (N x V x H) logits GEMM a second time (+25% of the
op's FLOPs), while an owned-rows pass streams its dX/dW accumulators through memory exactly like
the atomics do (the accumulators, BLOCK_N x H and BLOCK_V x H, never fit in registers for
H ~ 4k). The cost of atomics is a summation order that varies run to run (fp32, ~1e-6 relative).

`tile_2d`, `matmul_tile`, `input_precision` and `check_block_sizes` serve `mixture_lora_triton` too.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .logprob_torch import fused_linear_logprob


@triton.jit
def tile_2d(N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's tile of an (N, C) output on a 2D grid: rows, cols and their in-bounds masks."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return rows, cols, rows < N, cols < C


@triton.jit
def matmul_tile(
    a_ptr, b_ptr,
    rows, cols, row_mask, col_mask,
    K, stride_an, stride_ak, stride_bk, stride_bc,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """A[rows] @ B[:, cols], fp32, (BLOCK_N, BLOCK_C), for A (N, K) and B (K, C) read through strides."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_an + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bc,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_C)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr,
    rows, cols, row_mask, col_mask,
    H, stride_xn, stride_xh, stride_wv, stride_wh,
    inv_temperature,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """z tile = (X[rows] W[cols]^T + b[cols]) / T, fp32, (BLOCK_N, BLOCK_V)."""
    acc = matmul_tile(x_ptr, w_ptr, rows, cols, row_mask, col_mask,
                      H, stride_xn, stride_xh, stride_wh, stride_wv,  # B = W^T: (h, v) strides
                      BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temperature


@triton.jit
def _linear_logprob_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, t_ptr,  # inputs: (N, H), (V, H), (V,) or dummy, (N,) int64
    logp_ptr, lse_ptr, ent_ptr,  # outputs, fp32 (N,) each; ent_ptr unused without RETURN_ENTROPY
    # sizes
    N, H, V,
    # strides (elements)
    stride_xn, stride_xh, stride_wv, stride_wh,
    # scalars
    inv_temperature, ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    # -1e30 rather than -inf: keeps s * (m_old - m_new) finite (0 * -inf would be NaN) on the first tile.
    m = tl.full((BLOCK_N,), -1e30, dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of e^(z - m)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of e^(z - m) (z - m), for the entropy
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)  # target logit
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
                         stride_xn, stride_xh, stride_wv, stride_wh, inv_temperature,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION)  # (BLOCK_N, BLOCK_V)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 in padded columns
        if RETURN_ENTROPY:
            # sum e^(z-m')(z-m') = e^(m-m') [u + (m - m') s] + this tile's terms; padded columns
            # get z - m' = 0 rather than -inf so that 0 * -inf never makes a NaN.
            shifted = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    valid = row_mask & (tgt != ignore_index)
    tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, 0.0), mask=row_mask)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_mask)
    if RETURN_ENTROPY:
        # H = -sum p log p with p = e/s, log p = (z - m) - log s  =>  H = log s - u / s
        tl.store(ent_ptr + rows, tl.where(valid, log_s - u / s, 0.0), mask=row_mask)


@triton.jit
def _linear_logprob_bwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr,  # inputs as in forward, saved lse (N,), grad of logp (N,)
    dx_ptr, dw_ptr, db_ptr,  # fp32 accumulators, zero-initialised: (N, H), (V, H), (V,)
    # sizes
    N, H, V,
    # strides (elements); dx and dw are contiguous (row stride H)
    stride_xn, stride_xh, stride_wv, stride_wh,
    # scalars
    inv_temperature, ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, cols, row_mask, col_mask = tile_2d(N, V, BLOCK_N, BLOCK_V)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (tgt != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    # d logp / d (x W^T + b) = (onehot - p) / T; ignored rows get scale 0
    scale = tl.where(valid, tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0) * inv_temperature
    z = _logits_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H,
                     stride_xn, stride_xh, stride_wv, stride_wh, inv_temperature,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, INPUT_PRECISION)  # (BLOCK_N, BLOCK_V)
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    grad = (onehot - p) * scale[:, None]
    grad = tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)  # (BLOCK_N, BLOCK_V) fp32
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(grad, axis=0), mask=col_mask)
    if COMPUTE_DX or COMPUTE_DW:
        grad_in = grad.to(x_ptr.dtype.element_ty)  # tensor-core operand in the input dtype
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < H
            if COMPUTE_DX:
                w = tl.load(w_ptr + cols[:, None] * stride_wv + hs[None, :] * stride_wh,
                            mask=col_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_H)
                dx = tl.dot(grad_in, w, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_H)
                tl.atomic_add(dx_ptr + rows[:, None] * H + hs[None, :], dx,
                              mask=row_mask[:, None] & h_mask[None, :])
            if COMPUTE_DW:
                x = tl.load(x_ptr + rows[:, None] * stride_xn + hs[None, :] * stride_xh,
                            mask=row_mask[:, None] & h_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_H)
                dw = tl.dot(tl.trans(grad_in), x, input_precision=INPUT_PRECISION)  # (BLOCK_V, BLOCK_H)
                tl.atomic_add(dw_ptr + cols[:, None] * H + hs[None, :], dw,
                              mask=col_mask[:, None] & h_mask[None, :])


def _block_sizes(hidden: Tensor, block_n: int | None, block_v: int | None, block_h: int | None) -> tuple[int, int, int]:
    """Tile sizes: fixed defaults sized for H100 bf16 (not autotuned), small under the interpreter."""
    if hidden.device.type == "cuda":
        default = (64, 128, 64)
    else:  # TRITON_INTERPRET=1: every tile is a numpy call, so few but still multi-tile blocks
        default = (32, 64, 32)
    return block_n or default[0], block_v or default[1], block_h or default[2]


def linear_logprob_fwd(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, blocks):
    """Launcher: returns (logp, lse, entropy) fp32 (N,) each (entropy empty when not requested)."""
    assert hidden.dim() == 2 and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)  # (N, H), any strides
    n, h = hidden.shape
    assert weight.dim() == 2 and weight.shape[1] == h and weight.dtype == hidden.dtype  # (V, H), any strides
    v = weight.shape[0]
    assert bias is None or (bias.shape == (v,) and bias.is_contiguous())  # (V,), indexed by column
    assert targets.shape == (n,) and targets.dtype == torch.int64 and targets.is_contiguous()  # (N,) ids
    assert hidden.device == weight.device == targets.device  # one device; CPU only under TRITON_INTERPRET=1
    block_n, block_v, block_h = blocks
    logp = hidden.new_empty(n, dtype=torch.float32)
    lse = hidden.new_empty(n, dtype=torch.float32)
    entropy = hidden.new_empty(n if return_entropy else 0, dtype=torch.float32)
    if n == 0:
        return logp, lse, entropy
    grid = (triton.cdiv(n, block_n),)
    _linear_logprob_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        logp, lse, entropy if return_entropy else logp,
        n, h, v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, ignore_index,
        HAS_BIAS=bias is not None, RETURN_ENTROPY=return_entropy,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        INPUT_PRECISION=input_precision(hidden),
        num_warps=8,
    )
    return logp, lse, entropy


def linear_logprob_bwd(grad_logp, hidden, weight, bias, targets, lse, temperature, ignore_index, needs, blocks):
    """Launcher: returns (dX, dW, db) in the input dtypes, None for what `needs` does not ask for."""
    need_x, need_w, need_b = needs
    n, h = hidden.shape
    v = weight.shape[0]
    assert lse.shape == (n,) and lse.dtype == torch.float32  # (N,) saved by forward, contiguous
    grad_logp = grad_logp.contiguous()  # (N,) upstream gradient, any float dtype, read as fp32
    block_n, block_v, block_h = blocks
    # fp32 accumulators: thousands of tiles add into each element, bf16 would drop most of them.
    dx = torch.zeros(n, h, device=hidden.device, dtype=torch.float32) if need_x else None  # (N, H)
    dw = torch.zeros(v, h, device=hidden.device, dtype=torch.float32) if need_w else None  # (V, H)
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_b else None  # (V,)
    if n > 0 and (need_x or need_w or need_b):
        dummy = lse
        grid = (triton.cdiv(n, block_n), triton.cdiv(v, block_v))
        _linear_logprob_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets, lse, grad_logp,
            dx if need_x else dummy, dw if need_w else dummy, db if need_b else dummy,
            n, h, v,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, ignore_index,
            HAS_BIAS=bias is not None, COMPUTE_DX=need_x, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
            INPUT_PRECISION=input_precision(hidden),
            num_warps=8,
        )
    return (
        dx.to(hidden.dtype) if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
    )


def input_precision(operand: Tensor) -> str | None:
    """tl.dot's input_precision for `operand`'s dtype (also used by `mixture_lora_triton`)."""
    # fp32 inputs get exact fp32 dots ("ieee"), not tf32: fp32 is what tests compare at 1e-5.
    # Half inputs: the backend's default (the option only concerns fp32 operands).
    return "ieee" if operand.dtype == torch.float32 else None


def check_block_sizes(names: tuple[str, ...], blocks: tuple[int, ...]) -> None:
    """Raises ValueError unless every tile size is a power of two >= 16 (what tl.dot tiles need)."""
    for name, size in zip(names, blocks):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tiles); got {size}")


class TritonLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy, blocks):
        logp, lse, entropy = linear_logprob_fwd(hidden, weight, bias, targets, temperature, ignore_index,
                                                return_entropy, blocks)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.args = (temperature, ignore_index, blocks)
        ctx.mark_non_differentiable(lse, entropy)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, ignore_index, blocks = ctx.args
        dx, dw, db = linear_logprob_bwd(
            grad_logp, hidden, weight, bias, targets, lse, temperature, ignore_index, ctx.needs_input_grad[:3], blocks
        )
        return dx, dw, db, None, None, None, None, None


def triton_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Triton path; returns (logp, lse, entropy) with None for what was not asked for.

    hidden (N, H), targets (N,) flattened by the dispatcher. `options` are temperature, ignore_index,
    return_lse and return_entropy (`logprob_torch.LogprobOptions`). block_* override the
    tile sizes (tests use small ones to cross tile boundaries; each must be a power of two >= 16).
    """
    blocks = _block_sizes(hidden, block_n, block_v, block_h)
    check_block_sizes(("block_n", "block_v", "block_h"), blocks)
    return fused_linear_logprob(TritonLinearLogprob, blocks, hidden, weight, targets.contiguous(), bias, options)
