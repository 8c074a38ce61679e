"""How linear layers compute at inference: torch's, oneDNN with reordered fp32 weights, or int8 weights.

``LINEARS`` (``python -m steer.serve --linears``):

* ``torch``: ``nn.Linear`` as it is.
* ``prepacked`` (CPU, fp32; the server's default there): ``nn.Linear`` on the CPU calls a GEMM
  that re-reads (and, for a small batch, repacks) the ``(out, in)`` weight in every forward. oneDNN
  can reorder a weight once into the blocked layout its kernels read
  (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile``'s CPU freezing pass does
  for the same reason); the forward is then ``torch.ops.mkldnn._linear_pointwise``. The same fp32
  math (results agree with ``F.linear`` to float rounding, ~1e-6). Measured on the development
  CPU (2 cores, AVX2, 30 distinct weights so that none stays in cache), per layer, plain ->
  prepacked: ``1536 x 576`` at 1 row 317 -> 204 us, at 32 rows 755 -> 498 us, the ``49152 x 576``
  LM head at 1 row 9.1 -> 4.9 ms, at 32 rows 29 -> 16 ms.
* ``int8`` (CPU): weight-only int8, symmetric per output channel (``scale = max|w_row| / 127``),
  computed by ``torch._weight_int8pack_mm`` on bf16-rounded inputs with fp32 accumulation. A
  quarter of the fp32 weight bytes, which is what one decoding stream is bound by (the fp32 model
  is read once per token at ~16 GB/s here); slower than fp32 for many rows (prefill, 32 streams).
  It changes the numbers: ``make bench-serve`` reports greedy agreement and log-prob drift.

The price of both: each layer keeps its fp32 weight as well (anything that reads ``.weight`` --
tied embeddings, the FLR scorer's LM head, mixture adapters -- sees the model unchanged), so
``prepacked`` adds about the fp32 weights' size (+540 MB for SmolLM2-135M) and ``int8`` a quarter
of it. Apply it to a model whose weights no longer change (inference, after adapters are merged).
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

BATCH_HINT = 32  # rows the reorder is tuned for; measured to serve 1..256 rows as well as any other hint


def available() -> bool:
    """True when this torch build has oneDNN and its linear weight reorder."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_weight(weight: Tensor, batch_hint: int = BATCH_HINT) -> Tensor:
    """The oneDNN-reordered copy of an ``(out, in)`` fp32 CPU weight (an opaque tensor for :func:`packed_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=batch_hint)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` for ``x`` ``(..., in)`` with ``W`` packed by :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _packed_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return packed_linear(x, self._packed_weight, self.bias)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q (out, in) int8, scale (out,) fp32)``,
    ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return q, scale


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x (q * scale)^T + b`` with ``x`` rounded to bf16 (``scale`` given in bf16, as the kernel takes it);
    out in ``x``'s dtype."""
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), q, scale).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], q.shape[0])


def _int8_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return int8_linear(x, self._int8_weight, self._int8_scale, self.bias)


LINEARS = ("torch", "prepacked", "int8")


def packable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with an fp32 CPU weight."""
    if type(module) is not nn.Linear:
        return False
    w = module.weight
    return w.dtype == torch.float32 and w.device.type == "cpu"


def convert_linears(model: nn.Module, kind: str, batch_hint: int = BATCH_HINT) -> int:
    """Route every packable ``nn.Linear`` of ``model`` through ``kind`` (one of :data:`LINEARS`; an
    instance-level forward, the module and its ``weight`` stay as they were) and stop gradients
    (inference only from here). Returns how many layers were converted; 0 for ``torch``, for a
    model converted before, or for ``prepacked`` where this torch has no oneDNN."""
    if kind not in LINEARS:
        raise ValueError(f"linears must be one of {', '.join(LINEARS)}, got {kind!r}")
    if kind == "torch" or (kind == "prepacked" and not available()):
        return 0
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for module in model.modules():
        if not packable(module) or getattr(module, "linear_kind", None) is not None:
            continue
        if kind == "prepacked":
            module._packed_weight = pack_weight(module.weight, batch_hint)
            module.forward = types.MethodType(_packed_forward, module)
        else:
            q, scale = quantize_int8(module.weight)
            module._int8_weight, module._int8_scale = q, scale.to(torch.bfloat16)
            module.forward = types.MethodType(_int8_forward, module)
        module.linear_kind = kind
        count += 1
    return count


def resolve_linears(kind: str, device: torch.device, dtype: str) -> str:
    """What ``--linears`` means on ``device`` with ``dtype``: ``auto`` is ``prepacked`` on the CPU in fp32
    (where oneDNN is there), else ``torch``; a kind that cannot run there is refused naming the flag."""
    from steer.errors import InvalidInput

    if kind == "auto":
        return "prepacked" if device.type == "cpu" and dtype == "float32" and available() else "torch"
    if kind not in LINEARS:
        raise InvalidInput("linears", f"must be auto or one of {', '.join(LINEARS)}, got {kind!r}")
    if kind != "torch" and (device.type != "cpu" or dtype != "float32"):
        raise InvalidInput("linears", f"{kind} runs on the CPU with dtype float32 (got {device.type}, {dtype}); "
                                      "use torch or auto")
    if kind == "prepacked" and not available():
        raise InvalidInput("linears", "this torch build has no oneDNN linear reorder; use torch or int8")
    return kind


def prepack_linears(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """:func:`convert_linears` with ``prepacked``."""
    return convert_linears(model, "prepacked", batch_hint)
