"""Several forwards at once on the CPU (`cpu_workers`), each on its share of the cores."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.config import RewardConfig
from service.models.loading import intra_op_threads, set_intra_op_threads
from tests.conftest import asgi_client, tiny_config_dict, wait_ready

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
RESPONSES = [
    "Shakespeare. " * (1 + i % 7) + "He wrote it around 1600." * (i % 3) for i in range(24)
]


def test_each_device_worker_runs_on_its_share_of_torch_threads():
    default = torch.get_num_threads()
    with ThreadPoolExecutor(
        2, initializer=set_intra_op_threads, initargs=(intra_op_threads(2),)
    ) as workers:
        seen = set(workers.map(lambda _: torch.get_num_threads(), range(8)))
    assert seen == {max(1, default // 2)}
    assert torch.get_num_threads() == default  # a per-thread setting: the caller keeps its own


async def test_two_cpu_workers_score_every_item_as_one_worker_does(tiny_paths, tmp_path):
    """Concurrent requests in small batches: the second worker thread is only started for a
    forward submitted while the first is busy, so two of them show that forwards ran side
    by side; every reward matches the one-worker server's."""
    rewards = {}
    for workers in (1, 2):
        batching = {"max_batch_tokens": 2048, "max_batch_size": 3, "cpu_workers": workers}
        config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, batching=batching))
        async with asgi_client(config, tmp_path / str(workers)) as client:
            await wait_ready(client)
            responses = await asyncio.gather(
                *(
                    client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": r}]})
                    for r in RESPONSES
                )
            )
            assert all(response.status_code == 200 for response in responses)
            device_threads = {
                t.name for t in threading.enumerate() if t.name.startswith("device-cpu")
            }
            assert len(device_threads) == workers
            rewards[workers] = [response.json()["results"][0]["reward"] for response in responses]
    assert rewards[2] == pytest.approx(rewards[1], abs=1e-4)
    assert len(set(rewards[1])) > 1  # the items differ, so a swap would show
