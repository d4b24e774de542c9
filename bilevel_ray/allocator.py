"""Keep freed activation buffers in the process instead of handing them back to the OS.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages from the
kernel and unmaps them on free, so each large activation tensor of each training step page-faults
its memory in again: on CPU this can cost more than the arithmetic (measured in
``benchmarks/omniglot.py``: a batched MAML step ran about 1.6× faster with the heap kept). PyTorch
has no caching allocator on CPU; :func:`keep_heap` makes glibc's heap play that part.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_heap(keep_bytes: int = 1 << 30) -> bool:
    """Serve large allocations from the heap (``M_MMAP_MAX = 0``) and keep up to ``keep_bytes`` of freed
    memory at its top (``M_TRIM_THRESHOLD``), for this whole process. The resident size then stays at
    its high-water mark instead of going up and down every step. Returns whether it took effect: False
    off glibc, or when the environment sets ``BILEVEL_RAY_ALLOCATOR=default``."""
    if os.environ.get("BILEVEL_RAY_ALLOCATOR", "keep") == "default":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    keep = max(0, min(int(keep_bytes), 2**31 - 1))
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
