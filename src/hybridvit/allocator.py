"""The C library's memory allocator, tuned for tensors: one process-wide setting that inference,
the benchmarks and training share."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_cpu_allocator() -> bool:
    """Keep freed memory in glibc's heap, process-wide: no page faults per forward pass.

    With glibc's defaults every activation above the (adaptive) mmap threshold is a fresh
    ``mmap`` whose pages fault on first touch, and freed heap tops go back to the OS; on our
    2-core machine that cost LeViT models up to a third of their CPU inference throughput,
    depending on what ran before in the process, and a bf16 training step 5-8%
    (docs/benchmarks.md). This is the glibc counterpart of the jemalloc/tcmalloc advice in
    PyTorch's CPU tuning guide: the process keeps its peak memory.
    Returns False where the C library is not glibc (nothing is changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
