"""The engine's batched forwards: prompt chunks and decode steps as one model call each.

:class:`EngineForwards` is a base class of :class:`~steer.server.engine.Engine` and uses its
attributes (model, cache, mixture, counters); it builds the padded inputs, cache positions and
attention masks of a batch, and hands the logits back to the engine's token handling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from steer.server.engine_types import _Chunks, _Sequence


class EngineForwards:
    """The model calls of :class:`~steer.server.engine.Engine` (see the module docstring)."""

    # -- forwards --------------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 seqs: Sequence[_Sequence]) -> torch.Tensor:
        """The engine's only model call: logits of the last position of each row, ``(rows, V)``; row i
        is ``seqs[i]``."""
        mix = contextlib.nullcontext()
        # else: the weights as loaded, no stack
        if self._mixture is not None and any(s.job.mix is not None for s in seqs):
            from steer.mixture import mixing

            default = self._mixture.default_row
            weights = torch.stack([s.job.mix if s.job.mix is not None else default for s in seqs])  # (rows, n)
            mix = mixing(self.loaded.model, weights.to(self.device))
        dev = self.device
        if self._lean is not None:
            with mix:
                return self._lean(input_ids.to(dev), position_ids.to(dev), mask.to(dev), self.cache).cpu()
        with mix:
            out = self.loaded.model(
                input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                attention_mask=self._as_attention_mask(mask).to(dev),
                past_key_values=self.cache, use_cache=True, logits_to_keep=1,
            )
        return out.logits[:, -1].cpu()

    def _as_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean 'may attend' mask for SDPA; an additive float mask for eager attention."""
        if self._sdpa:
            return allowed
        zero = torch.zeros((), dtype=self._mask_dtype)
        return torch.where(allowed, zero, torch.finfo(self._mask_dtype).min)

    def _prefill(self, chunks: _Chunks) -> None:
        """One forward over the next ``count`` prompt tokens of each sequence, left-padded to a common
        width so that every row's last real token is the last column (whose logits we keep)."""
        m = len(chunks)
        width = max(count for _, count in chunks)
        input_ids = torch.full((m, width), self._pad_id, dtype=torch.long)  # (m, W)
        write = torch.full((m, width), -1, dtype=torch.long)  # (m, W): cache position per column, -1 = padding
        for i, (seq, count) in enumerate(chunks):
            start = seq.length
            input_ids[i, width - count:] = torch.tensor(seq.job.prompt_ids[start:start + count])
            write[i, width - count:] = torch.arange(start, start + count)
            self.cache.reserve(seq.slot, start + count)
        view = int(write.max()) + 1
        real = write >= 0  # (m, W)
        keys = torch.arange(view)
        # (m, W, L): causal, earlier chunks included
        allowed = (keys[None, None, :] <= write[:, :, None]) & real[:, :, None]
        # A padding query would see no key at all (NaN rows in SDPA); let it see position 0, which
        # every row has. Nothing real reads a padding column, and padding is never stored.
        allowed[:, :, 0] |= ~real
        self.cache.prepare([s.slot for s, _ in chunks], write, view)
        # (m, V); RoPE position = cache position
        logits = self._forward(input_ids, write.clamp(min=0), allowed[:, None], [s for s, _ in chunks])
        self.prefill_forwards += 1
        for seq, count in chunks:
            seq.length += count
        done = [i for i, (seq, _) in enumerate(chunks) if seq.prompt_left == 0]
        if done:
            self._advance([chunks[i][0] for i in done], logits[done])

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One token for each sequence: its last sampled token goes in at position ``length``."""
        for s in seqs:
            self.cache.reserve(s.slot, s.length + 1)
        lengths = torch.tensor([s.length for s in seqs])  # (n,) next write position
        view = int(lengths.max()) + 1
        allowed = torch.arange(view)[None, :] <= lengths[:, None]  # (n, L)
        input_ids = torch.tensor([[s.last_token] for s in seqs])  # (n, 1)
        self.cache.prepare([s.slot for s in seqs], lengths[:, None], view)
        logits = self._forward(input_ids, lengths[:, None], allowed[:, None, None, :], seqs)  # (n, V)
        for s in seqs:
            s.length += 1
        self.steps += 1
        self._advance(seqs, logits)
