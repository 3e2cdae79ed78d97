"""The Ray Serve peer: one replica whose `@serve.batch` method runs the naive peer's scoring.

Ray Serve's batcher gathers up to `max_batch_size` requests, waiting at most
`batch_wait_timeout_s`, and the batch's items are scored in forwards of at most
`max_batch_size` items, in a worker thread so the replica keeps accepting requests while a
forward runs. Batch size and wait come from the same config as alarm-serve's.

    python -m benchmarks.ray_serve_peer --config FILE --cache-dir DIR --port 8300

It starts a private local Ray instance (2 CPUs, no dashboard, no usage stats), blocks until
SIGTERM or SIGINT, then shuts Serve and Ray down.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations in the
# replica, where this module's globals may not be there to resolve strings against.
import asyncio
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import ray
from fastapi import FastAPI
from ray import serve

from benchmarks.models import PeerItem, PeerRequest, PeerScorer, peer_arguments
from service.config import load_reward_config

app = FastAPI()


@serve.deployment(
    num_replicas=1,
    # The default (5) would cap a batch at 5 requests; admit every benchmark client.
    max_ongoing_requests=1024,
)
@serve.ingress(app)
class RewardsDeployment:
    """The ingress: validates the body, queues its items for the batched scorer."""

    def __init__(self, config_path: Path, cache_dir: Path, torch_threads: int) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS to the replica's CPU share (1); match the naive peer.
        torch.set_num_threads(torch_threads)
        self.scorer = PeerScorer.load(config_path, cache_dir)
        batching = load_reward_config(config_path).batching
        self.max_forward_items = batching.max_batch_size
        # Setters serve.batch attaches at run time, which its type hints do not show.
        self.score_batch.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self.score_batch.set_batch_wait_timeout_s(batching.max_wait_ms / 1000)  # type: ignore[attr-defined]

    @app.get("/readyz")
    def readyz(self) -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/rewards")
    async def rewards(self, body: PeerRequest) -> dict[str, list[float]]:
        return {"rewards": await self.score_batch(body.items)}

    @serve.batch  # limits set in __init__, from the config
    async def score_batch(self, requests: list[list[PeerItem]]) -> list[list[float]]:
        return await asyncio.to_thread(
            self.scorer.rewards_per_request, requests, self.max_forward_items
        )


def main() -> None:
    args = peer_arguments()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch

    # This plain process's default, which is what the naive peer runs with.
    torch_threads = torch.get_num_threads()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        # Ray hides GPUs from an actor that does not ask for one.
        gpus = {"num_gpus": 1} if torch.cuda.is_available() else {}
        deployment = RewardsDeployment.options(  # type: ignore[attr-defined]  # a Deployment
            ray_actor_options={"num_cpus": 1, **gpus}
        )
        serve.run(
            deployment.bind(args.config, args.cache_dir, torch_threads),
            name="rewards",
            route_prefix="/",
        )
        stop = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        # After ray.init, which installs its own SIGTERM handler.
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
