"""Mixture LoRA: k per-objective LoRA adapters on one linear layer, mixed per row of one batch.

For a layer with base weight W (out, in), k adapters of rank r (PEFT layout: A_i = lora_A.weight
(r, in), B_i = lora_B.weight (out, r)), scale s = alpha / r, and a direction w[n] (k values) per
row n of x (N, in):

    y_n = x_n W^T + bias + s * sum_i w[n, i] * x_n A_i^T B_i^T
        = x_n W^T + bias + delta_n,   delta = s * ((x A_cat^T) * w_rep) B_cat^T

A_cat (k*r, in) stacks the A_i, B_cat (out, k*r) puts the B_i side by side, and w_rep (N, k*r)
repeats w[n, i] r times over adapter i's block. Stacked, the k adapters are one rank-k*r LoRA
whose middle activations are scaled per row (Punica / S-LoRA batch many adapters; here the
adapters are fixed and the mix varies per request). Rows never merge weights, so every request
in a batch keeps its own direction. These functions compute `delta`; the caller adds the base
layer's output.

- `mixture_lora`: the entry point. Triton (`mixture_lora_triton.py`) for CUDA tensors, the torch
  path here elsewhere; STEER_KERNELS=torch|triton|auto forces one (as for `linear_logprob`).
- `mixture_lora_delta`: the torch path (any device, plain autograd), the reference for Triton.
- `stack_lora_adapters`: A_cat and B_cat from lists of A_i and B_i (differentiable: training
  may keep per-adapter parameters and stack them every step).

`weights` is (*lead, k) with `lead` a prefix of x's leading dimensions: (N, k) for x (N, in);
(B, k) for x (B, T, in) gives every token of sequence b the weights of sequence b (no copy);
(B, T, k) is per token; (k,) is one direction for all rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .logprob import select_backend


def check_mixture_lora_args(
    x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor, rank: int, scale: float
) -> tuple[int, int]:
    """Validate the arguments shared by both paths; return (k, rows_per_weight).

    rows_per_weight: how many consecutive rows of x flattened to (N, in) share one row of
    weights flattened to (M, k) (N / M; 0 when there are no rows).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int (the r of every adapter); got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (lora_alpha / r); got {scale!r}")
    if x.dim() < 1:
        raise ValueError("x must be (..., in); got a 0-d tensor")
    d_in = x.shape[-1]
    if a_cat.dim() != 2 or a_cat.shape[1] != d_in:
        raise ValueError(
            f"a_cat must be (k*r, in) with in = {d_in} from x {tuple(x.shape)}; got a_cat {tuple(a_cat.shape)}"
        )
    kr = a_cat.shape[0]
    if kr == 0 or kr % rank:
        raise ValueError(
            f"a_cat has {kr} rows, not a positive multiple of rank={rank} (k adapters of r rows each); "
            f"a_cat {tuple(a_cat.shape)}"
        )
    k = kr // rank
    if b_cat.dim() != 2 or b_cat.shape[1] != kr:
        raise ValueError(
            f"b_cat must be (out, k*r) with k*r = {kr} from a_cat {tuple(a_cat.shape)}; got b_cat {tuple(b_cat.shape)}"
        )
    if weights.dim() < 1 or weights.shape[-1] != k:
        raise ValueError(
            f"weights must be (..., k) with k = {k} adapters (a_cat {tuple(a_cat.shape)} at rank {rank}); "
            f"got weights {tuple(weights.shape)}"
        )
    lead = tuple(weights.shape[:-1])
    if len(lead) > x.dim() - 1 or tuple(x.shape[: len(lead)]) != lead:
        raise ValueError(
            f"weights {tuple(weights.shape)} must be (*lead, {k}) with lead a prefix of x's leading dims "
            f"{tuple(x.shape[:-1])}: (N, k) for x (N, in), (B, k) or (B, T, k) for x (B, T, in), (k,) for all rows"
        )
    if not x.is_floating_point() or a_cat.dtype != x.dtype or b_cat.dtype != x.dtype:
        raise TypeError(
            f"x, a_cat and b_cat must share one floating dtype; got {x.dtype}, {a_cat.dtype} and {b_cat.dtype}"
        )
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor; got {weights.dtype}")
    if len({x.device, a_cat.device, b_cat.device, weights.device}) != 1:
        raise ValueError(
            f"x, a_cat, b_cat and weights must be on one device; got {x.device}, {a_cat.device}, "
            f"{b_cat.device} and {weights.device}"
        )
    n, m = math.prod(x.shape[:-1]), math.prod(lead)
    return k, (n // m if m else 0)


def stack_lora_adapters(lora_a: Sequence[Tensor], lora_b: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(A_cat (k*r, in), B_cat (out, k*r)) from k adapters' A_i (r, in) and B_i (out, r).

    The order of the lists is the order of the columns of `weights`. Differentiable (torch.cat).
    """
    if len(lora_a) == 0 or len(lora_a) != len(lora_b):
        raise ValueError("lora_a and lora_b must hold one tensor per adapter, k >= 1; "
                         f"got {len(lora_a)} and {len(lora_b)}")
    a0 = lora_a[0]
    if a0.dim() != 2:
        raise ValueError(f"lora_a[0] must be (r, in) (PEFT lora_A.weight); got {tuple(a0.shape)}")
    rank, d_in = a0.shape
    d_out = lora_b[0].shape[0] if lora_b[0].dim() == 2 else -1
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        if tuple(a.shape) != (rank, d_in):
            raise ValueError(f"lora_a[{i}] has shape {tuple(a.shape)}; "
                             f"expected (r, in) = {(rank, d_in)} like lora_a[0]")
        if b.dim() != 2 or tuple(b.shape) != (d_out, rank):
            raise ValueError(
                f"lora_b[{i}] has shape {tuple(b.shape)}; "
                f"expected (out, r) = ({d_out if d_out >= 0 else 'out'}, {rank}) "
                "(PEFT lora_B.weight, the same out for every adapter)"
            )
    return torch.cat(list(lora_a), dim=0), torch.cat(list(lora_b), dim=1)  # (k*r, in), (out, k*r)


def mixture_lora_delta(x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor, rank: int, scale: float) -> Tensor:
    """Torch path: delta = scale * ((x A_cat^T) * w_rep) B_cat^T, shaped x.shape[:-1] + (out,).

    Plain autograd, differentiable w.r.t. x, a_cat, b_cat and weights; any device and dtype
    (weights are cast to x's dtype). Memory traffic beyond reading x, A_cat and B_cat and writing
    delta: two (N, k*r) intermediates (x A^T and its scaled copy), k*r << in, out. Merging the
    weights per row instead would build N (out, in) matrices.
    """
    k, rows_per_weight = check_mixture_lora_args(x, a_cat, b_cat, weights, rank, scale)
    d_out = b_cat.shape[0]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    n, m = x2.shape[0], math.prod(weights.shape[:-1])
    h = x2 @ a_cat.t()  # (N, k*r) shrink
    w = weights.reshape(m, 1, k, 1).to(h.dtype) * scale  # (M, 1, k, 1) one row per group of rows_per_weight rows
    hs = (h.view(m, rows_per_weight, k, rank) * w).view(n, k * rank)  # (N, k*r) = h * w_rep * s
    delta = hs @ b_cat.t()  # (N, out) expand
    return delta.view(*x.shape[:-1], d_out)


def mixture_lora(x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor, rank: int, scale: float) -> Tensor:
    """delta = scale * ((x A_cat^T) * w_rep) B_cat^T, shaped x.shape[:-1] + (out,); dispatches.

    x (..., in); a_cat (k*r, in); b_cat (out, k*r); weights (*lead, k), lead a prefix of
    x.shape[:-1] (see the module docstring); rank r; scale = lora_alpha / r. Add the result to
    the base layer's x W^T + bias. Triton for CUDA tensors in fp32/bf16/fp16 when triton is
    installed, the torch path otherwise; STEER_KERNELS=torch|triton|auto (read at every call)
    forces one. Both are differentiable w.r.t. x, a_cat, b_cat and weights.
    """
    check_mixture_lora_args(x, a_cat, b_cat, weights, rank, scale)  # shape errors before backend errors
    if select_backend(x.device, x.dtype) == "triton":
        from . import mixture_lora_triton  # deferred: imports triton only when it is used

        return mixture_lora_triton.triton_mixture_lora_delta(x, a_cat, b_cat, weights, rank, scale)
    return mixture_lora_delta(x, a_cat, b_cat, weights, rank, scale)
