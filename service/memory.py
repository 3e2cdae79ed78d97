"""The process's heap policy: one heap, freed memory kept for reuse, given back when idle.

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
this project's CPU benchmark (HISTORY.md, session 23). So freed memory is kept instead.

Kept only in one heap: a thread's own arena grows in heaps of at most 64 MiB (on 64-bit),
and glibc maps a larger block (a 64-item batch's 96 MiB MLP activation) for itself and
unmaps it when freed, whatever the thresholds, and deletes a heap once it is all free. The
device threads' forwards faulted in ~500 pages per scored item that way (session 27), each
zero-filled, and on a VM whose freed pages go back to the host (virtio-balloon free page
reporting, as on this project's VM) each first touch also faults on the host: up to a fifth
of the server's CPU went to clearing pages. `share_one_heap` puts every thread on the main
arena, which grows without that limit, and `keep_freed_memory` maps no block for itself.
(Only in processes that call it first; `alarm-serve ray`'s replicas, Ray's worker
processes, get one heap from MALLOC_ARENA_MAX=1 in their environment instead.)
A trim gives free pages back and the forwards after it fault their activations in again,
so the engine trims when its forwards have stopped for minutes, and under load only once
resident memory passes a ceiling (`HeapTrimPolicy`): trimmed every 10 s, the server
faulted in 142 to 327 pages per item; trimmed only when idle, 0 to 164 per item, its
resident memory climbing from 0.9 to 1.7 GB over 80 s of mixed load (session 27). Trimmed
after 10 s idle, bursts of load 25 s apart (a PPO trainer's steps) faulted 300 to 460 pages
per item each; trimmed after 5 minutes idle, 213 in the first burst, then 40 to 84
(session 28).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt(3) parameters, from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# A heap keeps up to this much free memory at its top, until the engine trims it; blocks up
# to this size come from a heap (in a thread's own arena: up to the size of one heap).
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


@functools.cache
def _tcmalloc_release() -> Callable[[], None] | None:
    """TCMalloc's own call that returns its free pages, where it serves the process
    (service.allocator); None where it does not."""
    try:
        release = ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (AttributeError, OSError):
        return None
    release.argtypes = ()
    release.restype = None
    return release


def release_free_heap() -> bool:
    """Return free heap pages to the OS; False where the malloc serving the process
    cannot be asked to (neither glibc's nor TCMalloc)."""
    tcmalloc_release = _tcmalloc_release()
    if tcmalloc_release is not None:
        tcmalloc_release()
        return True
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
    # No block mapped for itself: above the threshold too, blocks come from the heap.
    unmapped = libc.mallopt(_M_MMAP_MAX, 0) == 1
    if not (trim and mmap and unmapped):
        log.warning("glibc refused to keep freed memory: forwards will fault pages in anew")
    return trim and mmap and unmapped


def share_one_heap() -> bool:
    """Threads allocate from the main arena (see the module's docstring). Threads that have
    already allocated keep their own arenas, and new ones may reuse those, so a process
    calls this first thing. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(_M_ARENA_MAX, 1) == 1


def resident_bytes() -> int | None:
    """This process's resident memory; None where /proc does not say (not Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


class HeapTrimPolicy:
    """Whether to give free heap pages back now, asked every few seconds with the forwards
    started so far and those running: after `idle_checks` checks in a row in which none
    started and none ran (once per idle spell), and under load only while resident memory
    is more than `headroom_bytes` above what it was after the last trim (or at start);
    always when resident memory is unknown."""

    def __init__(
        self, headroom_bytes: int, resident_at_start: int | None, idle_checks: int = 1
    ) -> None:
        self._headroom_bytes = headroom_bytes
        self._floor = resident_at_start
        self._idle_checks = max(1, idle_checks)
        self._seen = 0
        self._idle_for = 0  # checks in a row without a forward

    def due(self, forwards_started: int, running: int, resident: int | None) -> bool:
        busy = forwards_started != self._seen or running > 0
        self._seen = forwards_started
        if busy:
            self._idle_for = 0
            return (
                resident is None
                or self._floor is None
                or (resident > self._floor + self._headroom_bytes)
            )
        self._idle_for += 1
        return self._idle_for == self._idle_checks  # once per idle spell

    def trimmed(self, resident: int | None) -> None:
        """After a trim: the ceiling under load moves to `headroom_bytes` above this."""
        self._floor = resident
