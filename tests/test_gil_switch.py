"""`batching.gil_switch_interval_ms`: the GIL's switch interval while the app serves, and
Python's own again once it has stopped."""

import asyncio
import sys

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from service.api import create_app
from service.config import RewardConfig, ServiceSettings
from tests.conftest import wait_ready


@pytest.mark.parametrize("interval_ms", [0.5, None])
async def test_the_app_serves_with_the_configured_switch_interval_and_restores_it(
    interval_ms, tiny_config: RewardConfig, tmp_path
):
    batching = tiny_config.batching.model_copy(update={"gil_switch_interval_ms": interval_ms})
    config = tiny_config.model_copy(update={"batching": batching})
    before = sys.getswitchinterval()
    app = create_app(ServiceSettings(cache_dir=tmp_path), config, registry=CollectorRegistry())
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await wait_ready(client)
            serving = sys.getswitchinterval()
            response = await client.post(
                "/v1/rewards", json={"items": [{"prompt": "Q?", "response": "An answer."}]}
            )
            assert response.status_code == 200
    expected = before if interval_ms is None else interval_ms / 1000
    assert serving == pytest.approx(expected)
    assert sys.getswitchinterval() == before


def test_the_switch_interval_is_positive_and_pythons_by_default():
    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    assert (
        RewardConfig.model_validate({"holistic": holistic}).batching.gil_switch_interval_ms is None
    )
    with pytest.raises(ValueError, match="gil_switch_interval_ms"):
        RewardConfig.model_validate(
            {"holistic": holistic, "batching": {"gil_switch_interval_ms": 0}}
        )


def test_applied_twice_the_interval_found_first_is_restored_once():
    from service.gil_switch import SwitchInterval

    before = sys.getswitchinterval()
    switch = SwitchInterval()
    try:
        switch.apply(None)
        assert sys.getswitchinterval() == before
        switch.apply(0.5)
        switch.apply(0.2)  # a second start must not take 0.5 ms for Python's own
        assert sys.getswitchinterval() == pytest.approx(0.0002)
        switch.restore()
        assert sys.getswitchinterval() == before
        sys.setswitchinterval(0.003)
        switch.restore()  # restored already: a second stop leaves whatever is set now
        assert sys.getswitchinterval() == pytest.approx(0.003)
    finally:
        sys.setswitchinterval(before)


async def test_a_start_that_fails_stops_its_tasks_and_restores_the_interval(
    tiny_config: RewardConfig, tmp_path, monkeypatch
):
    from service.engine import RewardEngine
    from service.metrics import ServiceMetrics
    from service.models import load_models

    batching = tiny_config.batching.model_copy(update={"gil_switch_interval_ms": 0.5})
    config = tiny_config.model_copy(update={"batching": batching})
    engine = RewardEngine(
        load_models(config, tmp_path), config, ServiceMetrics(CollectorRegistry())
    )

    async def failing_warm_up(*args, **kwargs):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(engine, "_score_admitted", failing_warm_up)
    before = sys.getswitchinterval()
    tasks_before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="warm-up failed"):
        await engine.start()
    assert sys.getswitchinterval() == before
    await asyncio.sleep(0)  # cancelled tasks finish on the loop's next turn
    # The batchers and the heap trimmer stopped with it: no task of the engine's is left.
    assert {task for task in asyncio.all_tasks() if not task.done()} <= tasks_before
