"""The engine process of a split server: loads the models, runs the engine, and serves it
to the HTTP front-ends over the engine link (`service.engine_link`); it serves no HTTP.

Its metrics live in the shared multiprocess directory like every process's, except the CPU
clocks of its threads, which only it can read: a front-end's scrape asks for those.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from service.auth import Authenticator
from service.config import RewardConfig, ServiceSettings
from service.engine import RewardEngine
from service.engine_link import EngineLinkServer
from service.gc_freeze import freeze_startup_objects
from service.metrics import ServiceMetrics
from service.models import RewardModel
from service.rate_limit import rate_limiter_for
from service.supervisor import FRONT_ENDS_GROUP, STOP_GRACE_S, SUPERVISOR_ENV
from service.thread_cpu import ThreadCpu

log = logging.getLogger(__name__)


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


_CLOCK_TICKS = _clock_ticks()


def process_cpu_seconds(pid: int) -> float:
    """A live process's user + system CPU seconds (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class FrontEndsCpu:
    """The front-end processes' CPU seconds, for the `front_ends` thread group: those
    connected now, read live, plus what each had used when it left (a counter never falls)."""

    def __init__(self, link: EngineLinkServer) -> None:
        self._link = link
        self._banked = 0.0
        link.on_front_end_left = self._bank

    def _bank(self, pid: int) -> None:
        self._banked += process_cpu_seconds(pid)

    def __call__(self) -> float:
        return self._banked + sum(process_cpu_seconds(pid) for pid in self._link.front_end_pids)


def thread_cpu_scrape(thread_cpu: ThreadCpu) -> Callable[[], bytes]:
    registry = CollectorRegistry()
    registry.register(thread_cpu)
    return lambda: generate_latest(registry)


async def serve_engine(
    models: list[RewardModel],
    config: RewardConfig,
    settings: ServiceSettings,
    link: Path,
    stop: asyncio.Event,
) -> None:
    """Serve the engine on `link` until `stop` is set and every front-end has gone (or
    `STOP_GRACE_S` has passed), so that requests in flight get their answers."""
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.register_trainers(Authenticator.from_settings(settings).trainers)
    engine = RewardEngine(models, config, metrics)
    await engine.start()
    server = EngineLinkServer(
        engine, rate_limiter_for(config.limits), thread_cpu_scrape(metrics.thread_cpu)
    )
    metrics.thread_cpu.watch(FRONT_ENDS_GROUP, FrontEndsCpu(server))
    frozen = freeze_startup_objects()
    log.info("froze %d start-up objects out of the garbage collector's passes", frozen)
    listener = await server.start(link)
    log.info("ready: %s", ", ".join(f"{m.name} on {m.device}" for m in models))
    try:
        await stop.wait()
        listener.close()
        # Front-ends drain their requests before they exit, and those still need the engine.
        deadline = time.monotonic() + STOP_GRACE_S
        while server.front_end_pids and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        listener.close()
        await engine.stop()


def run_engine_process(
    settings: ServiceSettings,
    config: RewardConfig,
    link: Path,
    load: Callable[[RewardConfig, Path], list[RewardModel]],
) -> int:
    """Load the models in this (main) thread, then serve until SIGTERM or SIGINT."""
    try:
        models = load(config, settings.cache_dir)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the group
        return 130
    except Exception as exc:
        log.error("model loading failed: %s: %s", type(exc).__name__, exc)
        return 1

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_engine(models, config, settings, link, stop)

    try:
        asyncio.run(main())
    finally:
        if os.getppid() != int(os.environ.get(SUPERVISOR_ENV, "0")):
            # The supervisor died without its clean-up: the last child out removes the
            # directory it made (the front-ends have left by now, see serve_engine).
            shutil.rmtree(link.parent, ignore_errors=True)
    return 0
