"""Several forwards at once on a device: on the CPU (`cpu_workers`) each on its share of the
cores, on a GPU (`gpu_workers`) from as many threads."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import ValidationError

from service.config import RewardConfig
from service.engine import device_slots
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


async def _rewards_by_workers(tiny_paths, tmp_path, device: str) -> dict[int, list[float]]:
    """Concurrent requests in small batches, scored with 1 and with 2 forwards at once on
    `device`: the second worker thread is only started for a forward submitted while the
    first is busy, so two of them show that forwards ran side by side."""
    workers_key = "cpu_workers" if device == "cpu" else "gpu_workers"
    rewards = {}
    for workers in (1, 2):
        batching = {"max_batch_tokens": 2048, "max_batch_size": 3, workers_key: workers}
        config_dict = tiny_config_dict(tiny_paths, batching=batching)
        for spec in [config_dict["holistic"], *config_dict["aspects"]]:
            if "device" in spec:
                spec["device"] = device
        config = RewardConfig.model_validate(config_dict)
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
                t.name for t in threading.enumerate() if t.name.startswith(f"device-{device}")
            }
            assert len(device_threads) == workers
            rewards[workers] = [response.json()["results"][0]["reward"] for response in responses]
    return rewards


async def test_two_cpu_workers_score_every_item_as_one_worker_does(tiny_paths, tmp_path):
    rewards = await _rewards_by_workers(tiny_paths, tmp_path, "cpu")
    assert rewards[2] == pytest.approx(rewards[1], abs=1e-4)
    assert len(set(rewards[1])) > 1  # the items differ, so a swap would show


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
async def test_two_gpu_workers_score_every_item_as_one_worker_does(tiny_paths, tmp_path):
    # Two threads launch forwards on one GPU's default stream: its kernels run in the order
    # they were queued, each forward's after its own inputs' copies.
    rewards = await _rewards_by_workers(tiny_paths, tmp_path, "cuda")
    assert rewards[2] == pytest.approx(rewards[1], abs=1e-4)
    assert len(set(rewards[1])) > 1


def test_a_gpu_runs_gpu_workers_forwards_at_once_and_the_cpu_cpu_workers(tiny_paths):
    batching = {"cpu_workers": 3, "gpu_workers": 2}
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, batching=batching))
    assert [device_slots(d, config) for d in ("cpu", "cuda", "cuda:1")] == [3, 2, 2]
    default = RewardConfig.model_validate(tiny_config_dict(tiny_paths))
    assert device_slots("cuda:0", default) == 1  # not measured yet: one at a time
    with pytest.raises(ValidationError, match="gpu_workers"):
        RewardConfig.model_validate(tiny_config_dict(tiny_paths, batching={"gpu_workers": 0}))
