"""`benchmarks.host_ceiling` over `benchmarks.free_forwards`: the host's own ceiling."""

import argparse
import asyncio
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from benchmarks.free_forwards import load_free_models, make_forwards_free
from benchmarks.host_ceiling import run
from benchmarks.models import write_config
from service.config import load_reward_config
from service.engine import RewardEngine, ScoreInput
from service.metrics import ServiceMetrics
from service.models import load_models
from tests.conftest import tiny_config_dict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("host-ceiling-cache")


async def test_free_networks_leave_every_adapter_step_but_the_forward(cache_dir, tmp_path):
    config_path = tmp_path / "config.yaml"
    write_config(cache_dir, config_path, cpu_workers=1, forward_overhead_tokens=4096)
    config = load_reward_config(config_path)
    engine = RewardEngine(
        load_free_models(config, cache_dir), config, ServiceMetrics(CollectorRegistry())
    )
    await engine.start()
    try:
        items = [
            ScoreInput("Who wrote Hamlet?", "Shakespeare. Around 1600. In London."),
            ScoreInput("Name a prime.", "Seven."),
        ]
        scored = await engine.score(items)
    finally:
        await engine.stop()
    for item, result in zip(items, scored, strict=True):
        # Zero logits for the holistic RM; equal embeddings, so every sentence's cosine is 1.
        assert result.combined.holistic_raw == 0.0
        relevance = result.combined.aspects["relevance"]
        assert [s.raw for s in relevance.segments] == pytest.approx([1.0] * len(relevance.segments))
        assert relevance.segments[-1].end == len(item.response)


def test_a_model_without_a_free_stand_in_is_refused(tiny_paths, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths)))
    models = load_models(load_reward_config(config_path), tmp_path)
    with pytest.raises(ValueError, match="segment_classifier"):
        make_forwards_free(models)


def test_the_ceiling_is_measured_over_http_and_in_process(cache_dir, tmp_path):
    args = argparse.Namespace(
        out=tmp_path,
        cache_dir=cache_dir,
        points=[(2, 2)],
        rounds=2,
        seconds=1.0,
        front_ends=[0, 1],
    )
    (point,) = asyncio.run(run(args))["points"]
    assert (point["concurrency"], point["items_per_request"]) == (2, 2)
    assert len(point["rounds"]) == 2
    assert point["http_items_per_s"] == pytest.approx(2 * point["http_requests_per_s"])
    assert point["engine_items_per_s"] > 0 and point["http_over_engine"] > 0
    # The event loop is one thread of the server: it cannot have used more CPU than all.
    assert 0 < point["http_loop_ms_per_request"] <= point["http_process_ms_per_request"]
    assert point["engine_loop_ms_per_request"] > 0
    # Both layouts served: one process, and an engine process behind one front-end.
    assert set(point["layouts"]) == {"0", "1"}
    assert point["layouts"]["0"]["items_per_s"] == point["http_items_per_s"]
    split = point["layouts"]["1"]
    assert split["items_per_s"] == pytest.approx(2 * split["requests_per_s"])
    # The engine's loop is one thread of one of the split server's three processes.
    assert 0 < split["loop_ms_per_request"] < split["process_ms_per_request"]
