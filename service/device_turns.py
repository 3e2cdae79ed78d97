"""Whose turn it is on a device shared by several models' batchers.

Every request needs every model, so a request is answered only when its slowest model is
done. When the device frees up, the turn goes to the batcher whose oldest pending item
has waited longest (not to whoever asked first): a model that has just run a small batch
lets the others catch up, and its own pending items pile up into a larger batch meanwhile.
A waiting batcher's oldest item only gets older, so every batcher gets its turn.

A device has `slots` turns at once: a CPU runs several forwards side by side (each on
its share of the cores, `cpu_workers`), a GPU `gpu_workers` (one by default). A batcher
takes a turn of its own for one slot at a time; a second slot it takes only as a spare
turn (another batch of the same model), one that no other model's work needs, or, for
the second half of its last batch, only if one is free at that moment
(`take_free_slot`): while another model has items pending or on their way (being
tokenised), a slot stays for it (until those items arrive, or are withdrawn because
their caller left). Traced on two CPU slots with 8 single-item clients: a fast model
otherwise took both slots for batches of one or two items just before the slow model's
batch arrived, which then waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from typing import Any


class DeviceTurns:
    def __init__(self, slots: int = 1) -> None:
        self._slots = slots
        self._in_use = 0
        self._waiting: list[tuple[Callable[[], float], asyncio.Future[None]]] = []
        self._spare_waiting: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._members: list[Callable[[], bool]] = []

    def take_free_slot(self) -> bool:
        """Take a slot without waiting, if one is free now; hand it back with
        `release_slot`. For work that is worth a second slot only if it can start at once;
        unlike `spare_turn` it does not ask whether other batchers expect work (the caller
        does)."""
        if self._in_use >= self._slots:
            return False
        self._in_use += 1
        return True

    def release_slot(self) -> None:
        self._release()

    def join(self, expects_work: Callable[[], bool]) -> Callable[[], bool]:
        """Register a batcher by whether it has items pending or on their way; returns
        whether any other batcher on this device has."""
        self._members.append(expects_work)
        return lambda: any(member() for member in self._members if member is not expects_work)

    @contextlib.asynccontextmanager
    async def turn(self, oldest_enqueued_at: Callable[[], float]) -> AsyncIterator[None]:
        """Hold the device; `oldest_enqueued_at` ranks this batcher while it waits."""
        await self._acquire(oldest_enqueued_at)
        try:
            yield
        finally:
            self._release()

    @contextlib.asynccontextmanager
    async def spare_turn(self, others_expect_work: Callable[[], bool]) -> AsyncIterator[None]:
        """Hold a slot that no other batcher's work needs: one free now, or the next to free
        up, while `others_expect_work()` is false and no batcher with pending items waits."""
        await self._acquire_spare(others_expect_work)
        try:
            yield
        finally:
            self._release()

    def expected_work_withdrawn(self) -> None:
        """Work a free slot was kept for will not come: spare turns may take the slot."""
        while self._in_use < self._slots and (spare := self._next_spare()) is not None:
            self._in_use += 1
            spare.set_result(None)

    def older_work_waits(self, oldest_enqueued_at: float) -> bool:
        """Whether a waiting batcher holds an item older than `oldest_enqueued_at`: the
        holder of the turn asks before running another batch of its own."""
        return any(oldest() < oldest_enqueued_at for oldest, _ in self._waiting)

    async def _acquire(self, oldest_enqueued_at: Callable[[], float]) -> None:
        if self._in_use < self._slots:
            self._in_use += 1
            return
        entry = (oldest_enqueued_at, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        await self._granted(entry, self._waiting)

    async def _acquire_spare(self, others_expect_work: Callable[[], bool]) -> None:
        if self._in_use < self._slots and not others_expect_work():
            self._in_use += 1
            return
        entry = (others_expect_work, asyncio.get_running_loop().create_future())
        self._spare_waiting.append(entry)
        await self._granted(entry, self._spare_waiting)

    async def _granted(self, entry: tuple[object, asyncio.Future[None]], queue: list[Any]) -> None:
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry in queue:
                queue.remove(entry)
            elif entry[1].done() and not entry[1].cancelled():
                self._release()  # granted just as it was cancelled: pass the turn on
            raise

    def _release(self) -> None:
        """Pass the freed slot on: to the batcher with the oldest pending item, else to a
        spare turn that no other work needs, else to a batcher with nothing pending (it
        hands it straight back), else leave it free."""
        waiter = self._next_waiter()
        if waiter is None:
            self._in_use -= 1
        else:
            waiter.set_result(None)  # the slot stays taken, now by this waiter

    def _next_waiter(self) -> asyncio.Future[None] | None:
        # In place: a waiter being cancelled looks for its entry in these very lists.
        self._waiting[:] = [w for w in self._waiting if not w[1].done()]
        oldest = min(self._waiting, key=lambda waiter: waiter[0](), default=None)
        if oldest is None or oldest[0]() == math.inf:  # no waiter has pending items
            spare = self._next_spare()
            if spare is not None or oldest is None:
                return spare
        self._waiting.remove(oldest)
        return oldest[1]

    def _next_spare(self) -> asyncio.Future[None] | None:
        """The first spare waiter that no other batcher's expected work keeps out, removed
        from the waiting list."""
        self._spare_waiting[:] = [w for w in self._spare_waiting if not w[1].done()]
        spare = next((w for w in self._spare_waiting if not w[0]()), None)
        if spare is None:
            return None
        self._spare_waiting.remove(spare)
        return spare[1]
