"""The process's heap policy: freed memory is kept for reuse, and given back periodically.

Tensors of ever-changing shapes (batch x length) fragment glibc's heap: freed blocks stay
mapped and resident memory climbs load after load (measured on the benchmark's MiniLM
models: +160 MB over 7 rounds of 15 s with no Python object growing). glibc's
`malloc_trim(0)` also releases free pages from the middle of the heap; it takes ~15 ms,
so the engine calls it every few seconds, not on every free.

Left to itself, glibc also gives memory back on every free: a block above the mmap
threshold (128 KiB, rising up to 32 MiB as such blocks are freed) is mapped for itself and
unmapped when freed, and a heap's free top is cut back past the trim threshold. A
forward's activations (megabytes, of shapes that change batch to batch) then come back as
fresh pages, each zero-filled at its first touch: thousands of page faults per forward on
this project's CPU benchmark (HISTORY.md, session 23). So freed memory is kept instead,
and the periodic trim gives back the free pages of every arena and the main heap's top;
a worker thread's arena keeps its heap's free top (at most one heap, 64 MiB on 64-bit)
for that thread's next forwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters, from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# A heap keeps up to this much free memory at its top, until the periodic trim; blocks up
# to this size come from a heap (in a worker thread's arena: up to the size of one heap).
KEPT_FREE_BYTES = 1 << 30
# The most some older glibc accepts as the mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit).
_OLDEST_MAX_MMAP_THRESHOLD = 32 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def release_free_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse rather than hand it back on every free;
    `release_free_heap`, called periodically, gives it back. False where the C library is
    not glibc, or refuses. With jemalloc or tcmalloc preloaded the call changes nothing:
    those keep freed memory by their own rules."""
    libc = _glibc()
    if libc is None:
        return False
    trim = libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1
    mmap = any(
        libc.mallopt(_M_MMAP_THRESHOLD, size) == 1
        for size in (KEPT_FREE_BYTES, _OLDEST_MAX_MMAP_THRESHOLD)
    )
    if not (trim and mmap):
        log.warning("glibc refused to keep freed memory: forwards will fault pages in anew")
    return trim and mmap
