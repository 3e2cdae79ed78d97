"""Work queued in one turn of the event loop, done in one worker-thread call.

A request tokenises its items for every model; one thread call per model ran them side by
side on the tokenizer threads, so the first model's forward started while the next was
still tokenising, and each slowed the other on a 2-core host. Run together, every model's
inputs are ready at once and their forwards start together: at one single-item client on
a 2-core CPU, 1.0 to 1.6 ms beyond the longest forward per request instead of 3.3
(in-process measurement with inputs prepared up front, the bound this approaches). The
engine queues every request's work in one `CoalescedCalls`, so requests that arrive
together are also tokenised together (`service.models.base.prepare_together`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from service.worker_threads import WorkerThreads

P = TypeVar("P")
R = TypeVar("R")

# A payload's outcome: (True, its result) or (False, the exception it raised).
Outcome = tuple[bool, R | Exception]


class CoalescedCalls(Generic[P, R]):
    """`run(payload)` calls queued before the loop's next turn go to `pool` as one call of
    `together(payloads)`, which returns each payload's outcome; each caller gets its own
    result or exception, and callers that left before the call are not in it.

    A group closes once its payloads' `weight` reaches `max_weight` and the rest go in
    further calls: a burst is worked through in order on every thread of the pool, and its
    first requests' work is done (their forwards can start) before its last is. Payloads
    queued one after another with the same `key` (one request's) stay in one group, however
    heavy."""

    def __init__(
        self,
        pool: WorkerThreads,
        together: Callable[[list[P]], list[Outcome[R]]],
        weight: Callable[[P], int] = lambda _: 1,
        max_weight: int | None = None,
    ) -> None:
        self._pool = pool
        self._together = together
        self._weight = weight
        self._max_weight = max_weight
        self._queued: list[tuple[P, object, asyncio.Future[R]]] = []

    def run(self, payload: P, key: object = None) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((payload, key, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        group: list[tuple[P, asyncio.Future[R]]] = []
        weight, group_key = 0, None
        for payload, key, future in queued:
            if future.cancelled():
                continue
            full = self._max_weight is not None and weight >= self._max_weight
            if group and full and (key is None or key != group_key):
                self._hand_over(group)
                group, weight = [], 0
            group.append((payload, future))
            weight += self._weight(payload)
            group_key = key
        if group:
            self._hand_over(group)

    def _hand_over(self, group: list[tuple[P, asyncio.Future[R]]]) -> None:
        """One pool call for `group`; each caller's future settled from its outcome."""
        together = self._pool.run(self._together, [payload for payload, _ in group])

        def settle(done: asyncio.Future[list[Outcome[R]]]) -> None:
            if done.cancelled() or done.exception() is not None:  # the pool itself failed
                for _, future in group:
                    if future.done():
                        continue
                    if done.cancelled():
                        future.cancel()
                    else:
                        future.set_exception(done.exception())  # type: ignore[arg-type]
                return
            for (_, future), (ok, value) in zip(group, done.result(), strict=True):
                if future.done():  # its caller left
                    continue
                if ok:
                    future.set_result(cast(R, value))
                else:
                    future.set_exception(cast(Exception, value))

        together.add_done_callback(settle)
