"""Scale-out on Ray Serve: the same FastAPI app and engine, one replica per GPU.

Every replica is a Ray actor that builds the app with `create_app` and owns one engine. Ray
Serve runs an ingress app's lifespan while it starts a replica, and the app is built with
`load_before_serving`, so that start-up ends only once the replica's models are loaded and
have scored their warm-up item: the proxy sends a replica no request before that, so
/readyz through the proxy is 200 only from a replica whose models are loaded. A replica
whose models fail to load fails to start; Ray retries it, then marks the deployment failed.
When Ray stops a replica (scale-down, `serve.delete`, `serve.shutdown`), it runs the
lifespan's end, which stops the engine.

Metrics: every replica keeps its own `alarm_*` registry. Replicas listen on no port of
their own, so GET /metrics through the proxy answers from whichever replica the request
reached: one replica's view per scrape, never the sum. Fleet-wide numbers come from Ray's
own metrics (`ray_serve_*` request counts, latencies, ongoing requests and replica counts
per deployment), which each Ray node exports to Prometheus on its metrics export port.
Responses carry the replica's id in the `X-Alarm-Replica` header.

Memory: a replica runs in a Ray worker process, whose threads have allocated long before
the engine starts, too late for `service.memory.share_one_heap`; the replicas' runtime
environment sets MALLOC_ARENA_MAX=1 instead, read by glibc as the process starts, and the
engine's `keep_freed_memory` does the rest.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.allocator import confirm_preloaded, preload_environment
from service.api import create_app
from service.config import RewardConfig, ServiceSettings
from service.errors import ConfigError

APP_NAME = "alarm-serve"
# glibc reads this as a replica's process starts: one heap for every thread (service.memory).
ONE_HEAP_ENV_VARS = {"MALLOC_ARENA_MAX": "1"}
REPLICA_HEADER = b"x-alarm-replica"
REQUEST_ID = b"x-request-id"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaScale:
    """How many replicas to run and what each one asks Ray for.

    Without `max_replicas` the deployment keeps `replicas` replicas (default 1). With it,
    Ray autoscales between `min_replicas` and `max_replicas` on queue depth: the requests
    queued for or running in each replica, aiming at `target_ongoing_requests`;
    `replicas` is then the initial count. `gpus_per_replica=None` means one GPU per
    replica on a cluster that has GPUs and none otherwise.
    """

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    # Ray's defaults (at most 5 ongoing, target 2) would starve the micro-batcher, which
    # needs many concurrent requests per replica; the engine's queue bound (503) is the
    # backpressure that matters.
    target_ongoing_requests: float = 16
    max_ongoing_requests: int = 64
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"replicas={self.replicas}: at least 1")
        if self.max_replicas is None:
            if self.min_replicas is not None:
                raise ConfigError("min_replicas needs max_replicas (autoscaling)")
        else:
            low = self.min_replicas if self.min_replicas is not None else 1
            start = self.replicas if self.replicas is not None else max(low, 1)
            if not 0 <= low <= start <= self.max_replicas:
                raise ConfigError(
                    f"autoscaling needs 0 <= min_replicas ({low}) <= replicas ({start}) "
                    f"<= max_replicas ({self.max_replicas})"
                )
        if self.target_ongoing_requests <= 0 or self.max_ongoing_requests < 1:
            raise ConfigError("target_ongoing_requests must be > 0, max_ongoing_requests >= 1")
        if (self.gpus_per_replica or 0) < 0 or self.cpus_per_replica < 0:
            raise ConfigError("gpus_per_replica and cpus_per_replica must be >= 0")

    def deployment_options(
        self, cluster_gpus: float, env_vars: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Options for `Deployment.options`, given the GPUs the Ray cluster has and the
        environment each replica's process starts with (`replica_env_vars`)."""
        gpus = self.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if cluster_gpus >= 1 else 0.0
        options: dict[str, Any] = {
            "ray_actor_options": {
                "num_cpus": self.cpus_per_replica,
                "num_gpus": gpus,
                "runtime_env": {
                    "env_vars": dict(ONE_HEAP_ENV_VARS) if env_vars is None else env_vars
                },
            },
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas or 1
            return options
        low = self.min_replicas if self.min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": self.replicas if self.replicas is not None else max(low, 1),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        return options


def replica_env_vars() -> dict[str, str]:
    """What a replica's process starts with: one glibc heap, and TCMalloc preloaded as
    ALARM_ALLOCATOR chooses (service.allocator), as `alarm-serve serve` runs. The library's
    path is the driver's; on a node without it the loader skips it, and the replica says so
    (`confirm_preloaded`). AllocatorError where `tcmalloc` is asked for and not installed."""
    return {**ONE_HEAP_ENV_VARS, **preload_environment()}


class ReplicaHeaders:
    """Names the replica that answered, and leaves X-Request-ID to Ray's proxy.

    The proxy puts a request id on every request (the app echoes it) and adds it to every
    response itself; two copies of the header would read as "id, id" to a client.
    """

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self._app = app
        self._replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != REQUEST_ID]
                message["headers"] = [*headers, (REPLICA_HEADER, self._replica)]
            await send(message)

        await self._app(scope, receive, send_with_replica)


class AlarmReplica:
    """One replica: the FastAPI app of `create_app`, built inside the replica's process."""

    def __init__(self, settings: ServiceSettings, config: RewardConfig) -> None:
        self._settings = settings
        self._config = config
        confirm_preloaded()  # a preload the loader refused: a warning, or an error

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built here rather than pickled from the driver: the app holds locks, a metrics
        # registry and the engine, all of which belong to this replica's process.
        app = create_app(self._settings, self._config, load_before_serving=True)
        app.add_middleware(ReplicaHeaders, replica=serve.get_replica_context().replica_tag)
        return app


# Applied as calls, not as class decorators, so that type checkers see a Deployment.
ALARM_DEPLOYMENT = serve.deployment(name=APP_NAME)(serve.ingress()(AlarmReplica))


def build_application(
    settings: ServiceSettings,
    config: RewardConfig,
    scale: ReplicaScale,
    cluster_gpus: float,
    env_vars: dict[str, str] | None = None,
) -> serve.Application:
    """The Ray Serve application of alarm-serve, ready for `serve.run`."""
    options = scale.deployment_options(cluster_gpus, env_vars)
    return ALARM_DEPLOYMENT.options(**options).bind(settings, config)


def serve_on_ray(
    settings: ServiceSettings, config: RewardConfig, scale: ReplicaScale, address: str | None
) -> int:
    """Start or join Ray, deploy, and serve until SIGINT or SIGTERM; then undeploy.

    `address` None starts a local Ray instance unless RAY_ADDRESS names a cluster. The
    proxy listens on `settings.host:settings.port`. Settings, API keys included, reach the
    replicas as deployment arguments kept by Ray's controller. Returns the exit status.
    """
    env_vars = replica_env_vars()  # before Ray starts: a malloc it cannot have stops here
    ray.init(address=address, include_dashboard=False)
    # ray.init makes SIGTERM exit at once; stop the same way as Ctrl-C instead, so that
    # the replicas stop their engines and a local Ray instance is torn down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        application = build_application(settings, config, scale, gpus, env_vars)
        serve.run(application, name=APP_NAME, route_prefix="/")
        log.info("ready: http://%s:%d (%s on Ray Serve)", settings.host, settings.port, APP_NAME)
        threading.Event().wait()  # ends only by a signal's KeyboardInterrupt
    except KeyboardInterrupt:
        log.info("stopping: removing the application from Ray Serve")
    except (RuntimeError, TimeoutError, RayServeException) as exc:
        log.error("deployment failed: %s", exc)
        return 1
    finally:
        # This application only: on a shared cluster, other applications and Serve stay up.
        serve.delete(APP_NAME)
        ray.shutdown()  # a Ray instance that ray.init started goes down with it
    return 0
