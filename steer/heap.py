"""The process heap on glibc: its resident size, and giving its free pages back to the OS.

glibc's malloc keeps freed memory in its heap for reuse. Tensors of a few MB (activations, a
grown KV pool) are served from that heap once its mmap threshold has risen, so after a burst of
large work the heap can hold gigabytes that are free but resident, fragmented so that only
``malloc_trim`` (which returns free pages anywhere in the heap, not only at its top) gives them
back. Used by the training step (``steer.training.memory``) and by the serving engine when it goes
idle. Where the C library is not glibc (musl, macOS), :func:`glibc` is None and nothing is trimmed.
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


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``), or 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0
