"""Calls queued in one turn of the event loop run in one worker-thread call, each caller
getting its own result or exception."""

import asyncio
import threading

import pytest

from service.coalesced_calls import CoalescedCalls
from service.worker_threads import WorkerThreads


class CountingPool(WorkerThreads):
    """Worker threads that count the calls handed to them."""

    def __init__(self) -> None:
        super().__init__(2, "test")
        self.calls = 0

    def run(self, function, *args):
        self.calls += 1
        return super().run(function, *args)


@pytest.fixture
def pool():
    workers = CountingPool()
    yield workers
    workers.shutdown()


async def test_calls_queued_together_run_in_one_thread_call_in_order(pool):
    calls = CoalescedCalls(pool)
    ran: list[tuple[str, int]] = []

    def record(name: str) -> str:
        ran.append((name, threading.get_ident()))
        return name.upper()

    results = await asyncio.gather(*(calls.run(lambda n=n: record(n)) for n in "abc"))
    assert results == ["A", "B", "C"]
    assert pool.calls == 1
    assert [name for name, _ in ran] == ["a", "b", "c"]
    assert len({thread for _, thread in ran}) == 1
    assert threading.get_ident() not in {thread for _, thread in ran}


async def test_one_failing_call_fails_its_own_caller_only(pool):
    calls = CoalescedCalls(pool)

    def fails() -> None:
        raise ValueError("bad input")

    outcomes = await asyncio.gather(
        calls.run(lambda: 1), calls.run(fails), calls.run(lambda: 3), return_exceptions=True
    )
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], ValueError)


async def test_a_failing_thread_call_fails_every_caller_in_it():
    class BrokenPool:
        def run(self, function, *args):
            future = asyncio.get_running_loop().create_future()
            future.set_exception(RuntimeError("worker threads shut down"))
            return future

    calls = CoalescedCalls(BrokenPool())
    outcomes = await asyncio.gather(
        calls.run(lambda: 1), calls.run(lambda: 2), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]


async def test_calls_in_later_turns_go_in_calls_of_their_own(pool):
    calls = CoalescedCalls(pool)
    assert await calls.run(lambda: 1) == 1
    assert await calls.run(lambda: 2) == 2
    assert pool.calls == 2


async def test_a_caller_that_left_before_the_call_is_skipped_and_one_that_left_during_it_is_ignored(
    pool,
):
    calls = CoalescedCalls(pool)
    ran: list[str] = []
    release = threading.Event()

    def slow() -> str:
        release.wait(5)
        ran.append("slow")
        return "slow"

    left_early = calls.run(lambda: ran.append("left early"))
    left_early.cancel()
    leaves_during = calls.run(slow)
    stays = calls.run(lambda: "stays")
    await asyncio.sleep(0.05)  # the call is running
    leaves_during.cancel()
    release.set()
    assert await stays == "stays"
    assert ran == ["slow"]
    assert leaves_during.cancelled()


async def test_a_request_prepares_every_device_models_items_in_one_tokenizer_call(
    tiny_config, tmp_path
):
    """Three device models (holistic, factuality, completeness) and a host rule: their
    inputs are tokenised in one thread call, so that their forwards start together; the
    host rule, which computes while it prepares, keeps a call of its own."""
    from prometheus_client import CollectorRegistry

    from service.engine import RewardEngine, ScoreInput
    from service.metrics import ServiceMetrics
    from service.models import load_models

    engine = RewardEngine(
        load_models(tiny_config, tmp_path), tiny_config, ServiceMetrics(CollectorRegistry())
    )
    prepared_in: dict[str, int] = {}
    prepare_all = engine._prepare_all

    def recording(model, items, memo):
        prepared_in[model.name] = threading.get_ident()
        return prepare_all(model, items, memo)

    engine._prepare_all = recording
    handed: list[str] = []
    pool_run = engine._tokenize_pool.run

    def counting(function, *args):
        handed.append(getattr(function, "__name__", repr(function)))
        return pool_run(function, *args)

    engine._tokenize_pool.run = counting
    await engine.start()
    try:
        items = [ScoreInput("Who wrote Hamlet?", r) for r in ("Shakespeare.", "Marlowe did.")]
        handed.clear()
        scored = await engine.score(items)
    finally:
        await engine.stop()
    assert len(scored) == 2
    assert sorted(handed) == ["_call_each", "_score_on_host"]
    assert set(prepared_in) == {"holistic", "factuality", "completeness", "length"}
    device_threads = {prepared_in[name] for name in ("holistic", "factuality", "completeness")}
    assert len(device_threads) == 1
