"""Give freed heap pages back to the OS, so a long-running server's memory stays flat.

Tensors of ever-changing shapes (batch x length) fragment glibc's heap: freed blocks stay
mapped and resident memory climbs load after load (measured on the benchmark's MiniLM
models: +160 MB over 7 rounds of 15 s with no Python object growing). glibc's
`malloc_trim(0)` also releases free pages from the middle of the heap; it takes ~15 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


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
