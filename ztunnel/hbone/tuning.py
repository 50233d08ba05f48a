"""Process-wide allocator tuning for proxies that relay HBONE traffic (glibc only).

A relay allocates and frees buffers of 64-256 KiB for every TLS record batch. With
glibc's defaults those sizes sit at the mmap/trim thresholds, so the heap is grown
and shrunk (brk, mmap, page faults) on nearly every read; measured on a relay pair
this costs about a third of the CPU. `tune_allocator()` raises the thresholds once
at process start (what a proxy would otherwise get from jemalloc/tcmalloc).
Call it from a process entry point (ztunnel, waypoint), never from library code.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def tune_allocator(
    *,
    mmap_threshold: int = 4 << 20,
    trim_threshold: int = 64 << 20,
    top_pad: int = 8 << 20,
) -> bool:
    """Set glibc malloc thresholds; True if applied, False where not glibc (no-op)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    results = [
        int(mallopt(M_MMAP_THRESHOLD, mmap_threshold)),
        int(mallopt(M_TRIM_THRESHOLD, trim_threshold)),
        int(mallopt(M_TOP_PAD, top_pad)),
    ]
    return all(r == 1 for r in results)
