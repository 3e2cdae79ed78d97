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
from typing import Any, Generic, TypeVar

from service.worker_threads import WorkerThreads

P = TypeVar("P")
R = TypeVar("R")

# Each payload's outcome, in order: (True, result) or (False, the exception it raised).
Outcomes = list[tuple[bool, Any]]


class CoalescedCalls(Generic[P, R]):
    """`run(payload)` calls queued before the loop's next turn go to `pool` as one call of
    `together(payloads)`, which returns each payload's outcome; each caller gets its own
    result or exception, and callers that left before the call are not in it."""

    def __init__(self, pool: WorkerThreads, together: Callable[[list[P]], Outcomes]) -> None:
        self._pool = pool
        self._together = together
        self._queued: list[tuple[P, asyncio.Future[R]]] = []

    def run(self, payload: P) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((payload, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        live = [(payload, future) for payload, future in queued if not future.cancelled()]
        if not live:
            return
        together = self._pool.run(self._together, [payload for payload, _ in live])

        def settle(done: asyncio.Future[Outcomes]) -> None:
            if done.cancelled() or done.exception() is not None:  # the pool itself failed
                for _, future in live:
                    if future.done():
                        continue
                    if done.cancelled():
                        future.cancel()
                    else:
                        future.set_exception(done.exception())  # type: ignore[arg-type]
                return
            for (_, future), (ok, value) in zip(live, done.result(), strict=True):
                if future.done():  # its caller left
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

        together.add_done_callback(settle)
