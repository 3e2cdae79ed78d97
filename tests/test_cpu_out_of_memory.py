"""A forward that runs out of host memory (torch's "DefaultCPUAllocator: can't allocate
memory") is halved and retried, as one out of GPU memory is."""

import pytest
import torch

from service.config import RewardConfig
from service.out_of_memory import is_out_of_memory
from tests.conftest import asgi_client, tiny_config_dict, wait_ready

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ANSWER = "William Shakespeare wrote Hamlet. It is a tragedy. He wrote it around 1600."


def allocate_past_the_host() -> None:
    """A real failed host allocation: 2^45 float32s (128 TiB), past any address space."""
    torch.empty(2**45, dtype=torch.float32)


def test_a_failed_host_allocation_is_out_of_memory():
    with pytest.raises(RuntimeError) as failed:
        allocate_past_the_host()
    assert "DefaultCPUAllocator" in str(failed.value)
    assert is_out_of_memory(failed.value)
    assert not is_out_of_memory(RuntimeError("can't allocate a tensor of negative size"))


async def test_a_batch_out_of_host_memory_is_halved_until_every_item_scores(
    tiny_paths, tmp_path, monkeypatch
):
    from service.models.sequence_scalar import SequenceScalarModel

    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, cache={"max_items": 0}))
    items = [{"prompt": PROMPT, "response": f"{ANSWER} Item {i}."} for i in range(6)]
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        before = await client.post("/v1/rewards", json={"items": items})
        assert before.status_code == 200, before.text

        original = SequenceScalarModel.run

        def out_of_host_memory_above_one(self, batch):
            if len(batch) > 1:
                allocate_past_the_host()
            return original(self, batch)

        monkeypatch.setattr(SequenceScalarModel, "run", out_of_host_memory_above_one)
        after = await client.post("/v1/rewards", json={"items": items})
        assert after.status_code == 200, after.text
        for old, new in zip(before.json()["results"], after.json()["results"], strict=True):
            assert new["reward"] == pytest.approx(old["reward"], abs=1e-4)
