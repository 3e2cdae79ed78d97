"""create_app: the FastAPI application, its lifespan (model loading) and its state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.api import aspects, openrlhf, routes
from service.api.errors import install_error_handlers
from service.api.middleware import RequestContextMiddleware
from service.auth import Authenticator
from service.config import RewardConfig, ServiceSettings
from service.engine import RewardEngine
from service.engine_link import ENGINE_GONE, RemoteEngine
from service.gc_freeze import freeze_startup_objects, unfreeze_startup_objects
from service.metrics import ServiceMetrics
from service.models import RewardModel, load_models
from service.rate_limit import RequestRateLimiter, rate_limiter_for

log = logging.getLogger(__name__)
_CONNECT_RETRY_S = 0.05
API_VERSION = "0.1.0"
ModelLoader = Callable[[RewardConfig, Path], list[RewardModel]]
T = TypeVar("T")


@dataclass
class AppState:
    settings: ServiceSettings
    config: RewardConfig
    metrics: ServiceMetrics
    auth: Authenticator
    rate_limiter: RequestRateLimiter | None = None
    engine: RewardEngine | RemoteEngine | None = None
    load_error: str | None = None
    loader: asyncio.Task[None] | None = field(default=None, repr=False)
    load_thread: threading.Thread | None = field(default=None, repr=False)
    # A front-end of a split server (service.supervisor): the engine is in another process,
    # and the metrics of every process are in `metrics_dir`.
    engine_link: Path | None = None
    metrics_dir: Path | None = None
    engine_lost: bool = False

    @property
    def loading(self) -> bool:
        """Whether the thread that loads the models is still running (it cannot be stopped)."""
        return self.load_thread is not None and self.load_thread.is_alive()

    async def rate_limit_wait(self, limiter: RequestRateLimiter, trainer: str) -> float:
        """Seconds until `trainer` may send again; 0 takes one request from its budget. A
        front-end asks the engine process, which keeps one budget for all front-ends."""
        if self.engine_link is None:
            return limiter.try_acquire(trainer)
        if not isinstance(self.engine, RemoteEngine):
            return 0.0  # not connected yet: the request is refused as not ready anyway
        return await self.engine.rate_limit_wait(trainer)

    async def scrape(self) -> bytes:
        """The Prometheus exposition: this process's metrics, or on a front-end every
        process's (from the multiprocess files) and the engine's thread CPU clocks."""
        if self.metrics_dir is None:
            return generate_latest(self.metrics.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(self.metrics_dir))
        text = generate_latest(registry)
        if isinstance(self.engine, RemoteEngine):
            text += await self.engine.scrape()
        return text


async def _in_daemon_thread(state: AppState, call: Callable[[], T]) -> T:
    """call() in a daemon thread of its own. Not asyncio.to_thread: asyncio.run joins the
    default executor's threads on its way out, so a server whose start failed (its port
    taken) would exit only once the models had loaded, minutes later for large ones."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # the load was given up (shutdown)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = call()
        except Exception as exc:
            error = exc
        except BaseException as exc:  # e.g. sys.exit in a plugged-in module: a failed load
            error = RuntimeError(f"{type(exc).__name__} while loading: {exc}")
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    state.load_thread = threading.Thread(target=run, name="alarm-load-models", daemon=True)
    state.load_thread.start()
    return await done


async def _load(state: AppState, load: ModelLoader, on_fatal: Callable[[str], None] | None) -> None:
    try:
        models = await _in_daemon_thread(
            state, lambda: load(state.config, state.settings.cache_dir)
        )
        engine = RewardEngine(models, state.config, state.metrics)
        await engine.start()
        frozen = freeze_startup_objects()  # before /readyz: its one collection takes a while
        log.info("froze %d start-up objects out of the garbage collector's passes", frozen)
        state.engine = engine
        log.info("ready: %s", ", ".join(f"{m.name} on {m.device}" for m in models))
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model loading failed: %s", state.load_error)
        if on_fatal is not None:
            on_fatal(state.load_error)


async def _connect(state: AppState, link: Path, on_fatal: Callable[[str], None] | None) -> None:
    """Connect to the engine process once it listens (it does once its models are warm)."""

    def lost() -> None:
        state.engine = None
        state.engine_lost = True
        log.error("%s", ENGINE_GONE)
        if on_fatal is not None:
            on_fatal(ENGINE_GONE)

    while True:
        try:
            state.engine = await RemoteEngine.connect(link, lost)
        except (FileNotFoundError, ConnectionRefusedError):  # not listening yet
            await asyncio.sleep(_CONNECT_RETRY_S)
            continue
        except (OSError, EOFError) as exc:  # it left during the handshake
            state.load_error = f"cannot connect to the engine process: {exc!r}"
            log.error("%s", state.load_error)
            if on_fatal is not None:
                on_fatal(state.load_error)
            return
        log.info("ready: connected to the engine process at %s", link)
        return


def create_app(
    settings: ServiceSettings,
    config: RewardConfig,
    registry: CollectorRegistry | None = None,
    on_fatal: Callable[[str], None] | None = None,
    load_before_serving: bool = False,
    load: ModelLoader = load_models,
    engine_link: Path | None = None,
    metrics_dir: Path | None = None,
) -> FastAPI:
    """Build the app. Models load in the background: /healthz answers at once, /readyz
    once every model is loaded and warm. `on_fatal` is called if loading fails.

    With `load_before_serving` the lifespan start-up itself waits for the models and raises
    if they fail to load: for hosts such as Ray Serve, which send a replica traffic as soon
    as its start-up has finished and restart one whose start-up failed. `load` builds the
    models (the benchmarks swap in networks that cost nothing, to time the host alone).

    With `engine_link` the app is a front-end of a split server: it loads no models and
    scores through the engine process listening there; `metrics_dir` is the multiprocess
    metrics directory that every process of that server writes to."""
    auth = Authenticator.from_settings(settings)  # ConfigError here stops the start-up
    metrics = ServiceMetrics(registry or CollectorRegistry())
    metrics.register_trainers(auth.trainers)
    state = AppState(settings, config, metrics, auth, rate_limiter_for(config.limits))
    state.engine_link, state.metrics_dir = engine_link, metrics_dir

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine_link is not None:
            state.loader = asyncio.create_task(_connect(state, engine_link, on_fatal))
        else:
            state.loader = asyncio.create_task(_load(state, load, on_fatal))
        if load_before_serving:
            await state.loader
            if state.engine is None:
                raise RuntimeError(f"model loading failed: {state.load_error}")
        try:
            yield
        finally:
            state.loader.cancel()
            engine = state.engine
            if isinstance(engine, RemoteEngine):
                await engine.close()
            elif engine is not None:
                await engine.stop()
                unfreeze_startup_objects()

    app = FastAPI(
        title="alarm-serve",
        version=API_VERSION,
        description="Hierarchical (ALaRM) rewards for RLHF over HTTP.",
        lifespan=lifespan,
    )
    app.state.alarm = state
    routers = (routes.scoring_router, routes.router, openrlhf.router, aspects.router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=state.metrics,
        max_request_bytes=config.limits.max_request_bytes,
        route_paths=_route_paths(app.router, *routers),
    )
    return app


def _route_paths(*routers: APIRouter) -> frozenset[str]:
    """Every path the app serves (FastAPI includes routers lazily, so app.routes lacks them)."""
    paths = (getattr(route, "path", None) for router in routers for route in router.routes)
    return frozenset(path for path in paths if isinstance(path, str))
