"""`batching.gil_switch_interval_ms`: the GIL's switch interval while the app serves, and
Python's own again once it has stopped."""

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
