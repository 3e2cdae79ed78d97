"""Worker threads that answer asyncio futures directly.

`loop.run_in_executor` wraps a `concurrent.futures.Future` (and its lock and condition) in
an asyncio future and chains the two; the scoring path makes such a call per model per
request and per batch, on the event loop that bounds a host-bound GPU. On the 2-core VM
a call cost the event loop 29 us of CPU with 64 callers (70 us with one); these threads,
which resolve the asyncio future itself through `call_soon_threadsafe`, 12 us (40 us).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from service.thread_cpu import clock_seconds, own_cpu_clock

T = TypeVar("T")
_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


def _resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the caller left while its job ran
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class WorkerThreads:
    """`count` threads running submitted calls in order of submission."""

    def __init__(
        self, count: int, name: str, initializer: Callable[[], None] | None = None
    ) -> None:
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        # Each running thread's CPU clock, and the seconds of threads that have ended.
        self._cpu_lock = threading.Lock()
        self._cpu_clocks: set[int | None] = set()
        self._ended_cpu_seconds = 0.0
        self._shut_down = False
        self._threads = [
            threading.Thread(
                target=self._work, args=(initializer,), name=f"{name}_{i}", daemon=True
            )
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`function(*args)` in a worker thread; await the returned future for its result.
        After `shutdown` the future fails at once: no thread is left to answer it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._shut_down:
            future.set_exception(RuntimeError("worker threads shut down"))
        else:
            self._jobs.put((loop, future, function, args))
        return future

    def cpu_seconds(self) -> float:
        """CPU seconds of this pool's threads so far, ended ones included (for `ThreadCpu`).

        Under the lock, a clock in the set belongs to a thread that has not yet passed its
        own exit: the clock is still valid."""
        with self._cpu_lock:
            running = sum(clock_seconds(clock) for clock in self._cpu_clocks)
            return self._ended_cpu_seconds + running

    def shutdown(self) -> None:
        """Finish the calls already submitted, then stop the threads."""
        self._shut_down = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self, initializer: Callable[[], None] | None) -> None:
        clock = own_cpu_clock()
        with self._cpu_lock:
            self._cpu_clocks.add(clock)
        try:
            self._serve(initializer)
        finally:
            with self._cpu_lock:
                self._cpu_clocks.discard(clock)
                self._ended_cpu_seconds += time.thread_time() if clock is not None else 0.0

    def _serve(self, initializer: Callable[[], None] | None) -> None:
        if initializer is not None:
            initializer()
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            if future.cancelled():  # a racy read: at worst a call whose caller left runs
                continue
            value, error = None, None
            try:
                value = function(*args)
            except BaseException as exc:  # handed to the caller, as an executor does
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future, value, error)
            del job, future, value, error  # no reference outlives the call
