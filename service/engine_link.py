"""The engine served to HTTP front-end processes over a Unix socket, and their side of it.

In one process, HTTP, JSON and the engine's scheduling share one GIL; on a host-bound GPU
the event loop, not the device, then caps throughput. Split, the engine's loop spent about
half the time per single-item request and the host served 1.16x to 1.32x the items/s even
on two cores (benchmarks/HISTORY.md, session 34). Each front-end keeps one connection;
calls on it are multiplexed by id, so one request's answer never waits for an earlier
request's scoring (only for the bytes of answers sent before it).

Frames are a 4-byte length and a pickle. Only the processes of one `alarm-serve serve`
reach the socket (it lives in a directory only its user can enter), so pickle is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.combine import CombineMode
from service.engine import ScoredItem, ScoreInput, ScoringEngine
from service.errors import AlarmError, NotReady
from service.rate_limit import RequestRateLimiter

log = logging.getLogger(__name__)
_FRAME_HEADER = struct.Struct("!I")
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
ENGINE_GONE = "the engine process is gone"
INTERNAL_ERROR = "internal error"


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _FRAME_HEADER.unpack(await reader.readexactly(_FRAME_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, message: Any) -> None:
    data = pickle.dumps(message, protocol=_PICKLE_PROTOCOL)
    writer.write(_FRAME_HEADER.pack(len(data)) + data)


def _error_classes() -> dict[str, type[AlarmError]]:
    found: dict[str, type[AlarmError]] = {}
    pending: list[type[AlarmError]] = [AlarmError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_payload(exc: BaseException) -> tuple[str, str, float | None]:
    """An exception as plain data: the service's own errors keep their class (and so their
    HTTP status); anything else is an internal error, logged here with its traceback and
    sent without its text, as one process answers it (service.api.errors)."""
    if isinstance(exc, AlarmError):
        return type(exc).__name__, exc.message, exc.retry_after_s
    log.error("engine call failed", exc_info=exc)
    return AlarmError.__name__, INTERNAL_ERROR, None


def error_from_payload(payload: tuple[str, str, float | None]) -> AlarmError:
    name, message, retry_after_s = payload
    cls = _error_classes().get(name, AlarmError)
    error = cls(message)
    error.retry_after_s = retry_after_s
    return error


@dataclass(frozen=True)
class CatalogSnapshot:
    """The engine's `ModelCatalog` as a front-end sees it: fixed for the engine's life."""

    models: list[dict[str, Any]]
    definitions: dict[str, str]

    def reward_definition(self, mode: CombineMode) -> str:
        return self.definitions[mode.value]

    def describe_models(self) -> list[dict[str, Any]]:
        return self.models


class EngineLinkServer:
    """Serves one engine to any number of front-ends: scoring, the shared per-trainer rate
    limit (one budget however many front-ends a trainer's connections land on) and the
    engine's own metrics (`scrape`)."""

    def __init__(
        self,
        engine: ScoringEngine,
        rate_limiter: RequestRateLimiter | None,
        scrape: Callable[[], bytes],
    ) -> None:
        self._engine = engine
        self._rate_limiter = rate_limiter
        self._scrape = scrape
        self._front_ends: Counter[int] = Counter()  # connections by process
        self.on_front_end_left: Callable[[int], None] | None = None  # called with its pid
        catalog = engine.catalog
        self._hello = (
            "catalog",
            catalog.describe_models(),
            {mode.value: catalog.reward_definition(mode) for mode in CombineMode},
        )

    @property
    def front_end_pids(self) -> list[int]:
        """The processes connected now (their CPU is reported with the engine's)."""
        return list(self._front_ends)

    async def start(self, path: Path) -> asyncio.Server:
        return await asyncio.start_unix_server(self._serve_front_end, path=str(path))

    async def _serve_front_end(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        calls: dict[int, asyncio.Task[Any]] = {}
        pid: int | None = None
        try:
            _, pid = await read_frame(reader)
            self._front_ends[pid] += 1
            write_frame(writer, self._hello)
            while True:
                kind, call_id, *args = await read_frame(reader)
                if kind == "cancel":
                    task = calls.pop(call_id, None)
                    if task is not None:
                        task.cancel()
                    continue
                task = asyncio.create_task(self._handle(kind, args))
                calls[call_id] = task
                task.add_done_callback(functools.partial(self._reply, writer, calls, call_id))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front-end is gone: so is every call it made
        finally:
            for task in calls.values():
                task.cancel()
            if pid is not None:
                self._front_ends[pid] -= 1
                if not self._front_ends[pid]:
                    del self._front_ends[pid]
                    if self.on_front_end_left is not None:
                        self.on_front_end_left(pid)
            writer.close()

    async def _handle(self, kind: str, args: list[Any]) -> Any:
        if kind == "score":
            pairs, mode, trainer, deadline = args
            items = [ScoreInput(prompt, response) for prompt, response in pairs]
            return await self._engine.score(
                items, None if mode is None else CombineMode(mode), trainer, deadline
            )
        if kind == "rate":
            (trainer,) = args
            if self._rate_limiter is None:
                return 0.0
            return self._rate_limiter.try_acquire(trainer)
        if kind == "metrics":
            return self._scrape()
        raise AlarmError(f"unknown engine call {kind!r}")

    @staticmethod
    def _reply(
        writer: asyncio.StreamWriter,
        calls: dict[int, asyncio.Task[Any]],
        call_id: int,
        task: asyncio.Task[Any],
    ) -> None:
        given_up = calls.pop(call_id, None) is None  # a "cancel" took it out already
        if given_up or writer.is_closing():  # nobody waits for this answer
            return
        if task.cancelled():  # by the engine itself, as it stops: the caller still gets a 503
            reply = (call_id, False, error_payload(NotReady("the engine is stopping")))
        elif (error := task.exception()) is not None:
            reply = (call_id, False, error_payload(error))
        else:
            reply = (call_id, True, task.result())
        try:
            write_frame(writer, reply)
        except Exception as exc:  # an unpicklable result: the caller still gets an answer
            log.error("engine reply %d could not be sent", call_id, exc_info=exc)
            write_frame(writer, (call_id, False, (AlarmError.__name__, INTERNAL_ERROR, None)))


class RemoteEngine:
    """A front-end's engine: `score` and `catalog` as `RewardEngine` has them, answered by
    the engine process. A cancelled call is cancelled there too (its items are dropped
    before a forward); if the engine process goes, every open call fails with 503 and
    `on_lost` is called (the front-end then stops: nothing it serves can be scored)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        catalog: CatalogSnapshot,
        on_lost: Callable[[], None],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.catalog = catalog
        self._on_lost = on_lost
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._lost = False
        self._closing = False
        self._replies = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(cls, path: Path, on_lost: Callable[[], None]) -> RemoteEngine:
        reader, writer = await asyncio.open_unix_connection(str(path))
        write_frame(writer, ("hello", os.getpid()))
        _, models, definitions = await read_frame(reader)
        return cls(reader, writer, CatalogSnapshot(models, definitions), on_lost)

    async def score(
        self,
        items: Sequence[ScoreInput],
        mode: CombineMode | None = None,
        trainer: str = "anonymous",
        deadline: float | None = None,
    ) -> list[ScoredItem]:
        """As `RewardEngine.score`; `deadline` is on `time.monotonic()`, which every process
        of one machine shares."""
        pairs = [(item.prompt, item.response) for item in items]
        return await self._call(
            "score", pairs, None if mode is None else mode.value, trainer, deadline
        )

    async def rate_limit_wait(self, trainer: str) -> float:
        """Seconds until `trainer` may send again (0: this request is within its limit)."""
        return float(await self._call("rate", trainer))

    async def scrape(self) -> bytes:
        """The engine process's own metrics that live in no shared file (its threads' CPU)."""
        return bytes(await self._call("metrics"))

    async def close(self) -> None:
        self._closing = True
        self._replies.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _call(self, kind: str, *args: Any) -> Any:
        if self._lost:
            raise NotReady(ENGINE_GONE)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        write_frame(self._writer, (kind, call_id, *args))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and not self._lost:
                write_frame(self._writer, ("cancel", call_id))
            raise

    async def _read_replies(self) -> None:
        try:
            while True:
                call_id, ok, payload = await read_frame(self._reader)
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if ok:
                    future.set_result(payload)
                else:
                    future.set_exception(error_from_payload(payload))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._lost = True
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(NotReady(ENGINE_GONE))
            if not self._closing:
                self._on_lost()
