"""The engine link: a front-end's `RemoteEngine` must behave as the engine in its own
process would (same results, same errors, cancellation that reaches the engine), and must
fail fast and loudly once the engine process is gone.

A fake engine with real combination math stands in for `RewardEngine`; the server and the
client talk over a real Unix socket in one event loop.
"""

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.combine import (
    AspectParams,
    CombineMode,
    HolisticParams,
    SegmentScore,
    combine_response,
)
from service.engine import ScoredItem, ScoreInput
from service.engine_link import ENGINE_GONE, EngineLinkServer, RemoteEngine
from service.errors import (
    AlarmError,
    DeadlineExceeded,
    InvalidRequest,
    ModelFailure,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
)
from service.rate_limit import RequestRateLimiter

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
HOLISTIC = HolisticParams(mu=1.0, sigma=2.0, threshold=0.5)
ASPECTS = (AspectParams("factuality", weight=0.5),)
MODELS: list[dict[str, Any]] = [
    {"name": "holistic", "kind": "sequence_scalar", "device": "cpu", "max_length": 256},
    {"name": "factuality", "kind": "segment_classifier", "device": "cpu", "labels": [0, 1]},
]
TEST_TIMEOUT_S = 10.0  # a broken link hangs; this turns a hang into a failure


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), TEST_TIMEOUT_S))


def scored(item: ScoreInput, mode: CombineMode | None) -> ScoredItem:
    """The fake engine's answer for `item`: real combination math on inputs derived from the
    texts, so that every item, and every mode, has its own result."""
    segments = {"factuality": [SegmentScore(0, len(item.response), len(item.prompt) / 100)]}
    combined = combine_response(
        item.response,
        len(item.response) / 8,
        segments,
        HOLISTIC,
        ASPECTS,
        mode or CombineMode.hierarchical,
    )
    return ScoredItem(combined, truncated=len(item.response) > 20)


def inputs(*responses: str) -> list[ScoreInput]:
    return [ScoreInput(PROMPT, response) for response in responses]


class FakeCatalog:
    def describe_models(self) -> list[dict[str, Any]]:
        return MODELS

    def reward_definition(self, mode: CombineMode) -> str:
        return f"sha256:{mode.value}"


@dataclass(frozen=True)
class ScoreCall:
    items: tuple[ScoreInput, ...]
    mode: CombineMode | None
    trainer: str
    deadline: float | None


class FakeEngine:
    """Records every call and answers `scored` per item. A call is known by its first
    response: one that is held waits until the test releases it, one with a delay sleeps
    first, one with an error raises it."""

    def __init__(self) -> None:
        self.catalog = FakeCatalog()
        self.calls: list[ScoreCall] = []
        self.held: dict[str, asyncio.Event] = {}
        self.entered: set[str] = set()  # held calls that have reached the engine
        self.cancelled: list[str] = []
        self.delays_s: dict[str, float] = {}
        self.errors: dict[str, BaseException] = {}

    def hold(self, response: str) -> asyncio.Event:
        self.held[response] = asyncio.Event()
        return self.held[response]

    async def score(
        self,
        items: Sequence[ScoreInput],
        mode: CombineMode | None = None,
        trainer: str = "anonymous",
        deadline: float | None = None,
    ) -> list[ScoredItem]:
        self.calls.append(ScoreCall(tuple(items), mode, trainer, deadline))
        first = items[0].response if items else ""
        try:
            if first in self.held:
                self.entered.add(first)
                await self.held[first].wait()
            await asyncio.sleep(self.delays_s.get(first, 0.0))
        except asyncio.CancelledError:
            self.cancelled.append(first)
            raise
        if first in self.errors:
            raise self.errors[first]
        return [scored(item, mode) for item in items]


class LostCount:
    """An `on_lost` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class Relay:
    """A Unix-socket relay between front-ends and the engine link, which a test cuts as the
    engine process's death cuts the real link (both sides see the connection close)."""

    def __init__(self, target: Path) -> None:
        self._target = target
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._relay, path=str(path))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self._target))
        self._writers += [writer, up_writer]
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
        )

    def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def eventually(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def serving(
    path: Path,
    engine: FakeEngine,
    rate_limiter: RequestRateLimiter | None = None,
    scrape: Callable[[], bytes] = lambda: b"",
) -> AsyncIterator[EngineLinkServer]:
    link = EngineLinkServer(engine, rate_limiter, scrape)  # type: ignore[arg-type]
    listener = await link.start(path)
    try:
        yield link
    finally:
        listener.close()


@asynccontextmanager
async def linked(
    tmp_path: Path,
    engine: FakeEngine,
    rate_limiter: RequestRateLimiter | None = None,
    scrape: Callable[[], bytes] = lambda: b"",
) -> AsyncIterator[tuple[EngineLinkServer, RemoteEngine, LostCount]]:
    """A served engine and one front-end connected to it."""
    path = tmp_path / "engine.sock"
    async with serving(path, engine, rate_limiter, scrape) as link:
        lost = LostCount()
        remote = await RemoteEngine.connect(path, lost)
        try:
            yield link, remote, lost
        finally:
            await remote.close()


# --- catalog and scoring ------------------------------------------------------------------


def test_the_catalog_arrives_on_connect(tmp_path):
    async def main() -> None:
        async with linked(tmp_path, FakeEngine()) as (_, remote, _):
            assert remote.catalog.describe_models() == MODELS
            for mode in CombineMode:
                assert remote.catalog.reward_definition(mode) == f"sha256:{mode.value}"

    run(main)


@pytest.mark.parametrize("mode", [None, *CombineMode])
def test_score_returns_the_engines_results_in_order_with_its_arguments_passed_through(
    tmp_path, mode
):
    responses = ("Shakespeare wrote it.", "Marlowe, in 1850.", "", "It is a play by Shakespeare.")
    deadline = time.monotonic() + 12.345678

    async def main() -> None:
        engine = FakeEngine()
        async with linked(tmp_path, engine) as (_, remote, _):
            results = await remote.score(inputs(*responses), mode, "trainer-7", deadline)
        assert results == [scored(item, mode) for item in inputs(*responses)]
        assert engine.calls == [ScoreCall(tuple(inputs(*responses)), mode, "trainer-7", deadline)]
        (call,) = engine.calls
        assert all(type(item) is ScoreInput for item in call.items)
        assert mode is None or type(call.mode) is CombineMode

    run(main)


def test_score_defaults_reach_the_engine_as_the_engines_own_defaults(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        async with linked(tmp_path, engine) as (_, remote, _):
            assert await remote.score(inputs("Shakespeare.")) == [
                scored(ScoreInput(PROMPT, "Shakespeare."), None)
            ]
        assert engine.calls == [ScoreCall(tuple(inputs("Shakespeare.")), None, "anonymous", None)]

    run(main)


def test_concurrent_calls_on_one_connection_are_answered_as_each_finishes(tmp_path):
    count = 8
    responses = [f"answer number {i}" for i in range(count)]

    async def main() -> None:
        engine = FakeEngine()
        releases = [engine.hold(response) for response in responses]
        async with linked(tmp_path, engine) as (_, remote, _):
            calls = [
                asyncio.create_task(remote.score(inputs(response, f"{response} (again)")))
                for response in responses
            ]
            # Every call reaches the engine while none has been answered: none waits on another.
            await eventually(lambda: len(engine.entered) == count)
            for index in reversed(range(count)):
                releases[index].set()
                result = await calls[index]
                assert result == [
                    scored(item, None)
                    for item in inputs(responses[index], f"{responses[index]} (again)")
                ]
                assert not any(call.done() for call in calls[:index])

    run(main)


def test_many_concurrent_calls_each_get_their_own_results(tmp_path):
    count = 40

    async def main() -> None:
        engine = FakeEngine()
        requests = []
        for index in range(count):
            responses = [f"call {index} item {k}" for k in range(index % 5 + 1)]
            engine.delays_s[responses[0]] = (count - index) % 7 * 0.003
            requests.append(inputs(*responses))
        async with linked(tmp_path, engine) as (_, remote, _):
            results = await asyncio.gather(*(remote.score(items) for items in requests))
        for items, result in zip(requests, results, strict=True):
            assert result == [scored(item, None) for item in items]

    run(main)


def test_an_unpicklable_result_fails_its_call_and_the_connection_keeps_working(tmp_path):
    class Unsendable(FakeEngine):
        async def score(self, items, mode=None, trainer="anonymous", deadline=None):
            if items[0].response == "unsendable":
                return [lambda: None]
            return await super().score(items, mode, trainer, deadline)

    async def main() -> None:
        async with linked(tmp_path, Unsendable()) as (_, remote, _):
            with pytest.raises(AlarmError) as caught:
                await remote.score(inputs("unsendable"))
            assert caught.value.http_status == 500
            assert await remote.score(inputs("fine")) == [scored(inputs("fine")[0], None)]

    run(main)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "error_type", "retry_after_s"),
    [
        (Overloaded("the queue is full", retry_after_s=7.5), 503, "overloaded", 7.5),
        (Overloaded("the queue is full"), 503, "overloaded", 1.0),
        (DeadlineExceeded("the deadline passed"), 504, "deadline_exceeded", None),
        (TooManyRequests("trainer-7 is over its limit", 0.25), 429, "too_many_requests", 0.25),
        (NotReady("the service is not accepting work"), 503, "not_ready", 2.0),
        (ModelFailure("model 'holistic' failed on this batch"), 500, "model_failure", None),
        (
            PayloadTooLarge("65 items exceed max_items_per_request=64"),
            413,
            "payload_too_large",
            None,
        ),
        (InvalidRequest("unknown mode"), 422, "invalid_request", None),
        (AlarmError("something the service reports"), 500, "internal_error", None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, AlarmError) else None,
)
def test_engine_errors_keep_their_class_status_message_and_retry_after(
    tmp_path, error, status, error_type, retry_after_s
):
    async def main() -> None:
        engine = FakeEngine()
        engine.errors["failing"] = error
        async with linked(tmp_path, engine) as (_, remote, _):
            with pytest.raises(AlarmError) as caught:
                await remote.score(inputs("failing"))
            # The connection outlives a failed call.
            assert await remote.score(inputs("fine")) == [scored(inputs("fine")[0], None)]
        received = caught.value
        assert type(received) is type(error)
        assert received.http_status == status
        assert received.error_type == error_type
        assert received.message == error.message
        assert str(received) == str(error)
        assert received.retry_after_s == retry_after_s

    run(main)


def test_an_unexpected_engine_exception_is_logged_there_and_arrives_as_an_internal_error(
    tmp_path, caplog
):
    """As in one process: a 500 `internal error` whose text tells the client nothing of the
    server, and the traceback in the engine's log."""

    async def main() -> None:
        engine = FakeEngine()
        engine.errors["failing"] = RuntimeError("CUDA error: an illegal memory access")
        async with linked(tmp_path, engine) as (_, remote, _):
            with pytest.raises(AlarmError) as caught:
                await remote.score(inputs("failing"))
        received = caught.value
        assert type(received) is AlarmError
        assert received.error_type == "internal_error"
        assert received.http_status == 500
        assert received.message == "internal error"
        assert received.retry_after_s is None

    with caplog.at_level("ERROR", logger="service.engine_link"):
        run(main)
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "CUDA error: an illegal memory access" in str(record.exc_info[1])


# --- cancellation ---------------------------------------------------------------------------


def test_cancelling_a_call_cancels_it_in_the_engine_and_the_link_keeps_working(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        engine.hold("held")
        async with linked(tmp_path, engine) as (_, remote, _):
            call = asyncio.create_task(remote.score(inputs("held")))
            await eventually(lambda: "held" in engine.entered)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await eventually(lambda: engine.cancelled == ["held"])
            assert await remote.score(inputs("after")) == [scored(inputs("after")[0], None)]
            assert await remote.rate_limit_wait("trainer-7") == 0.0

    run(main)


def test_a_call_that_times_out_is_cancelled_in_the_engine(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        engine.hold("held")
        async with linked(tmp_path, engine) as (_, remote, _):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(remote.score(inputs("held")), 0.05)
            await eventually(lambda: engine.cancelled == ["held"])
            assert await remote.score(inputs("after")) == [scored(inputs("after")[0], None)]

    run(main)


def test_a_call_cancelled_inside_the_engine_still_gets_an_answer(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        # As when a pool's future is cancelled under a caller (CoalescedCalls cancels every
        # waiter's future as the engine stops): a CancelledError nobody asked for.
        engine.errors["cancelled inside"] = asyncio.CancelledError()
        async with linked(tmp_path, engine) as (_, remote, _):
            with pytest.raises(NotReady) as caught:  # 503 + Retry-After, as a stopped batcher
                await asyncio.wait_for(remote.score(inputs("cancelled inside")), 1.0)
            assert caught.value.http_status == 503 and caught.value.retry_after_s
            assert await remote.score(inputs("after")) == [scored(inputs("after")[0], None)]

    run(main)


# --- rate limit and metrics -----------------------------------------------------------------


def test_the_rate_limit_is_one_budget_across_front_ends(tmp_path):
    burst = 3
    limiter = RequestRateLimiter(rate=2.0, burst=burst, clock=lambda: 100.0)  # no refill
    path = tmp_path / "engine.sock"

    async def main() -> None:
        async with serving(path, FakeEngine(), limiter):
            first = await RemoteEngine.connect(path, LostCount())
            second = await RemoteEngine.connect(path, LostCount())
            try:
                waits = [
                    await (first if i % 2 == 0 else second).rate_limit_wait("trainer-7")
                    for i in range(burst + 2)
                ]
                other_trainer = await second.rate_limit_wait("trainer-8")
            finally:
                await first.close()
                await second.close()
        assert waits == [0.0] * burst + [0.5, 0.5]  # one token at 2/s, none refilled
        assert other_trainer == 0.0

    run(main)


def test_without_a_rate_limiter_every_request_may_go(tmp_path):
    async def main() -> None:
        async with linked(tmp_path, FakeEngine(), rate_limiter=None) as (_, remote, _):
            waits = [await remote.rate_limit_wait("trainer-7") for _ in range(20)]
        assert waits == [0.0] * 20

    run(main)


def test_scrape_returns_what_the_engines_scrape_returns_each_time(tmp_path):
    scrapes = iter([b"alarm_thread_cpu_seconds_total 1.5\n", b"\x00\xffbinary-safe"])

    async def main() -> None:
        async with linked(tmp_path, FakeEngine(), scrape=lambda: next(scrapes)) as (_, remote, _):
            first = await remote.scrape()
            second = await remote.scrape()
        assert (first, second) == (b"alarm_thread_cpu_seconds_total 1.5\n", b"\x00\xffbinary-safe")
        assert type(first) is bytes

    run(main)


# --- losing the engine, closing the front-end ------------------------------------------------


def test_when_the_engine_goes_calls_fail_with_not_ready_and_on_lost_is_called_once(tmp_path):
    engine_path, relay_path = tmp_path / "engine.sock", tmp_path / "relay.sock"

    async def main() -> None:
        engine = FakeEngine()
        engine.hold("held")
        engine.hold("held too")
        async with serving(engine_path, engine):
            relay = Relay(engine_path)
            await relay.start(relay_path)
            lost = LostCount()
            remote = await RemoteEngine.connect(relay_path, lost)
            try:
                pending = [
                    asyncio.create_task(remote.score(inputs("held"))),
                    asyncio.create_task(remote.score(inputs("held too"))),
                ]
                await eventually(lambda: len(engine.entered) == 2)
                relay.cut()
                outcomes = await asyncio.gather(*pending, return_exceptions=True)
                for outcome in outcomes:
                    assert type(outcome) is NotReady
                    assert outcome.http_status == 503
                    assert outcome.message == ENGINE_GONE
                assert lost.calls == 1
                # Later calls fail at once, without waiting for an answer that cannot come.
                for later in (
                    remote.score(inputs("after")),
                    remote.rate_limit_wait("trainer-7"),
                    remote.scrape(),
                ):
                    with pytest.raises(NotReady):
                        await asyncio.wait_for(later, 0.5)
                await asyncio.sleep(0.05)
                assert lost.calls == 1
                # The engine side saw its front-end go and dropped the work it had asked for.
                await eventually(lambda: sorted(engine.cancelled) == ["held", "held too"])
            finally:
                await remote.close()
            assert lost.calls == 1

    run(main)


def test_an_idle_front_end_learns_at_once_that_the_engine_has_gone(tmp_path):
    engine_path, relay_path = tmp_path / "engine.sock", tmp_path / "relay.sock"

    async def main() -> None:
        async with serving(engine_path, FakeEngine()):
            relay = Relay(engine_path)
            await relay.start(relay_path)
            lost = LostCount()
            remote = await RemoteEngine.connect(relay_path, lost)
            try:
                relay.cut()
                await eventually(lambda: lost.calls == 1)
                with pytest.raises(NotReady):
                    await asyncio.wait_for(remote.score(inputs("after")), 0.5)
            finally:
                await remote.close()
            assert lost.calls == 1

    run(main)


def test_closing_the_front_end_fails_its_calls_and_does_not_call_on_lost(tmp_path):
    async def main() -> None:
        engine = FakeEngine()
        engine.hold("held")
        async with linked(tmp_path, engine) as (_, remote, lost):
            pending = asyncio.create_task(remote.score(inputs("held")))
            await eventually(lambda: "held" in engine.entered)
            await remote.close()
            with pytest.raises(NotReady):
                await pending
            with pytest.raises(NotReady):
                await asyncio.wait_for(remote.score(inputs("after")), 0.5)
            await eventually(lambda: engine.cancelled == ["held"])  # dropped in the engine
            await asyncio.sleep(0.05)
            assert lost.calls == 0

    run(main)


def test_front_end_pids_hold_a_connected_front_end_until_it_closes(tmp_path):
    path = tmp_path / "engine.sock"

    async def main() -> None:
        async with serving(path, FakeEngine()) as link:
            assert link.front_end_pids == []
            remote = await RemoteEngine.connect(path, LostCount())
            assert link.front_end_pids == [os.getpid()]
            second = await RemoteEngine.connect(path, LostCount())  # the same process again
            assert link.front_end_pids == [os.getpid()]
            await second.close()
            await asyncio.sleep(0.1)  # the server has seen one connection go by now
            assert link.front_end_pids == [os.getpid()]
            await remote.close()
            await eventually(lambda: link.front_end_pids == [])

    run(main)
