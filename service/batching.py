"""A generic asyncio micro-batcher with a padded-token budget.

It knows nothing about models: items carry an opaque payload, a length (tokens of their
longest row) and a row count. Pending items are flushed when the oldest has waited
`max_wait_s`, or when they would fill a batch. Each forward is chosen afresh from
everything pending: the pending items are sorted by length and cut into batches whose
padded size (rows x longest length) stays under `max_batch_tokens`, and the batch holding
the next item in fair order runs; the rest wait for the next choice, where items that
arrived meanwhile join them (a wider choice of lengths, so less padding). Models that pack
their rows cut the items in fair order instead (`arrival_order`), so that the oldest items
go first (`service.batch_forming`). With a fill wait (`fill_wait_s`), a batch that has its
device may keep it idle that long for more items.
On a device with several slots (a CPU's cores), a model's last pending batch runs as two
halves side by side when another slot is free (`split_in_two`): otherwise the end of a
burst of work runs on one core while the other has nothing left to do. When no slot is
free (another forward holds it) the batch runs whole: halves one after the other cost
more per item, and the requests of the second half would be answered later than the
rest, so concurrent clients fall out of step into smaller batches.
Items whose caller went away (cancelled future) or whose deadline passed are dropped before
they reach `run_batch`; the latter fail with `DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from service.batch_forming import (
    BatchLimits,
    WorkItem,
    form_batches,
    in_arrival_order,
    padded_tokens,
    split_in_two,
)
from service.device_turns import DeviceTurns
from service.errors import DeadlineExceeded, NotReady

P = TypeVar("P")
R = TypeVar("R")
DropReason = Literal["deadline", "cancelled"]


@dataclass(frozen=True)
class BatchStats:
    """What one executed batch looked like; reported to an observer (metrics)."""

    size: int
    rows: int
    real_tokens: int
    padded_tokens: int
    queue_wait_s: tuple[float, ...]
    run_s: float
    failed: bool  # the whole batch raised
    failed_items: int = 0  # items for which `run_batch` returned an exception


class BatchSizeMismatch(RuntimeError):
    """A batch function returned a different number of results than it got items."""


class MicroBatcher(Generic[P, R]):
    """Merges items submitted by many concurrent callers into batches for `run_batch`.

    Items are queued per owner (a trainer). Before each forward, a window of at most
    `WINDOW_BATCHES` batches' worth of pending items is taken, one item per owner in turn,
    oldest first within an owner; the window is cut into length-sorted batches and the one
    holding the window's first item (the oldest item of the owner whose turn it is) runs
    (with `arrival_order`, the window's first items run, in that order). Owners take turns
    at being first, so an owner that floods the queue delays another owner's item by at
    most one forward per owner, never by its whole backlog.

    `run_batch` may return an exception in place of an item's result: it fails only that
    item. Dropped items (deadline passed, caller gone) are reported to `on_dropped`.

    With `announced_arrivals`, callers `announce` items before preparing them (tokenising
    takes a while) and the batcher holds a batch back for up to `max_wait_s` only while
    announced items are still on their way: a lone request is not kept waiting for
    company that nobody has sent. Without it, every batch waits up to `max_wait_s`.
    A fill wait (`fill_wait_s`) does keep it waiting, for requests not yet sent (the next
    ones of clients just answered): at low load every forward waits it out.
    """

    WINDOW_BATCHES = 4

    def __init__(
        self,
        run_batch: Callable[[list[P]], Awaitable[Sequence[R | BaseException]]],
        limits: BatchLimits,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_dropped: Callable[[DropReason, int], None] | None = None,
        count_padded: Callable[[list[P]], int] | None = None,
        announced_arrivals: bool = False,
        device_turns: DeviceTurns | None = None,
        concurrent_batches: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._limits = limits
        self._on_batch = on_batch
        self._on_dropped = on_dropped
        # How many padded tokens `run_batch` really computes, for models that lay rows out
        # their own way; the default is one rectangle of rows x longest row.
        self._count_padded: Callable[[Sequence[WorkItem[P]]], int] = (
            padded_tokens
            if count_padded is None
            else lambda batch: count_padded([item.payload for item in batch])
        )
        self._announced_arrivals = announced_arrivals
        # Shared by the batchers of models on one device: a batch is chosen only once the
        # device is free, so items that arrive while another model's forward runs join it
        # (a batch chosen earlier would wait in the device's queue with its items fixed).
        self._device_turns = device_turns or DeviceTurns()
        # Batches of this model that may run at once (the device's slots): each is a loop
        # taking its turns; batches are chosen one at a time, so no item is in two.
        self._concurrent_batches = concurrent_batches
        self._announced = 0  # announced, not yet submitted
        self._pending: dict[str, deque[WorkItem[P]]] = {}
        self._pending_count = 0
        self._pending_rows = 0
        self._pending_max_length = 0
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._own_turn_taken = False  # a loop holds (or waits for) this batcher's own turn
        self._others_expect_work = self._device_turns.join(
            lambda: self._pending_count > 0 or self._announced > 0
        )

    @property
    def depth(self) -> int:
        return self._pending_count

    @property
    def idle(self) -> bool:
        """Nothing pending and nothing announced: an item submitted now would batch alone."""
        return self._pending_count == 0 and self._announced == 0

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._loop(), name=f"micro-batcher-{index}")
                for index in range(self._concurrent_batches)
            ]

    async def stop(self) -> None:
        """Stop the loops; every item not yet scored, pending or in a forward cut short,
        fails with `NotReady` (503 + Retry-After: the client retries elsewhere or later)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for queue in self._pending.values():
            _fail_as_stopped(queue)
        self._pending.clear()
        self._pending_count = 0

    def announce(self, count: int) -> None:
        """`count` items will be submitted soon (or `withdraw`n)."""
        self._announced += count

    def withdraw(self, count: int) -> None:
        """Announced items that will not come after all (their caller failed or left)."""
        self._announced = max(0, self._announced - count)
        self._arrived.set()  # a batch held back for them can go now
        self._device_turns.expected_work_withdrawn()  # a slot kept for them can go too

    def submit(
        self,
        payload: P,
        length: int,
        rows: int = 1,
        tokens: int | None = None,
        owner: str = "",
        deadline: float | None = None,
    ) -> asyncio.Future[R]:
        """Queue one item; `deadline` is on the `time.monotonic()` clock (None: no deadline)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        real_tokens = length * rows if tokens is None else tokens
        item = WorkItem(
            payload, length, rows, real_tokens, future, time.monotonic(), deadline, owner
        )
        self._pending.setdefault(owner, deque()).append(item)
        self._announced = max(0, self._announced - 1)
        self._pending_count += 1
        self._pending_rows += rows
        self._pending_max_length = max(self._pending_max_length, length)
        self._arrived.set()
        return future

    def _full(self) -> bool:
        """Whether the pending items would fill a batch, by rows padded to the longest. For
        packed rows that is an upper bound, so the wait for more items may end a little
        early; counting their real tokens instead is untested (HISTORY.md, session 22:
        the paired rounds that seemed to reject it ran the same code on both sides)."""
        return (
            self._pending_count >= self._limits.max_batch_size
            or self._pending_rows * self._pending_max_length >= self._limits.max_batch_tokens
        )

    def _pending_items(self) -> Iterator[WorkItem[P]]:
        return (item for queue in self._pending.values() for item in queue)

    def _oldest_enqueued_at(self) -> float:
        return min(queue[0].enqueued_at for queue in self._pending.values())

    def _oldest_pending(self) -> float:
        return self._oldest_enqueued_at() if self._pending else math.inf

    async def _wait_for_batch(self) -> None:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._oldest_enqueued_at() + self._limits.max_wait_s
        while not self._full() and (self._announced > 0 or not self._announced_arrivals):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _window(self) -> list[WorkItem[P]]:
        """Pending items in fair order, without removing them: one per owner in turn."""
        limit = self.WINDOW_BATCHES * self._limits.max_batch_size
        queues = [iter(queue) for queue in self._pending.values()]
        window: list[WorkItem[P]] = []
        while queues and len(window) < limit:
            for queue in list(queues):
                item = next(queue, None)
                if item is None:
                    queues.remove(queue)
                    continue
                window.append(item)
                if len(window) >= limit:
                    break
        return window

    def _remove(self, items: Sequence[WorkItem[P]]) -> None:
        """Take `items` out of the pending queues, keeping every other item's place."""
        gone = {id(item) for item in items}
        for owner in {item.owner for item in items}:
            kept = deque(item for item in self._pending[owner] if id(item) not in gone)
            if kept:
                self._pending[owner] = kept
            else:
                del self._pending[owner]
        remaining = list(self._pending_items())
        self._pending_count = len(remaining)
        self._pending_rows = sum(item.rows for item in remaining)
        self._pending_max_length = max((item.length for item in remaining), default=0)

    def _next_batch(self) -> list[WorkItem[P]]:
        """The batch to run now: the one holding the window's first item.

        The first item's owner then goes to the back of the line, so owners take turns.
        """
        window = self._window()
        live = self._drop_dead(window)
        kept = {id(item) for item in live}
        dead = [item for item in window if id(item) not in kept]
        if not live:
            self._remove(dead)
            return []
        first = live[0]
        if self._limits.arrival_order:  # the first batch: the oldest items, in fair order
            chosen = next(in_arrival_order(live, self._limits, self._count_padded))
        else:
            batches = form_batches(live, self._limits, self._count_padded)
            chosen = next(b for b in batches if any(i is first for i in b))
        self._remove(dead + chosen)  # one pass over the queues per forward
        # To the back of the line: the first item's owner, or (a batch of the oldest items
        # in fair order) every owner in it, in the order of its last item in the batch, so
        # that the next batch goes on where this one stopped.
        owners = [first.owner]
        if self._limits.arrival_order:
            last_index = {item.owner: index for index, item in enumerate(chosen)}
            owners = sorted(last_index, key=last_index.__getitem__)
        for owner in owners:
            if owner in self._pending:
                self._pending[owner] = self._pending.pop(owner)
        return chosen

    def _drop_dead(self, items: list[WorkItem[P]]) -> list[WorkItem[P]]:
        """The items still worth a forward; the others are dropped and reported."""
        now = time.monotonic()
        live: list[WorkItem[P]] = []
        dropped: dict[DropReason, int] = {"deadline": 0, "cancelled": 0}
        for item in items:
            if item.future.cancelled():
                dropped["cancelled"] += 1
            elif item.future.done():
                continue
            elif item.deadline is not None and now >= item.deadline:
                dropped["deadline"] += 1
                waited_ms = 1000 * (now - item.enqueued_at)
                item.future.set_exception(
                    DeadlineExceeded(
                        f"the request's deadline passed after {waited_ms:.0f} ms in the queue; "
                        "its items were dropped before scoring"
                    )
                )
            else:
                live.append(item)
        if self._on_dropped is not None:
            for reason, count in dropped.items():
                if count:
                    self._on_dropped(reason, count)
        return live

    async def _loop(self) -> None:
        while True:
            await self._wait_for_batch()
            if self._own_turn_taken:  # another loop has this model's own turn
                async with self._device_turns.spare_turn(self._others_expect_work):
                    await self._run_pending(fill=False)  # a spare slot is not kept idle
                continue
            self._own_turn_taken = True
            try:
                async with self._device_turns.turn(self._oldest_pending):
                    await self._run_pending()
            finally:
                self._own_turn_taken = False

    async def _fill(self) -> None:
        """Hold the device up to `fill_wait_s` for more items, until the batch is full; not
        at all when a pending item's deadline falls within the wait, which would drop it."""
        until = time.monotonic() + self._limits.fill_wait_s
        if any(i.deadline is not None and i.deadline <= until for i in self._pending_items()):
            return
        while not self._full() and (remaining := until - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _run_pending(self, fill: bool = True) -> None:
        """Run batches while this batcher holds the oldest work waiting for the device;
        first, with `fill`, let a batch that is not full wait for company (`_fill`)."""
        if fill and self._pending and self._limits.fill_wait_s > 0:
            await self._fill()
        while batch := self._next_batch():
            if (
                self._pending
                or len(batch) < 2
                or self._others_expect_work()
                or not self._device_turns.take_free_slot()  # last: it takes the slot
            ):
                await self._execute(batch)
            else:  # this model's last batch; a slot is free and no other model needs it
                await self._execute_in_halves(batch)
            if self._device_turns.older_work_waits(self._oldest_pending()):
                break

    async def _execute_in_halves(self, batch: list[WorkItem[P]]) -> None:
        """Run the batch as two halves at once: one on this turn's slot, the other on the
        free slot the caller took for it (given back here)."""
        try:
            first, second = split_in_two(batch)
            async with asyncio.TaskGroup() as halves:  # waits for both, even when cancelled
                halves.create_task(self._execute(first))
                halves.create_task(self._execute(second))
        except asyncio.CancelledError:  # stopped, perhaps before a half's task began
            _fail_as_stopped(batch)
            raise
        finally:
            self._device_turns.release_slot()

    async def _execute(self, batch: list[WorkItem[P]]) -> None:
        started = time.monotonic()
        failed = False
        failed_items = 0
        try:
            results = await self._run_batch([item.payload for item in batch])
            if len(results) != len(batch):
                raise BatchSizeMismatch(f"batch of {len(batch)} items returned {len(results)}")
        except asyncio.CancelledError:  # stopped while the forward ran
            _fail_as_stopped(batch)
            raise
        except Exception as exc:
            failed = True
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    failed_items += 1
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(
                    size=len(batch),
                    rows=sum(i.rows for i in batch),
                    real_tokens=sum(i.tokens for i in batch),
                    padded_tokens=self._count_padded(batch),
                    queue_wait_s=tuple(started - i.enqueued_at for i in batch),
                    run_s=time.monotonic() - started,
                    failed=failed,
                    failed_items=failed_items,
                )
            )


def _fail_as_stopped(items: Iterable[WorkItem]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(NotReady("the service stopped before scoring this item"))
