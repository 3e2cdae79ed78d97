"""The objects start-up builds are frozen out of the garbage collector's full passes while
the app serves, and handed back at shutdown."""

import gc

import httpx
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from service.api import create_app
from service.config import ServiceSettings
from tests.conftest import wait_ready


def _tracked(obj: object) -> bool:
    """Whether the collector's generations hold `obj` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


async def test_the_loaded_app_leaves_the_collectors_generations_until_shutdown(
    tiny_config, tmp_path
):
    app = create_app(ServiceSettings(cache_dir=tmp_path), tiny_config, registry=CollectorRegistry())
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await wait_ready(client)
            engine = app.state.alarm.engine
            state = app.state.alarm
            assert gc.get_freeze_count() > 0
            assert not _tracked(engine) and not _tracked(state)
            response = await client.post(
                "/v1/rewards", json={"items": [{"prompt": "Q?", "response": "An answer."}]}
            )
            assert response.status_code == 200  # serving is unchanged by the freeze
    assert gc.get_freeze_count() == 0
    assert _tracked(engine) and _tracked(state)
