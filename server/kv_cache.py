"""A paged KV cache for continuous batching: its memory follows the tokens that are running.

transformers' ``DynamicCache`` holds one tensor per layer for a batch whose rows all advance
together. Continuous batching needs rows of different lengths that come and go, and one long
sequence must not make every other row as long. Here each layer keeps its keys and values in a
pool of fixed-size blocks, token-major ``(capacity_blocks * BLOCK, kv_heads, head_dim)``, and each
running sequence owns a slot with a block table: position ``t`` of the sequence in slot ``s`` lives
in pool row ``table[s, t // BLOCK] * BLOCK + t % BLOCK`` (vLLM's PagedAttention layout). Block 0 is
never owned and stays zero: table entries past a sequence's blocks point at it.

The model calls only ``update(key, value, layer_idx)`` (transformers >= 5 attention layers do).
Before each forward the engine calls :meth:`prepare` with the slots of the batch rows, the cache
position each input column writes (-1 for a padding column) and how many positions attention sees;
``update`` scatters the new keys/values into the pool and gathers each row's first ``view_len``
positions into a dense ``(rows, kv_heads, view_len, head_dim)`` tensor for SDPA. The engine's mask
hides the positions a row has not written, so what a row reads past its end never matters.

Memory (per token: 2 x layers x kv_heads x head_dim elements; SmolLM2-135M in fp32: 46 KB):

* blocks in use = sum over open slots of ceil(reserved_length / BLOCK): what is running, no more;
* the pool doubles when it runs out and, when a slot closes and at most a quarter of it is in use,
  is compacted to twice the blocks in use, so between calls
  ``capacity_blocks <= max(initial_blocks, 4 * blocks_in_use + 1)``: memory returns to the
  initial pool once the long sequences are gone;
* a forward also holds one layer's gathered keys and values at a time, ``rows x view_len``
  tokens, and a resize briefly holds the old and the new pool.

The price of paging on top of transformers' SDPA: each forward copies every row's visible keys and
values out of the pool, layer by layer (``index_select``, at memcpy speed), about as many bytes as
attention then reads. A rectangle of one slot per row avoids the copy, but holds every row at the
length of the longest one.
"""

from __future__ import annotations

import math

import torch


class PagedKVCache:
    BLOCK = 16  # tokens per block: at most BLOCK - 1 positions wasted per sequence

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, slots: int, max_length: int,
                 dtype: torch.dtype, initial_tokens: int = 1024, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.slots = slots
        self.max_length = max_length  # positions one sequence may reserve (the model's context)
        self.dtype = dtype
        # where the pools live (the model's device); the block table stays on the CPU
        self.device = torch.device(device)
        self.initial_blocks = 1 + math.ceil(initial_tokens / self.BLOCK)  # + the reserved block 0
        self._max_blocks = math.ceil(max_length / self.BLOCK)
        self._table = torch.zeros((slots, self._max_blocks), dtype=torch.long)  # (slots, blocks) -> pool block
        self._owned = [0] * slots  # blocks owned per slot (a prefix of its table row)
        self._free_slots = list(range(slots))
        self._free_blocks: list[int] = []
        self.capacity_blocks = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._reallocate(self.initial_blocks)
        # What the next forward writes and reads: set by prepare().
        self._write_rows: torch.Tensor | None = None  # (rows * width,) pool rows, or only the real columns'
        self._write_select: torch.Tensor | None = None  # (rows * width,) bool: real columns, None if all are
        self._read_rows: torch.Tensor | None = None  # (rows, view_len) pool rows
        self._view_len = 0

    @classmethod
    def for_model(cls, config, slots: int, dtype: torch.dtype, max_length: int,
                  device: torch.device | str = "cpu") -> PagedKVCache:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, slots, max_length, dtype, device=device)

    # -- sequences ---------------------------------------------------------------------------------

    def open(self) -> int:
        """A free slot for a new sequence (no blocks yet)."""
        if not self._free_slots:
            raise RuntimeError(f"all {self.slots} cache slots are in use")
        return self._free_slots.pop(0)

    def reserve(self, slot: int, length: int) -> None:
        """Make positions ``0..length-1`` of ``slot`` writable (new blocks are zeroed)."""
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds the cache's maximum {self.max_length}")
        need = math.ceil(length / self.BLOCK) - self._owned[slot]
        if need <= 0:
            return
        if need > len(self._free_blocks):
            self._reallocate(max(2 * self.capacity_blocks, 1 + self.blocks_in_use + need))
        new = [self._free_blocks.pop() for _ in range(need)]
        owned = self._owned[slot]
        self._table[slot, owned:owned + need] = torch.tensor(new)
        self._owned[slot] = owned + need
        # A recycled block holds another sequence's keys; masked positions must still be finite
        # (0 * NaN is NaN in attention), so start every block from zeros.
        rows = self._token_rows(torch.tensor(new)).to(self.device)
        for buf in (*self.keys, *self.values):
            buf.index_fill_(0, rows, 0)

    def close(self, slot: int) -> None:
        """Return ``slot`` and its blocks; compact the pool when at most a quarter of it is in use."""
        owned = self._owned[slot]
        self._free_blocks.extend(self._table[slot, :owned].tolist())
        self._table[slot, :owned] = 0
        self._owned[slot] = 0
        self._free_slots.append(slot)
        self._free_slots.sort()
        if self.capacity_blocks > self.initial_blocks and 4 * self.blocks_in_use <= self.capacity_blocks - 1:
            self._reallocate(max(self.initial_blocks, 2 * self.blocks_in_use + 1))

    @property
    def blocks_in_use(self) -> int:
        return sum(self._owned)

    @property
    def nbytes(self) -> int:
        """Bytes held by the pools (keys and values of every layer)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _token_rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """Pool rows of every position of ``blocks`` ``(b,)`` -> ``(b * BLOCK,)``."""
        return (blocks[:, None] * self.BLOCK + torch.arange(self.BLOCK)).flatten()

    def _reallocate(self, capacity_blocks: int) -> None:
        """New pools of ``capacity_blocks`` blocks, owned blocks moved to 1..n (block 0 stays zero)."""
        used = self.blocks_in_use
        owned_mask = torch.arange(self._max_blocks)[None, :] < torch.tensor(self._owned)[:, None]  # (slots, blocks)
        old_ids = self._table[owned_mask]  # (used,)
        new_ids = torch.arange(1, used + 1)
        src, dst = self._token_rows(old_ids).to(self.device), self._token_rows(new_ids).to(self.device)
        shape = (capacity_blocks * self.BLOCK, self.kv_heads, self.head_dim)
        for bufs in (self.keys, self.values):
            if not bufs:
                bufs.extend(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers))
                continue
            for layer, old in enumerate(bufs):  # one layer at a time: peak is the old pools + one new layer
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                new.index_copy_(0, dst, old.index_select(0, src))
                bufs[layer] = new
        remap = torch.zeros(max(self.capacity_blocks, 1), dtype=torch.long)
        remap[old_ids] = new_ids
        self._table = torch.where(owned_mask, remap[self._table], 0)
        self._free_blocks = list(range(capacity_blocks - 1, used, -1))  # pop() hands out low ids first
        self.capacity_blocks = capacity_blocks

    # -- what the next forward writes and reads ---------------------------------------------------

    def prepare(self, slots: list[int], write_positions: torch.Tensor, view_len: int) -> None:
        """Next forward: row ``i`` is the sequence in ``slots[i]``; its input column ``j`` writes cache
        position ``write_positions[i, j]`` (``(rows, width)``, -1 for padding; reserved beforehand);
        attention sees positions ``0..view_len-1`` of each row."""
        rows = torch.tensor(slots)
        table = self._table[rows]  # (rows, max_blocks)
        real = write_positions >= 0  # (rows, width)
        reserved = torch.tensor([self._owned[s] for s in slots])[:, None] * self.BLOCK
        if bool((real & (write_positions >= reserved)).any()):
            raise RuntimeError("PagedKVCache.prepare: a write position was not reserved")
        pos = write_positions.clamp(min=0)
        write = table.gather(1, pos // self.BLOCK) * self.BLOCK + pos % self.BLOCK  # (rows, width)
        dev = self.device
        if bool(real.all()):
            self._write_rows, self._write_select = write.flatten().to(dev), None
        else:
            self._write_rows, self._write_select = write[real].to(dev), real.flatten().to(dev)
        k = torch.arange(view_len)
        self._read_rows = (table[:, k // self.BLOCK] * self.BLOCK + k % self.BLOCK).to(dev)  # (rows, view_len)
        self._view_len = view_len

    # -- the Cache API the model uses -------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._read_rows is None:
            raise RuntimeError("PagedKVCache.update called without prepare()")
        rows, view_len = self._read_rows.shape
        out = []
        for pool, states in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            new = states.transpose(1, 2).reshape(-1, self.kv_heads, self.head_dim)  # (rows*width, kv, d)
            if self._write_select is not None:  # padding columns are not stored
                new = new[self._write_select]
            pool.index_copy_(0, self._write_rows, new.to(pool.dtype))
            # index_select runs at memcpy speed on CPU; advanced indexing is several times slower.
            dense = pool.index_select(0, self._read_rows.flatten()).view(rows, view_len, self.kv_heads, self.head_dim)
            out.append(dense.transpose(1, 2))  # (rows, kv, view_len, d)
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._view_len

    def __len__(self) -> int:
        return self.num_layers
