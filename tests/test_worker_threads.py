"""`WorkerThreads`: calls in worker threads, answered on the caller's event loop."""

import asyncio
import threading

import pytest

from service.worker_threads import WorkerThreads


async def test_calls_run_in_the_named_threads_and_return_or_raise_to_the_caller():
    initialised: list[str] = []
    workers = WorkerThreads(
        2, "pool", initializer=lambda: initialised.append(threading.current_thread().name)
    )
    try:
        names = await asyncio.gather(
            *(workers.run(lambda: threading.current_thread().name) for _ in range(20))
        )
        assert set(names) <= {"pool_0", "pool_1"}
        assert await workers.run(sum, [1, 2, 3]) == 6

        def fail() -> None:
            raise KeyError("from the worker")

        with pytest.raises(KeyError, match="from the worker"):
            await workers.run(fail)
    finally:
        workers.shutdown()
    assert sorted(initialised) == ["pool_0", "pool_1"]
    assert not any(t.name.startswith("pool_") for t in threading.enumerate())


async def test_a_call_whose_caller_left_before_it_started_is_skipped():
    workers = WorkerThreads(1, "pool")
    release = threading.Event()
    ran: list[int] = []
    try:
        blocker = workers.run(release.wait)
        skipped = workers.run(ran.append, 1)
        skipped.cancel()  # the caller leaves while the only thread is busy
        kept = workers.run(ran.append, 2)
        release.set()
        await blocker
        await kept
    finally:
        workers.shutdown()
    assert ran == [2]


async def test_shutdown_finishes_what_was_submitted():
    workers = WorkerThreads(1, "pool")
    done: list[int] = []
    futures = [workers.run(done.append, n) for n in range(50)]
    await asyncio.to_thread(workers.shutdown)
    await asyncio.gather(*futures)
    assert done == list(range(50))


async def test_a_call_after_shutdown_fails_at_once_instead_of_waiting_forever():
    workers = WorkerThreads(1, "pool")
    workers.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        await asyncio.wait_for(workers.run(lambda: 1), timeout=5)
