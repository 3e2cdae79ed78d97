"""A generic asyncio micro-batcher with a padded-token budget.

It knows nothing about models: items carry an opaque payload, a length (tokens of their
longest row) and a row count. Pending items are flushed when the oldest has waited
`max_wait_s`, or when they would fill a batch; a flush sorts them by length and cuts them
into batches whose padded size (rows x longest length) stays under `max_batch_tokens`.
Items whose caller went away (cancelled future) or whose deadline passed are dropped before
they reach `run_batch`; the latter fail with `DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from service.errors import DeadlineExceeded

P = TypeVar("P")
R = TypeVar("R")
DropReason = Literal["deadline", "cancelled"]


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_s: float
    # Start a new batch rather than let real / padded tokens fall below this (0 = never).
    min_padding_efficiency: float = 0.0
    # Start a new batch when padding the batch's rows up to the next item's length would
    # cost more tokens than one more forward call does (None = never).
    forward_overhead_tokens: int | None = None


@dataclass(frozen=True)
class WorkItem(Generic[P]):
    payload: P
    length: int  # tokens of this item's longest row
    rows: int  # sequences this item adds to the forward pass
    tokens: int  # real (unpadded) tokens over all rows
    future: asyncio.Future = field(compare=False)
    enqueued_at: float = field(compare=False)
    deadline: float | None = field(default=None, compare=False)  # time.monotonic(); None: never


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


def padded_tokens(items: Sequence[WorkItem]) -> int:
    return sum(i.rows for i in items) * max((i.length for i in items), default=0)


def form_batches(items: Sequence[WorkItem], limits: BatchLimits) -> list[list[WorkItem]]:
    """Length-sorted greedy cut: similar lengths share a batch, so little padding is wasted."""
    batches: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    rows = tokens = 0
    for item in sorted(items, key=lambda i: i.length):
        # Sorted ascending, so `item.length` is the new batch's longest row.
        padded = (rows + item.rows) * item.length
        too_many_tokens = padded > limits.max_batch_tokens
        too_much_padding = (tokens + item.tokens) < limits.min_padding_efficiency * padded
        overhead = limits.forward_overhead_tokens
        growth = item.length - current[-1].length if current else 0
        padding_beats_a_forward = overhead is not None and rows * growth > overhead
        if current and (
            too_many_tokens
            or too_much_padding
            or padding_beats_a_forward
            or len(current) >= limits.max_batch_size
        ):
            batches.append(current)
            current, rows, tokens = [], 0, 0
        current.append(item)
        rows += item.rows
        tokens += item.tokens
    if current:
        batches.append(current)
    return batches


class MicroBatcher(Generic[P, R]):
    """Merges items submitted by many concurrent callers into batches for `run_batch`.

    Items are queued per owner (a trainer). Each flush takes a round of at most
    `ROUND_BATCHES` batches' worth of items, one item per owner in turn, oldest first within
    an owner; so an owner that floods the queue delays another owner's item by at most one
    round, never by its whole backlog.

    `run_batch` may return an exception in place of an item's result: it fails only that
    item. Dropped items (deadline passed, caller gone) are reported to `on_dropped`.

    With `announced_arrivals`, callers `announce` items before preparing them (tokenising
    takes a while) and the batcher holds a batch back for up to `max_wait_s` only while
    announced items are still on their way: a lone request is not kept waiting for
    company that nobody has sent. Without it, every batch waits up to `max_wait_s`.
    """

    ROUND_BATCHES = 4

    def __init__(
        self,
        run_batch: Callable[[list[P]], Awaitable[Sequence[R | BaseException]]],
        limits: BatchLimits,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_dropped: Callable[[DropReason, int], None] | None = None,
        count_padded: Callable[[list[P]], int] | None = None,
        announced_arrivals: bool = False,
    ) -> None:
        self._run_batch = run_batch
        self._limits = limits
        self._on_batch = on_batch
        self._on_dropped = on_dropped
        # How many padded tokens `run_batch` really computes, for models that lay rows out
        # their own way; the default is one rectangle of rows x longest row.
        self._count_padded = count_padded
        self._announced_arrivals = announced_arrivals
        self._announced = 0  # announced, not yet submitted
        self._pending: dict[str, deque[WorkItem[P]]] = {}
        self._pending_count = 0
        self._pending_rows = 0
        self._pending_max_length = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._pending_count

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Fail whatever is still pending and stop the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for queue in self._pending.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(RuntimeError("batcher stopped"))
        self._pending.clear()
        self._pending_count = 0

    def announce(self, count: int) -> None:
        """`count` items will be submitted soon (or `withdraw`n)."""
        self._announced += count

    def withdraw(self, count: int) -> None:
        """Announced items that will not come after all (their caller failed or left)."""
        self._announced = max(0, self._announced - count)
        self._arrived.set()  # a batch held back for them can go now

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
        item = WorkItem(payload, length, rows, real_tokens, future, time.monotonic(), deadline)
        self._pending.setdefault(owner, deque()).append(item)
        self._announced = max(0, self._announced - 1)
        self._pending_count += 1
        self._pending_rows += rows
        self._pending_max_length = max(self._pending_max_length, length)
        self._arrived.set()
        return future

    def _full(self) -> bool:
        return (
            self._pending_count >= self._limits.max_batch_size
            or self._pending_rows * self._pending_max_length >= self._limits.max_batch_tokens
        )

    def _oldest_enqueued_at(self) -> float:
        return min(queue[0].enqueued_at for queue in self._pending.values())

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

    def _take_round(self) -> list[WorkItem[P]]:
        """One item per owner in turn until the round is full or nothing is pending."""
        limit = self.ROUND_BATCHES * self._limits.max_batch_size
        taken: list[WorkItem[P]] = []
        while self._pending and len(taken) < limit:
            for owner in list(self._pending):
                queue = self._pending[owner]
                taken.append(queue.popleft())
                if not queue:
                    del self._pending[owner]
                if len(taken) >= limit:
                    break
        remaining = [item for queue in self._pending.values() for item in queue]
        self._pending_count = len(remaining)
        self._pending_rows = sum(item.rows for item in remaining)
        self._pending_max_length = max((item.length for item in remaining), default=0)
        return taken

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
            for batch in form_batches(self._drop_dead(self._take_round()), self._limits):
                await self._execute(batch)

    async def _execute(self, batch: list[WorkItem[P]]) -> None:
        # Checked again here: earlier batches of the round may have taken a while.
        live = self._drop_dead(batch)
        if not live:
            return
        started = time.monotonic()
        failed = False
        failed_items = 0
        try:
            results = await self._run_batch([item.payload for item in live])
            if len(results) != len(live):
                raise BatchSizeMismatch(f"batch of {len(live)} items returned {len(results)}")
        except Exception as exc:
            failed = True
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
        else:
            for item, result in zip(live, results, strict=True):
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
                    size=len(live),
                    rows=sum(i.rows for i in live),
                    real_tokens=sum(i.tokens for i in live),
                    padded_tokens=(
                        padded_tokens(live)
                        if self._count_padded is None
                        else self._count_padded([item.payload for item in live])
                    ),
                    queue_wait_s=tuple(started - i.enqueued_at for i in live),
                    run_s=time.monotonic() - started,
                    failed=failed,
                    failed_items=failed_items,
                )
            )
