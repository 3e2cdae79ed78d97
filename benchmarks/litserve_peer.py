"""The LitServe peer: its own request batching in front of the naive peer's scoring code.

LitServe batches whole requests (up to `max_batch_size` of them, waiting at most
`batch_timeout`) in one inference worker process; `predict` then scores the batch's items
in forwards of at most `max_batch_size` items. Batch size and wait come from the same
config as alarm-serve's, so both batch under the same limits.

    python -m benchmarks.litserve_peer --config FILE --cache-dir DIR --port 8200

LitServe runs an API server process and an inference worker process beside this one, and
stopping only this process orphans them: start it in its own process group and stop the
group too (`benchmarks.servers.stop_server` does).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as
# the endpoint's body type, and FastAPI cannot resolve it as a string in LitServe's module.
from pathlib import Path

import litserve as ls

from benchmarks.models import PeerItem, PeerRequest, PeerScorer, peer_arguments
from service.config import load_reward_config


class RewardsAPI(ls.LitAPI):
    """decode one request -> batch requests -> score -> one reward list per request."""

    def __init__(
        self,
        config_path: Path,
        cache_dir: Path,
        torch_threads: int,
        max_batch_size: int,
        batch_timeout_s: float,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout_s, api_path="/v1/rewards"
        )
        # Only paths and numbers here: the object is pickled into the spawned worker.
        self.config_path = config_path
        self.cache_dir = cache_dir
        self.torch_threads = torch_threads
        self.max_forward_items = max_batch_size

    def setup(self, device: str) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        self.scorer = PeerScorer.load(self.config_path, self.cache_dir)

    def decode_request(self, request: PeerRequest) -> list[PeerItem]:
        return request.items

    def batch(self, inputs: list[list[PeerItem]]) -> list[list[PeerItem]]:
        return inputs

    def predict(self, x: list[list[PeerItem]]) -> list[list[float]]:
        return self.scorer.rewards_per_request(x, self.max_forward_items)

    def unbatch(self, output: list[list[float]]) -> list[list[float]]:
        return output

    def encode_response(self, output: list[float]) -> dict[str, list[float]]:
        return {"rewards": output}


def main() -> None:
    args = peer_arguments()
    import torch

    batching = load_reward_config(args.config).batching
    api = RewardsAPI(
        args.config,
        args.cache_dir,
        # This plain process's default, which is what the naive peer runs with.
        torch_threads=torch.get_num_threads(),
        max_batch_size=batching.max_batch_size,
        batch_timeout_s=batching.max_wait_ms / 1000,
    )
    server = ls.LitServer(
        api,
        # The scorer places models by the config's `device`, as the other servers do.
        accelerator="auto",
        devices=1,
        workers_per_device=1,
        # No queue timeout: the other servers have none, so slow points are not cut to 504s.
        timeout=False,
        healthcheck_path="/readyz",
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        generate_client_file=False,
        num_api_servers=1,
    )


if __name__ == "__main__":
    main()
