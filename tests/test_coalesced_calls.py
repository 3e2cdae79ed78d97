"""Calls queued in one turn of the event loop run in one worker-thread call, each caller
getting its own result or exception."""

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from service.coalesced_calls import CoalescedCalls, Outcome
from service.worker_threads import WorkerThreads


class CountingPool(WorkerThreads):
    """Worker threads that count the calls handed to them, and the payloads in each."""

    def __init__(self) -> None:
        super().__init__(2, "test")
        self.calls = 0
        self.group_sizes: list[int] = []

    def run(self, function, *args):
        self.calls += 1
        self.group_sizes.append(len(args[0]))
        return super().run(function, *args)


def call_each(functions: list[Callable[[], Any]]) -> list[Outcome[Any]]:
    """Plain calls as the payloads: each function's outcome, one failing leaves the rest."""
    outcomes: list[Outcome[Any]] = []
    for function in functions:
        try:
            outcomes.append((True, function()))
        except Exception as exc:
            outcomes.append((False, exc))
    return outcomes


@pytest.fixture
def pool():
    workers = CountingPool()
    yield workers
    workers.shutdown()


async def test_calls_queued_together_run_in_one_thread_call_in_order(pool):
    calls = CoalescedCalls(pool, call_each)
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
    calls = CoalescedCalls(pool, call_each)

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

    calls = CoalescedCalls(BrokenPool(), call_each)
    outcomes = await asyncio.gather(
        calls.run(lambda: 1), calls.run(lambda: 2), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]


async def test_a_burst_goes_in_thread_calls_of_about_the_given_weight_in_order(pool):
    calls = CoalescedCalls(pool, call_each, weight=lambda _: 2, max_weight=4)
    results = await asyncio.gather(*(calls.run(lambda n=n: n) for n in range(5)))
    assert results == [0, 1, 2, 3, 4]
    assert pool.group_sizes == [2, 2, 1]  # [0, 1], [2, 3], [4]


async def test_payloads_with_one_key_in_a_row_stay_in_one_group_however_heavy(pool):
    calls = CoalescedCalls(pool, call_each, weight=lambda _: 2, max_weight=4)
    keys = ["a", "a", "a", "b", "b", "c"]
    results = await asyncio.gather(
        *(calls.run(lambda n=n: n, key=key) for n, key in enumerate(keys))
    )
    assert results == [0, 1, 2, 3, 4, 5]
    assert pool.group_sizes == [3, 2, 1]  # a's three (6 >= 4), b's two, then c


async def test_calls_in_later_turns_go_in_calls_of_their_own(pool):
    calls = CoalescedCalls(pool, call_each)
    assert await calls.run(lambda: 1) == 1
    assert await calls.run(lambda: 2) == 2
    assert pool.calls == 2


async def test_a_caller_that_left_before_the_call_is_skipped_and_one_that_left_during_it_is_ignored(
    pool,
):
    calls = CoalescedCalls(pool, call_each)
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


def engine_handing_out(tiny_paths, tmp_path):
    """(engine, its models, handed): an engine on the tiny config without an output cache
    (requests scored together are those scored alone before), whose tokenizer pool records
    each call it is handed as (function name, the names of the models in it)."""
    from prometheus_client import CollectorRegistry

    from service.config import RewardConfig
    from service.engine import RewardEngine
    from service.metrics import ServiceMetrics
    from service.models import load_models
    from tests.conftest import tiny_config_dict

    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, cache={"max_items": 0}))
    models = load_models(config, tmp_path)
    engine = RewardEngine(models, config, ServiceMetrics(CollectorRegistry()))
    handed: list[tuple[str, list[str]]] = []
    pool_run = engine._tokenize_pool.run

    def recording(function, *args):
        if function.__name__ == "_prepare_together":
            handed.append((function.__name__, sorted(model.name for model, _ in args[0])))
        else:  # a host model's own call
            handed.append((function.__name__, [args[0].name]))
        return pool_run(function, *args)

    engine._tokenize_pool.run = recording
    return engine, models, handed


async def test_requests_arriving_together_prepare_every_device_models_items_in_one_thread_call(
    tiny_paths, tmp_path
):
    """Two requests sent in one turn of the event loop; three device models (holistic,
    factuality, completeness) and a host rule: every device model's inputs of both requests
    are tokenised in one thread call, so that their forwards start together; the host rule,
    which computes while it prepares, keeps a call of its own per request. Each request
    scores as it does alone."""
    from service.engine import ScoreInput

    engine, _, handed = engine_handing_out(tiny_paths, tmp_path)
    await engine.start()
    first = [ScoreInput("Who wrote Hamlet?", r) for r in ("Shakespeare.", "Marlowe did.")]
    second = [ScoreInput("Where is Paris?", "In France.")]
    try:
        alone = [await engine.score(first), await engine.score(second)]
        handed.clear()
        together = await asyncio.gather(engine.score(first), engine.score(second))
    finally:
        await engine.stop()
    device_models = ["completeness", "factuality", "holistic"]
    assert sorted(handed) == [
        ("_prepare_together", sorted(device_models * 2)),
        ("_score_on_host", ["length"]),
        ("_score_on_host", ["length"]),
    ]
    for got, expected in zip(together, alone, strict=True):
        assert [s.combined.reward for s in got] == pytest.approx(
            [s.combined.reward for s in expected], abs=1e-5
        )


class PoisonedEncoder:
    """A real tokenizer's encoder that raises on any batch holding a text with "POISON"."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder

    def __call__(self, texts, add_special_tokens, offsets):
        if any("POISON" in text for text in texts):
            raise ValueError("the tokenizer rejects this text")
        return self._encoder(texts, add_special_tokens, offsets)


async def test_a_text_that_fails_to_tokenise_fails_only_its_own_request_among_those_grouped(
    tiny_paths, tmp_path
):
    """Two requests tokenised together; one model's tokenizer rejects a text of the first.
    The first fails; the second scores as it does alone, and no item is left queued."""
    from service.engine import ScoreInput
    from service.errors import ModelFailure

    engine, models, handed = engine_handing_out(tiny_paths, tmp_path)
    await engine.start()
    poisoned = [ScoreInput("Who wrote it?", "A POISON answer."), ScoreInput("Who?", "Fine.")]
    clean = [ScoreInput("Where is Paris?", "In France."), ScoreInput("Who?", "Fine.")]
    try:
        alone = await engine.score(clean)
        (completeness,) = [m for m in models if m.name == "completeness"]
        shared = completeness._shared_tokenizer
        shared.encoder = PoisonedEncoder(shared.encoder)
        handed.clear()
        outcomes = await asyncio.gather(
            engine.score(poisoned), engine.score(clean), return_exceptions=True
        )
        depths = [batcher.depth for batcher in engine._batchers.values()]
    finally:
        await engine.stop()
    device_models = ["completeness", "factuality", "holistic"]
    together = [names for function, names in handed if function == "_prepare_together"]
    assert together == [sorted(device_models * 2)]  # both requests' models in one call
    assert isinstance(outcomes[0], ModelFailure)
    assert not isinstance(outcomes[1], BaseException)
    assert [s.combined.reward for s in outcomes[1]] == pytest.approx(
        [s.combined.reward for s in alone], abs=1e-5
    )
    assert depths == [0] * len(depths)
