"""A slot-based KV cache that lets sequences join and leave a running batch between decode steps.

transformers' ``DynamicCache`` holds one tensor per layer for a batch whose rows all advance
together. Continuous batching needs rows at different lengths that come and go. Here each layer
owns preallocated buffers ``(slots, kv_heads, capacity, head_dim)``; the running sequences occupy
slots ``0..n-1`` (kept contiguous: a finished sequence's slot is refilled by moving the last one
in), so a decode step attends over the view ``[:n, :, :max_len]`` with no gather, and a boolean
mask hides each row's unused tail.

The model calls only ``update(key, value, layer_idx)`` (transformers >= 5 attention layers do);
the engine sets where the next update writes with :meth:`prepare_prefill` / :meth:`prepare_decode`
and passes explicit ``position_ids`` and a 4-D mask, which transformers uses as given.

Memory: per token, 2 x layers x kv_heads x head_dim elements (SmolLM2-135M: 46 KB in fp32).
Capacity grows by doubling up to the model's context, so short conversations stay cheap.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, max_capacity: int,
                 dtype: torch.dtype, initial_capacity: int = 256):
        self.num_layers = num_layers
        self.slots = slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_capacity = max_capacity
        self.dtype = dtype
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow(min(initial_capacity, max_capacity))
        # Where the next update writes: set by prepare_* before each forward.
        self._mode = None
        self._rows = slice(0, 0)
        self._start = 0
        self._positions: torch.Tensor | None = None
        self._view_len = 0
        self._row_index: torch.Tensor | None = None

    @classmethod
    def for_model(cls, config, slots: int, dtype: torch.dtype, max_capacity: int) -> SlotKVCache:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, slots, kv_heads, head_dim, max_capacity, dtype)

    def _grow(self, capacity: int) -> None:
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        for old, new in ((self.keys, new_k), (self.values, new_v)):
            for o, n in zip(old, new):
                n[:, :, : self.capacity].copy_(o)
        self.keys, self.values, self.capacity = new_k, new_v, capacity

    def ensure_capacity(self, length: int) -> None:
        """Make room for ``length`` positions per slot (doubling; at most the model's context)."""
        if length > self.max_capacity:
            raise ValueError(f"sequence length {length} exceeds the cache's maximum {self.max_capacity}")
        if length > self.capacity:
            capacity = self.capacity or 1
            while capacity < length:
                capacity *= 2
            self._grow(min(capacity, self.max_capacity))

    # -- what the next forward writes -------------------------------------------------------------

    def prepare_prefill(self, first_slot: int, count: int, length: int) -> None:
        """Next forward: ``count`` new sequences (right-padded to ``length`` tokens) into slots
        ``first_slot..first_slot+count-1`` at positions ``0..length-1``."""
        self.ensure_capacity(length)
        self._mode = "prefill"
        self._rows = slice(first_slot, first_slot + count)
        self._view_len = length

    def prepare_decode(self, lengths: torch.Tensor) -> None:
        """Next forward: one token for each of slots ``0..n-1``, written at position ``lengths[i]``."""
        n = lengths.shape[0]
        self.ensure_capacity(int(lengths.max()) + 1)
        self._mode = "decode"
        self._rows = slice(0, n)
        self._positions = lengths
        self._row_index = torch.arange(n)
        self._view_len = int(lengths.max()) + 1

    # -- the Cache API the model uses -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "prefill":
            t = key_states.shape[2]  # key_states: (count, kv_heads, T, head_dim)
            k_buf[self._rows, :, :t] = key_states
            v_buf[self._rows, :, :t] = value_states
        elif self._mode == "decode":
            # key_states: (n, kv_heads, 1, head_dim) -> one position per row
            k_buf[self._row_index, :, self._positions] = key_states[:, :, 0]
            v_buf[self._row_index, :, self._positions] = value_states[:, :, 0]
        else:
            raise RuntimeError("SlotKVCache.update called without prepare_prefill/prepare_decode")
        return k_buf[self._rows, :, : self._view_len], v_buf[self._rows, :, : self._view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._view_len

    def __len__(self) -> int:
        return self.num_layers

    # -- slot bookkeeping -------------------------------------------------------------------------

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (all layers)."""
        if src == dst:
            return
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length].copy_(buf[src, :, :length])
