"""The process's heap policy: freed memory is kept for reuse, and given back periodically.

Tensors of ever-changing shapes (batch x length) fragment glibc's heap: freed blocks stay
mapped and resident memory climbs load after load (measured on the benchmark's MiniLM
models: +160 MB over 7 rounds of 15 s with no Python object growing). glibc's
`malloc_trim(0)` also releases free pages from the middle of the heap; it takes ~15 ms,
so the engine calls it every few seconds, not on every free.

Left to itself, glibc gives memory back on every free instead: a block above the mmap
threshold (128 KiB, rising to 32 MiB as such blocks are freed) is mapped for itself and
unmapped when freed, and the heap's top is cut back past the trim threshold. A forward's
activations (megabytes, of shapes that change batch to batch) then come back as fresh
pages, each zero-filled at its first touch: 7,000 to 16,000 page faults per 16-item
request on the benchmark's models, and forwards 3 to 6 % slower in the server than the
same forwards in a process whose heap had settled (RESULTS, session 23).
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
# Blocks up to this size come from the heap, and free memory at its top up to this much
# stays there, until the periodic trim.
KEPT_FREE_BYTES = 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_heap() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse (blocks and the heap's top alike) rather than
    hand it back on every free; `release_free_heap`, called periodically, gives it back.
    False where the C library cannot (not glibc, or one that refuses either value)."""
    libc = _glibc()
    if libc is None:
        return False
    kept = all(
        libc.mallopt(parameter, KEPT_FREE_BYTES) == 1
        for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
    )
    if not kept:
        log.info("glibc refused to keep freed memory: it goes back to the OS on free")
    return kept
