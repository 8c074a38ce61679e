"""steer.kernels: fused tensor ops for training and scoring (tensor maths only, no project imports).

- `linear_logprob`: per-token log-probs from hidden states and the LM head without the (N, V)
  logits; Triton on CUDA, chunked torch elsewhere, STEER_KERNELS=torch|triton|auto forces one.
- `naive_linear_logprob`: the full-logits reference it is tested and benchmarked against.
- `preference_loss`: DPO / IPO / hinge / SimPO / ORPO / KTO on per-sequence log-probs.
- `mixture_lora.mixture_lora`: the LoRA delta of k per-objective adapters mixed per row by that
  row's weights, scale * ((x A_cat^T) * w_rep) B_cat^T; Triton on CUDA, torch elsewhere
  (`mixture_lora_delta`), the same STEER_KERNELS switch; `stack_lora_adapters` builds A_cat and
  B_cat from PEFT's A_i / B_i. Import these from `steer.kernels.mixture_lora`: they are not
  package exports because the submodule of that name would shadow a function `mixture_lora`
  here as soon as it is imported.

Exports resolve lazily, so `python -m steer.kernels.bench --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LinearLogprobOutput": ".logprob",
    "linear_logprob": ".logprob",
    "naive_linear_logprob": ".logprob_torch",
    "PreferenceLossConfig": ".preference",
    "PreferenceLossOutput": ".preference",
    "preference_loss": ".preference",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .logprob import LinearLogprobOutput as LinearLogprobOutput
    from .logprob import linear_logprob as linear_logprob
    from .logprob_torch import naive_linear_logprob as naive_linear_logprob
    from .preference import PreferenceLossConfig as PreferenceLossConfig
    from .preference import PreferenceLossOutput as PreferenceLossOutput
    from .preference import preference_loss as preference_loss


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
