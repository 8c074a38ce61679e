"""Paged KV cache: rows read back what they wrote; memory follows what is running."""

import math
import random

import pytest
import torch
from steer.server.kv_cache import PagedKVCache

B = PagedKVCache.BLOCK


def make(slots=4, max_length=300, initial_tokens=32, layers=2, kv=2, d=3):
    return PagedKVCache(layers, kv, d, slots, max_length, torch.float32, initial_tokens=initial_tokens)


def write(cache, slots, positions, values, view=None):
    """One forward's worth of writes: ``positions`` (rows, width) with -1 padding, ``values`` (rows, kv, width, d)."""
    cache.prepare(slots, positions, view or int(positions.max()) + 1)
    outs = [cache.update(values + layer, -values - layer, layer) for layer in range(cache.num_layers)]
    return outs  # per layer: (keys, values), each (rows, kv, view, d)


def test_rows_read_back_their_own_positions_across_chunks_and_padding():
    cache = make()
    a, b = cache.open(), cache.open()
    # Chunk 1: row a writes positions 0..4; row b writes 0..1 behind 3 padding columns.
    pos = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, -1, 0, 1]])
    vals = torch.randn(2, cache.kv_heads, 5, cache.head_dim)
    cache.reserve(a, 5)
    cache.reserve(b, 2)
    write(cache, [a, b], pos, vals)
    # Chunk 2: row b continues at 2..20 (crossing a block boundary); row a decodes at 5.
    cache.reserve(b, 21)
    cache.reserve(a, 6)
    vals_b = torch.randn(1, cache.kv_heads, 19, cache.head_dim)
    write(cache, [b], torch.arange(2, 21)[None], vals_b)
    vals_a = torch.randn(1, cache.kv_heads, 1, cache.head_dim)
    (k, v), *_ = write(cache, [a, b], torch.tensor([[5], [-1]]), torch.cat([vals_a, torch.zeros_like(vals_a)]), view=21)
    assert k.shape == (2, cache.kv_heads, 21, cache.head_dim)
    torch.testing.assert_close(k[0, :, :5], vals[0], rtol=0, atol=0)
    torch.testing.assert_close(k[0, :, 5:6], vals_a[0], rtol=0, atol=0)
    torch.testing.assert_close(v[0, :, :5], -vals[0], rtol=0, atol=0)
    torch.testing.assert_close(k[1, :, :2], vals[1, :, 3:], rtol=0, atol=0)  # padding was never stored
    torch.testing.assert_close(k[1, :, 2:21], vals_b[0], rtol=0, atol=0)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()  # unwritten positions read zeros


def test_unreserved_writes_and_overlong_sequences_are_refused():
    cache = make(max_length=40)
    s = cache.open()
    cache.reserve(s, 3)
    with pytest.raises(RuntimeError, match="not reserved"):
        cache.prepare([s], torch.tensor([[B]]), B + 1)
    with pytest.raises(ValueError, match="exceeds the cache's maximum 40"):
        cache.reserve(s, 41)


def test_growing_and_compacting_keep_the_contents():
    cache = make(slots=3, initial_tokens=32, max_length=600)
    short, long_ = cache.open(), cache.open()
    cache.reserve(short, 7)
    vals = torch.randn(1, cache.kv_heads, 7, cache.head_dim)
    write(cache, [short], torch.arange(7)[None], vals)
    initial = cache.nbytes
    cache.reserve(long_, 500)  # grows the pool well past its initial size
    assert cache.capacity_blocks >= 1 + math.ceil(500 / B) + 1 and cache.nbytes > initial
    cache.close(long_)  # mostly free now: compacted back
    assert cache.nbytes == initial and cache.blocks_in_use == 1
    (k, _), *_ = write(cache, [short], torch.tensor([[-1]]), torch.zeros(1, cache.kv_heads, 1, cache.head_dim), view=7)
    torch.testing.assert_close(k[0, :, :7], vals[0], rtol=0, atol=0)


def test_memory_is_bounded_by_the_blocks_in_use():
    """Random open/reserve/close: capacity <= max(initial, 4 * in use + 1) after every call, and a
    long sequence costs its own blocks, not a long row in every slot."""
    rng = random.Random(0)
    cache = make(slots=8, max_length=2000, initial_tokens=64)
    per_block = cache.nbytes // cache.capacity_blocks
    lengths: dict[int, int] = {}
    capacities = [cache.capacity_blocks]
    for _ in range(400):
        if lengths and (len(lengths) == cache.slots or rng.random() < 0.3):
            slot = rng.choice(list(lengths))
            del lengths[slot]
            cache.close(slot)
        elif rng.random() < 0.5 or not lengths:
            lengths[cache.open()] = 0
        else:
            slot = rng.choice(list(lengths))
            lengths[slot] = min(cache.max_length, lengths[slot] + rng.choice([1, 5, 40, 700]))
            cache.reserve(slot, lengths[slot])
        assert cache.blocks_in_use == sum(math.ceil(n / B) for n in lengths.values())
        assert cache.capacity_blocks <= max(cache.initial_blocks, 4 * cache.blocks_in_use + 1)
        assert cache.nbytes == cache.capacity_blocks * per_block
        capacities.append(cache.capacity_blocks)
    shrinks = sum(b < a for a, b in zip(capacities, capacities[1:]))
    assert max(capacities) > 4 * cache.initial_blocks and shrinks >= 3  # the walk grew and shrank the pool
    for slot in list(lengths):
        cache.close(slot)
    assert cache.capacity_blocks == cache.initial_blocks


def test_one_long_sequence_does_not_lengthen_the_others():
    """The issue's case: 31 short sequences beside one of 6,000 tokens hold about 6,000 + 31 x 100
    positions, not 32 x 6,000."""
    cache = PagedKVCache(1, 1, 1, 32, 8192, torch.float32)
    slots = [cache.open() for _ in range(32)]
    cache.reserve(slots[0], 6000)
    for s in slots[1:]:
        cache.reserve(s, 100)
    in_use = math.ceil(6000 / B) + 31 * math.ceil(100 / B)
    assert cache.blocks_in_use == in_use
    assert cache.capacity_blocks * B <= 2 * (in_use + 1) * B < 32 * 6000 / 10
    cache.close(slots[0])
    assert cache.capacity_blocks <= max(cache.initial_blocks, 4 * cache.blocks_in_use + 1)
