"""The process heap on glibc: its resident size, and giving its free pages back to the OS.

glibc's malloc keeps freed memory in its heap for reuse. Tensors of a few MB (activations, a
grown KV pool) are served from that heap once its mmap threshold has risen, so after a burst of
large work the heap can hold gigabytes that are free but resident, fragmented so that only
``malloc_trim`` (which returns free pages anywhere in the heap, not only at its top) gives them
back. Used by the training step (``steer.training.memory``) and by the serving engine when it goes
idle. Where the C library is not glibc (musl, macOS), :func:`glibc` is None and nothing is trimmed.

The opposite problem while serving: by default glibc returns a freed block to the OS at once when
it was mmap-ed (above the mmap threshold) or sits at the heap's top (above the trim threshold), so
the next step's tensor of the same size faults its pages in again. A decode step frees and
reallocates such blocks by the hundred (each layer's gathered keys/values, the logits, the
sampler's vocabulary-wide rows), and on the 2-core VM this was measured on a page fault cost so
much that sampling 32 rows took 15-17 ms per step instead of ~5, and 32 streams ran 396-438
tokens/s instead of 505-530 (in-process, bf16, same run). :func:`keep_freed_memory` makes glibc keep
freed blocks of up to 32 MiB for reuse; the engine calls it, and gives the pages back itself with
``malloc_trim`` when it goes idle, so a burst still leaves no memory behind.
"""

from __future__ import annotations

import ctypes
import os

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def glibc():
    """The process's C library if it is glibc (has ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


# mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BLOCKS_UP_TO = 32 * 2**20
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before glibc trims it on its own


def keep_freed_memory(libc=None) -> bool:
    """Make glibc keep freed blocks of up to :data:`KEEP_BLOCKS_UP_TO` bytes in its heap for reuse: no
    mmap for them, no trimming of the heap's top on free (see the module docstring). Process-wide and
    idempotent; the caller trims (``malloc_trim``) when its work ends. ``libc``: :func:`glibc`'s result
    (looked up when None). True when both settings took; False where the C library is not glibc."""
    libc = glibc() if libc is None else libc
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)) & bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``), or 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0
