"""Whose turn it is on a device shared by several models' batchers.

Every request needs every model, so a request is answered only when its slowest model is
done. When the device frees up, the turn goes to the batcher whose oldest pending item
has waited longest (not to whoever asked first): a model that has just run a small batch
lets the others catch up, and its own pending items pile up into a larger batch meanwhile.
A waiting batcher's oldest item only gets older, so every batcher gets its turn.

A device has `slots` turns at once: a CPU runs several forwards side by side (each on its
share of the cores), a GPU one. A spare turn (the second half of a model's last batch) only
takes a slot that pending work would leave idle: batchers with pending items go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable

# The rank of a spare turn: after every batcher holding pending items (ranked by the age of
# the oldest, a clock reading), before batchers with nothing pending (ranked +inf).
SPARE_RANK = sys.float_info.max


class DeviceTurns:
    def __init__(self, slots: int = 1) -> None:
        self._slots = slots
        self._in_use = 0
        self._waiting: list[tuple[Callable[[], float], asyncio.Future[None]]] = []

    @property
    def slots(self) -> int:
        return self._slots

    @contextlib.asynccontextmanager
    async def turn(self, oldest_enqueued_at: Callable[[], float]) -> AsyncIterator[None]:
        """Hold the device; `oldest_enqueued_at` ranks this batcher while it waits."""
        await self._acquire(oldest_enqueued_at)
        try:
            yield
        finally:
            self._release()

    def spare_turn(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a slot that no pending work is waiting for: one idle now, or the next to
        free up while no batcher with pending items waits."""
        return self.turn(lambda: SPARE_RANK)

    @property
    def work_waits(self) -> bool:
        """Whether a batcher with pending items waits for a turn (so a slot freed now
        would not go idle)."""
        return any(oldest() < SPARE_RANK for oldest, _ in self._waiting)

    def older_work_waits(self, oldest_enqueued_at: float) -> bool:
        """Whether a waiting batcher holds an item older than `oldest_enqueued_at`: the
        holder of the turn asks before running another batch of its own."""
        return any(oldest() < oldest_enqueued_at for oldest, _ in self._waiting)

    async def _acquire(self, oldest_enqueued_at: Callable[[], float]) -> None:
        if self._in_use < self._slots:
            self._in_use += 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (oldest_enqueued_at, granted)
        self._waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif granted.done() and not granted.cancelled():
                self._release()  # granted just as it was cancelled: pass the turn on
            raise

    def _release(self) -> None:
        while self._waiting:
            entry = min(self._waiting, key=lambda waiter: waiter[0]())
            self._waiting.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)  # the slot stays taken, now by this waiter
                return
        self._in_use -= 1
