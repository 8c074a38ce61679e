"""Per-sequence completion log-probs of a causal LM, through the fused linear log-prob op.

    hidden = decoder(input_ids)                       # (B, T, H) last layer, after the final norm
    logp_t = log softmax(hidden_{t-1} W^T)[x_t]       # for completion tokens t only
    sum_b  = sum_t logp_t                             # (B,) what every preference loss takes

Under bf16 autocast the decoder runs in bf16; the LM head and the log-softmax always run outside
it, in the head's own dtype (fp32 unless the model was loaded in bf16).

Two implementations behind one switch (``impl``), compared directly in the tests and the bench:

* ``fused`` (default): only the rows that predict a completion token (N of them) are gathered and
  go through :func:`steer.kernels.linear_logprob`, which never holds the ``N x V`` logits (V =
  49,152 for the default model); prompt and padding rows never meet the LM head at all.
* ``naive``: what a plain transformers training loop does: full logits ``(B, T - 1, V)``,
  ``log_softmax``, ``gather``, mask. The reference, and the bench's baseline.

:class:`SequenceLogprobs` wraps the computation in an ``nn.Module`` so that DDP sees the whole
forward (decoder and LM head) and synchronises gradients of everything it touches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from steer.kernels import linear_logprob
from torch import Tensor, nn

from steer.models import decoder_and_head

from .pairs import IGNORE_INDEX, Batch

IMPLS = ("fused", "naive")


@dataclass
class SequenceLogps:
    logps: Tensor  # (B,) float32 summed completion log-probs
    counts: Tensor  # (B,) int64 completion tokens


def sequence_logprobs(model, batch: Batch, *, impl: str = "fused") -> SequenceLogps:
    """Summed log-probs of each row's labelled tokens (labels != IGNORE_INDEX) given the tokens before them."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1]  # (B, T-1, H): row t predicts token t+1
    targets = batch.labels[:, 1:]  # (B, T-1)
    valid = targets != IGNORE_INDEX  # (B, T-1)
    counts = valid.sum(1)  # (B,)
    B = targets.shape[0]
    bias = getattr(head, "bias", None)
    # The LM head and the log-softmax run in the head's own dtype even under bf16 autocast: a bf16
    # log-sum-exp over 49k logits would cost the loss its precision where it is decided.
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.to(head.weight.dtype)
        if impl == "fused":
            rows = hidden[valid]  # (N, H): only completion-predicting rows reach the LM head
            logp = linear_logprob(rows, head.weight, targets[valid], bias=bias)  # (N,) float32
            seq = torch.arange(B, device=targets.device)[:, None].expand_as(targets)[valid]  # (N,) row of each token
            sums = torch.zeros(B, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)  # (B,)
        else:
            logits = head(hidden).float()  # (B, T-1, V): the tensor the fused path never builds
            logp_all = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
            logp = logp_all.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            sums = (logp * valid).sum(1)  # (B,)
    return SequenceLogps(sums, counts)


def completion_logprob_rows(model, batch: Batch) -> Tensor:
    """``(N, V)`` float32 log-softmax of every row that predicts a completion token (labels !=
    IGNORE_INDEX), in row-major order: what distillation compares, where :func:`sequence_logprobs`
    needs only each row's target entry. The LM head runs outside autocast as there."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # (B, T, H)
    valid = batch.labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    with torch.autocast(hidden.device.type, enabled=False):
        rows = hidden[:, :-1][valid].to(head.weight.dtype)  # (N, H)
        logits = torch.nn.functional.linear(rows, head.weight, getattr(head, "bias", None)).float()  # (N, V)
        return torch.log_softmax(logits, dim=-1)


class SequenceLogprobs(nn.Module):
    """``forward(batch) -> (logps (B,), counts (B,))`` as a module, for DDP to wrap."""

    def __init__(self, model: nn.Module, impl: str = "fused"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.model = model
        self.impl = impl

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, rows: bool = False):
        """``(logps (B,), counts (B,))``; with ``rows``, the ``(N, V)`` completion log-prob rows instead
        (:func:`completion_logprob_rows`), still through this module so that DDP sees the forward."""
        batch = Batch(input_ids, attention_mask, labels)
        if rows:
            return completion_logprob_rows(self.model, batch)
        out = sequence_logprobs(self.model, batch, impl=self.impl)
        return out.logps, out.counts
