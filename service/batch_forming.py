"""How pending items become batches, under a padded-token budget.

Rectangles of rows padded to their longest waste less when similar lengths share a batch,
so items are sorted by length first. Models that pack rows end to end pad little whatever
the lengths, so their batches are cut in arrival order: the oldest items go first, and no
item is overtaken by younger ones of a length that sorts better. Pure functions of the
items' lengths and row counts, shared by the micro-batcher and the benchmark's in-process
limits, so that both cut the same batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.padding_cuts import cheapest_cuts

P = TypeVar("P")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_s: float
    # Start a new batch rather than let real / padded tokens fall below this (0 = never).
    min_padding_efficiency: float = 0.0
    # What one forward call costs beyond its padded tokens, in tokens: batches are cut
    # where padded tokens + this per call is least (None = never cut to save padding).
    forward_overhead_tokens: int | None = None
    # Once a batch has the device, how long it may hold it waiting for more items while
    # it is not full: on a device that prices a forward by the call (a GPU bound by its
    # host), a fuller batch is worth a short idle slot (0 = run at once).
    fill_wait_s: float = 0.0
    # Cut in the order given (oldest first), not sorted by length: for models that pack
    # their rows (padding does not depend on the lengths next to each other). The budget
    # then counts each batch's padded tokens as the model lays them out.
    arrival_order: bool = False


@dataclass(frozen=True)
class WorkItem(Generic[P]):
    payload: P
    length: int  # tokens of this item's longest row
    rows: int  # sequences this item adds to the forward pass
    tokens: int  # real (unpadded) tokens over all rows
    future: asyncio.Future = field(compare=False)
    enqueued_at: float = field(compare=False)
    deadline: float | None = field(default=None, compare=False)  # time.monotonic(); None: never
    owner: str = field(default="", compare=False)


def padded_tokens(items: Sequence[WorkItem]) -> int:
    return sum(i.rows for i in items) * max((i.length for i in items), default=0)


PaddedCounter = Callable[[Sequence[WorkItem]], int]


def form_batches(
    items: Sequence[WorkItem], limits: BatchLimits, count_padded: PaddedCounter = padded_tokens
) -> list[list[WorkItem]]:
    """Length-sorted batches (similar lengths share a batch, so little padding is wasted),
    or batches in arrival order for models that pack their rows.

    With `forward_overhead_tokens`, the sorted items are cut where it costs least time
    (`cheapest_cuts`); without, each batch is filled up to the limits. With
    `arrival_order`, batches in the order given instead (`in_arrival_order`), their padded
    tokens counted by `count_padded` (the model's own layout).
    """
    if limits.arrival_order:
        return list(in_arrival_order(items, limits, count_padded))
    ordered = sorted(items, key=lambda i: i.length)
    if limits.forward_overhead_tokens is not None:
        cuts = cheapest_cuts(
            [i.length for i in ordered],
            [i.rows for i in ordered],
            [i.tokens for i in ordered],
            limits.forward_overhead_tokens,
            limits.max_batch_size,
            limits.max_batch_tokens,
            limits.min_padding_efficiency,
        )
        return [ordered[start:end] for start, end in cuts]
    batches: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    rows = tokens = 0
    for item in ordered:
        # Sorted ascending, so `item.length` is the new batch's longest row.
        padded = (rows + item.rows) * item.length
        too_many_tokens = padded > limits.max_batch_tokens
        too_much_padding = (tokens + item.tokens) < limits.min_padding_efficiency * padded
        if current and (
            too_many_tokens or too_much_padding or len(current) >= limits.max_batch_size
        ):
            batches.append(current)
            current, rows, tokens = [], 0, 0
        current.append(item)
        rows += item.rows
        tokens += item.tokens
    if current:
        batches.append(current)
    return batches


def in_arrival_order(
    items: Sequence[WorkItem], limits: BatchLimits, count_padded: PaddedCounter
) -> Iterator[list[WorkItem]]:
    """Batches of consecutive items, each as long as the size cap and the token budget
    allow (at least one item), made as they are asked for: a batcher takes only the first."""
    budget = limits.max_batch_tokens

    def fits(batch: Sequence[WorkItem]) -> bool:
        # Rows padded to the longest bound a packed layout from above: packing into bins of
        # that width needs at most one bin per row, and a wider width is chosen only where
        # it pads fewer tokens still. So the layout is counted only above that bound.
        return padded_tokens(batch) <= budget or count_padded(batch) <= budget

    start = 0
    while start < len(items):
        cap = min(len(items), start + limits.max_batch_size)
        end = start + 1  # real tokens bound the padded ones from below: no longer than this
        tokens = items[start].tokens
        while end < cap:
            tokens += items[end].tokens
            if tokens > budget:
                break
            end += 1
        if not fits(items[start:end]):  # a long prefix that fits, by bisection (one item: goes)
            low, high = start + 1, end - 1
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if fits(items[start:middle]) else (low, middle - 1)
            end = low
        yield list(items[start:end])
        start = end


def split_in_two(batch: Sequence[WorkItem[P]]) -> tuple[list[WorkItem[P]], list[WorkItem[P]]]:
    """Two halves of about equal padded size: items longest first, each to the half that
    is the smaller once it joins (a half is as wide as its first, longest item)."""
    halves: tuple[list[WorkItem[P]], list[WorkItem[P]]] = ([], [])
    rows = [0, 0]
    for item in sorted(batch, key=lambda i: i.length, reverse=True):
        grown = [
            (rows[h] + item.rows) * (halves[h][0].length if halves[h] else item.length)
            for h in (0, 1)
        ]
        smaller = min((0, 1), key=lambda h: (grown[h], rows[h]))  # rows: zero-length items
        halves[smaller].append(item)
        rows[smaller] += item.rows
    return halves
