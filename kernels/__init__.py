"""steer.kernels: fused tensor ops for training and scoring (tensor maths only, no project imports).

- `linear_logprob`: per-token log-probs from hidden states and the LM head without the (N, V)
  logits; Triton on CUDA, chunked torch elsewhere, STEER_KERNELS=torch|triton|auto forces one.
- `naive_linear_logprob`: the full-logits reference it is tested and benchmarked against.
- `preference_loss`: DPO / IPO / hinge / SimPO / ORPO / KTO on per-sequence log-probs.
"""

from .logprob import LinearLogprobOutput, linear_logprob
from .logprob_torch import naive_linear_logprob
from .preference import PreferenceLossConfig, PreferenceLossOutput, preference_loss

__all__ = [
    "LinearLogprobOutput",
    "PreferenceLossConfig",
    "PreferenceLossOutput",
    "linear_logprob",
    "naive_linear_logprob",
    "preference_loss",
]
