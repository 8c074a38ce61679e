"""`linear_logprob`: per-token log-probs of target ids straight from hidden states and the LM head.

The one public entry point. It validates arguments, flattens leading dimensions, and dispatches:
Triton (`logprob_triton.py`) for CUDA tensors, the chunked torch path (`logprob_torch.py`)
elsewhere. The environment variable STEER_KERNELS=torch|triton|auto forces a backend; tests run
the Triton kernels on CPU tensors with STEER_KERNELS=triton and TRITON_INTERPRET=1.
Triton is imported only when it is used, so the package imports where it is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .logprob_torch import torch_linear_logprob

BACKEND_ENV = "STEER_KERNELS"
BACKENDS = ("auto", "torch", "triton")


class LinearLogprobOutput(NamedTuple):
    """What `linear_logprob` returns when asked for more than the log-probs.

    All float32 with the shape of `targets`, 0 at ignored positions. Only `logprobs` carries
    gradients; `lse` and `entropy` are detached metrics (None when not requested).
    """

    logprobs: Tensor  # log softmax(z)[target], z = (hidden W^T + b) / T
    lse: Tensor | None  # logsumexp(z) over the vocabulary
    entropy: Tensor | None  # -sum_v p_v log p_v of softmax(z)


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


def select_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'triton' or 'torch' for tensors on `device`, honouring STEER_KERNELS (read at every call)."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and dtype in TRITON_DTYPES and triton_available() else "torch"
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"{BACKEND_ENV}=triton supports {', '.join(map(str, TRITON_DTYPES))}; got {dtype}")
    if not triton_available():
        raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed; use {BACKEND_ENV}=torch or auto")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{BACKEND_ENV}=triton on {device.type} tensors needs the Triton interpreter: start the "
            "process with TRITON_INTERPRET=1 (it must be set before triton is first imported)"
        )
    return "triton"


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, temperature: float) -> None:
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be (..., H) and weight (V, H); got hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) and weight {tuple(weight.shape)} disagree on H")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without H); "
                         f"got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids; got {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype; got {hidden.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) {weight.dtype}; got {tuple(bias.shape)} {bias.dtype}")
    if len({hidden.device, weight.device, targets.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("hidden, weight, targets and bias must be on one device")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")


def linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_lse: bool = False,
    return_entropy: bool = False,
) -> Tensor | LinearLogprobOutput:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], without the (N, V) logits.

    hidden (..., H), weight (V, H), targets (...) int64, bias (V,) or None. Returns float32
    (float64 for float64 inputs) log-probs shaped like `targets`, 0 where `targets == ignore_index`,
    differentiable w.r.t. hidden, weight and bias. With `return_lse` / `return_entropy` returns a `LinearLogprobOutput`
    that also carries the per-token log-sum-exp and softmax entropy (detached metrics, 0 at
    ignored positions). Peak extra memory is one (chunk, V) slab plus the gradients.
    On the torch path, targets outside [0, V) (other than ignore_index) raise; the Triton path
    does not check them (a check would cost a host sync) and returns garbage for them.
    """
    _check(hidden, weight, targets, bias, temperature)
    out_shape = targets.shape
    x = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    t = targets.reshape(-1).long()  # (N,)
    backend = select_backend(hidden.device, hidden.dtype)
    if backend == "triton":
        from . import logprob_triton  # deferred: imports triton only when it is used

        fused = logprob_triton.triton_linear_logprob
    else:
        valid = t != ignore_index
        v = weight.shape[0]
        if bool(((t < 0) | (t >= v))[valid].any()):
            bad = t[valid & ((t < 0) | (t >= v))][0].item()
            raise ValueError(f"targets holds {bad}, outside [0, {v}) and not ignore_index={ignore_index}")
        fused = torch_linear_logprob
    logp, lse, entropy = fused(
        x, weight, t, bias, temperature=temperature, ignore_index=ignore_index,
        return_lse=return_lse, return_entropy=return_entropy,
    )
    logp = logp.view(out_shape)
    if not (return_lse or return_entropy):
        return logp
    return LinearLogprobOutput(
        logp,
        lse.view(out_shape) if lse is not None else None,
        entropy.view(out_shape) if entropy is not None else None,
    )
