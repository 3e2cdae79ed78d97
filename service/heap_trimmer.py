"""Gives the process's free heap pages back by `HeapTrimPolicy`, in a worker thread.

The engine counts its forwards through `forward()`; every `INTERVAL_S` the trimmer asks the
policy whether to trim: after `IDLE_BEFORE_TRIM_S` without a forward, or under load once
resident memory is `HEADROOM_BYTES` above its size after the last trim (service.memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator

from service.memory import HeapTrimPolicy, release_free_heap, resident_bytes


class HeapTrimmer:
    INTERVAL_S = 10.0
    # Idle this long before free pages go back: a PPO trainer's reward calls come in bursts,
    # one per step, seconds to minutes apart; trimmed between them, every burst faults its
    # activations in again (HISTORY.md, session 28).
    IDLE_BEFORE_TRIM_S = 300.0
    # Under load, free pages go back only once resident memory is this far above what it
    # was after the last trim (or at start): below it, the next forwards reuse them as they are.
    HEADROOM_BYTES = 2 << 30

    def __init__(self, run_in_thread: Callable[[Callable[[], bool]], Awaitable[bool]]) -> None:
        self._run_in_thread = run_in_thread  # malloc_trim walks the heap for ~15 ms
        self._started = 0  # forwards, ever
        self._running = 0
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around one forward: while it runs, and once it has started, the heap is busy."""
        self._started += 1
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._trim_periodically())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _trim_periodically(self) -> None:
        idle_checks = math.ceil(self.IDLE_BEFORE_TRIM_S / self.INTERVAL_S)
        policy = HeapTrimPolicy(self.HEADROOM_BYTES, resident_bytes(), idle_checks)
        while True:
            await asyncio.sleep(self.INTERVAL_S)
            if not policy.due(self._started, self._running, resident_bytes()):
                continue
            # In a worker thread: the event loop keeps answering while glibc walks its heap.
            if not await self._run_in_thread(release_free_heap):
                return  # not glibc: nothing to do, ever
            policy.trimmed(resident_bytes())
