"""Mixture LoRA in Triton: jit kernels, a launcher, an autograd.Function (Liger-Kernel layering).

Same maths and signature as `mixture_lora.mixture_lora_delta`:
    h = x A_cat^T              (N, k*r)   shrink
    delta = (h * w_rep * s) B_cat^T       scale + expand, w_rep[n, j] = w[n // rows_per_weight, j // r]

Two kernels, each used twice:
- `_mixture_lora_shrink_kernel`: H = L M for L (N, D) and M (D, KR) read through strides, fp32
  accumulator and fp32 output. Forward: L = x, M = A_cat^T. Backward: L = dY, M = B_cat, giving
  G = dY B_cat, the gradient w.r.t. the scaled middle activations.
- `_mixture_lora_expand_kernel`: Y = (H * w_rep * s) M for H (N, KR) fp32 and M (KR, C); the
  per-row weights are gathered and applied to each H tile in registers, so no scaled copy is
  ever written. Forward: H = h, M = B_cat^T, Y = delta. Backward: H = G, M = A_cat, Y = dX.
Why two kernels rather than one fused shrink-scale-expand: a fused kernel either walks all of
`out` in one program per row block (at decode N is a handful of rows: one program for the whole
layer) or recomputes the shrink for every `out` tile. The (N, k*r) fp32 round trip between the
two costs N*k*r*8 bytes, small next to reading x, and `h` is what backward needs saved anyway.

Backward: the Triton kernels above for dX (and for G, which dA and dw also need); torch for the
rest, on the saved (N, k*r) intermediates: dA_cat = (G * w_rep * s)^T x and dB_cat = dY^T (h * w_rep * s)
are plain GEMMs reducing over N (cuBLAS does them best; a Triton version would need atomics or
a split-N pass), and dw[n, i] = s * sum_{j in adapter i} G[n, j] h[n, j] is an (N, k*r)
elementwise product and a sum (summed again over the rows that share a weight row).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .logprob_triton import check_block_sizes, input_precision, matmul_tile, tile_2d
from .mixture_lora import check_mixture_lora_args


@triton.jit
def _mixture_lora_shrink_kernel(
    # pointers
    l_ptr, m_ptr, h_ptr,  # L (N, D), M (D, KR) any strides; H (N, KR) fp32, contiguous
    # sizes
    N, D, KR,
    # strides (elements)
    stride_ln, stride_ld, stride_md, stride_mj,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, cols, row_mask, col_mask = tile_2d(N, KR, BLOCK_N, BLOCK_KR)
    acc = matmul_tile(l_ptr, m_ptr, rows, cols, row_mask, col_mask, D, stride_ln, stride_ld, stride_md, stride_mj,
                      BLOCK_N, BLOCK_KR, BLOCK_D, INPUT_PRECISION)  # (BLOCK_N, BLOCK_KR) fp32
    tl.store(h_ptr + rows[:, None] * KR + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _mixture_lora_expand_kernel(
    # pointers
    h_ptr, w_ptr, m_ptr, y_ptr,  # H (N, KR) fp32 contiguous; weights (M, K); M (KR, C) any strides; Y (N, C) contiguous
    # sizes
    N, KR, C, rank, rows_per_weight,
    # strides (elements)
    stride_wm, stride_wk, stride_mj, stride_mc,
    # scalars
    scale,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    rows, cols, row_mask, col_mask = tile_2d(N, C, BLOCK_N, BLOCK_C)
    w_rows = rows // rows_per_weight  # (BLOCK_N,) the weights row each x row reads
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for j0 in range(0, KR, BLOCK_KR):
        js = j0 + tl.arange(0, BLOCK_KR)
        j_mask = js < KR
        hj_mask = row_mask[:, None] & j_mask[None, :]
        ht = tl.load(h_ptr + rows[:, None] * KR + js[None, :], mask=hj_mask, other=0.0)  # (BLOCK_N, BLOCK_KR) fp32
        wt = tl.load(w_ptr + w_rows[:, None] * stride_wm + (js // rank)[None, :] * stride_wk,
                     mask=hj_mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_KR) w_rep tile
        hs = (ht * wt * scale).to(m_ptr.dtype.element_ty)  # tensor-core operand in the input dtype
        mt = tl.load(m_ptr + js[:, None] * stride_mj + cols[None, :] * stride_mc,
                     mask=j_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_KR, BLOCK_C)
        acc = tl.dot(hs, mt, acc, input_precision=INPUT_PRECISION)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _block_sizes(x: Tensor, kr: int, block_n: int | None, block_d: int | None,
                 block_kr: int | None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, BLOCK_KR): fixed defaults (not autotuned), small under the interpreter.

    BLOCK_D tiles both the reduction dim of the shrink (in, or out in backward) and the output
    columns of the expand. BLOCK_KR covers k*r in one tile up to 64 (k = 3 adapters of r <= 16).
    """
    default_kr = min(64, max(16, triton.next_power_of_2(kr)))
    default = (64, 64, default_kr) if x.device.type == "cuda" else (16, 32, default_kr)
    blocks = (block_n or default[0], block_d or default[1], block_kr or default[2])
    check_block_sizes(("block_n", "block_d", "block_kr"), blocks)
    return blocks


def _shrink(left: Tensor, m: Tensor, m_strides: tuple[int, int], kr: int, blocks) -> Tensor:
    """H (N, KR) fp32 = left (N, D) @ M (D, KR), M given by its (d, j) strides over m's storage."""
    n, d = left.shape
    block_n, block_d, block_kr = blocks
    h = left.new_empty(n, kr, dtype=torch.float32)
    if n == 0:
        return h
    grid = (triton.cdiv(n, block_n), triton.cdiv(kr, block_kr))
    _mixture_lora_shrink_kernel[grid](
        left, m, h,
        n, d, kr,
        left.stride(0), left.stride(1), m_strides[0], m_strides[1],
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_KR=block_kr,
        INPUT_PRECISION=input_precision(left),
    )
    return h


def _expand(h: Tensor, w2: Tensor, m: Tensor, m_strides: tuple[int, int], c: int, rank: int,
            rows_per_weight: int, scale: float, out_dtype: torch.dtype, blocks) -> Tensor:
    """Y (N, C) = (H * w_rep * scale) @ M, M (KR, C) given by its (j, c) strides over m's storage."""
    n, kr = h.shape
    block_n, block_d, block_kr = blocks
    y = h.new_empty(n, c, dtype=out_dtype)
    if n == 0 or c == 0:
        return y.zero_()
    grid = (triton.cdiv(n, block_n), triton.cdiv(c, block_d))
    _mixture_lora_expand_kernel[grid](
        h, w2, m, y,
        n, kr, c, rank, rows_per_weight,
        w2.stride(0), w2.stride(1), m_strides[0], m_strides[1],
        float(scale),
        BLOCK_N=block_n, BLOCK_C=block_d, BLOCK_KR=block_kr,
        INPUT_PRECISION=input_precision(m),
    )
    return y


def _weights_rep(w2: Tensor, n: int, rank: int, rows_per_weight: int, scale: float) -> Tensor:
    """(N, k*r) fp32 w_rep * scale, for the torch half of backward."""
    m, k = w2.shape
    return (w2.float() * scale).view(m, 1, k, 1).expand(m, rows_per_weight, k, rank).reshape(n, k * rank)


class TritonMixtureLora(torch.autograd.Function):
    """Forward: shrink + expand kernels. Backward: shrink(dY, B_cat) + expand(., A_cat) kernels for
    dX, torch GEMMs and a reduction on the saved (N, k*r) intermediates for dA_cat, dB_cat, dw."""

    @staticmethod
    def forward(ctx, x2, a_cat, b_cat, w2, rank, rows_per_weight, scale, blocks):
        # x2 (N, in), a_cat (KR, in), b_cat (out, KR), w2 (M, k) with N = M * rows_per_weight
        assert x2.dim() == 2 and x2.dtype in (torch.float32, torch.bfloat16, torch.float16)  # any strides
        assert a_cat.dtype == b_cat.dtype == x2.dtype  # one dtype for the tl.dot operands
        kr, d_out = a_cat.shape[0], b_cat.shape[0]
        h = _shrink(x2, a_cat, (a_cat.stride(1), a_cat.stride(0)), kr, blocks)  # (N, KR) fp32; M = A_cat^T
        delta = _expand(h, w2, b_cat, (b_cat.stride(1), b_cat.stride(0)), d_out, rank, rows_per_weight,
                        scale, x2.dtype, blocks)  # (N, out); M = B_cat^T
        ctx.save_for_backward(x2, a_cat, b_cat, w2, h)
        ctx.args = (rank, rows_per_weight, scale, blocks)
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        x2, a_cat, b_cat, w2, h = ctx.saved_tensors
        rank, rows_per_weight, scale, blocks = ctx.args
        need_x, need_a, need_b, need_w = ctx.needs_input_grad[:4]
        n, kr, d_in = x2.shape[0], a_cat.shape[0], x2.shape[1]
        m, k = w2.shape
        dx = da = db = dw = None
        g = None
        if need_x or need_a or need_w:
            g = _shrink(grad_delta, b_cat, (b_cat.stride(0), b_cat.stride(1)), kr, blocks)  # (N, KR) fp32 dY B_cat
        if need_x:
            dx = _expand(g, w2, a_cat, (a_cat.stride(0), a_cat.stride(1)), d_in, rank, rows_per_weight,
                         scale, x2.dtype, blocks)  # (N, in) = (G * w_rep * s) A_cat
        if need_a or need_b:
            ws = _weights_rep(w2, n, rank, rows_per_weight, scale)  # (N, KR) fp32
            if need_a:
                da = torch.mm((g * ws).to(x2.dtype).t(), x2)  # (KR, N) @ (N, in)
            if need_b:
                db = torch.mm(grad_delta.t(), (h * ws).to(grad_delta.dtype))  # (out, N) @ (N, KR)
        if need_w:
            per_row = (g * h).view(n, k, rank).sum(-1) * scale  # (N, k)
            dw = per_row.view(m, rows_per_weight, k).sum(1).to(w2.dtype)  # (M, k)
        return dx, da, db, dw, None, None, None, None


def triton_mixture_lora_delta(
    x: Tensor,
    a_cat: Tensor,
    b_cat: Tensor,
    weights: Tensor,
    rank: int,
    scale: float,
    *,
    block_n: int | None = None,
    block_d: int | None = None,
    block_kr: int | None = None,
) -> Tensor:
    """Triton path of `mixture_lora.mixture_lora_delta` (same arguments, same result).

    x, a_cat and b_cat in fp32, bf16 or fp16 (one dtype); weights any float dtype. block_* override
    the tile sizes (tests use small ones to cross tile boundaries; powers of two >= 16).
    """
    k, rows_per_weight = check_mixture_lora_args(x, a_cat, b_cat, weights, rank, scale)
    blocks = _block_sizes(x, a_cat.shape[0], block_n, block_d, block_kr)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in), a view when it can be
    w2 = weights.reshape(math.prod(weights.shape[:-1]), k)  # (M, k)
    delta = TritonMixtureLora.apply(x2, a_cat, b_cat, w2, rank, rows_per_weight, float(scale), blocks)
    return delta.view(*x.shape[:-1], b_cat.shape[0])
