"""Several trainers on one server: API keys, per-trainer limits, fairness, labelled metrics."""

import asyncio
import time

import httpx
import pytest
import yaml

from tests.conftest import tiny_config_dict
from tests.server_process import running_server

KEYS = {"big": "key-for-big-0123456789", "small": "key-for-small-0123456789"}
PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ITEM = {"prompt": PROMPT, "response": "William Shakespeare wrote it. It is a tragedy."}


def distinct_items(count: int, tag: str) -> list[dict[str, str]]:
    """Items the output cache has not seen, so every one of them queues for the models."""
    return [
        {"prompt": PROMPT, "response": f"William Shakespeare wrote it ({tag} {i})."}
        for i in range(count)
    ]


def auth(trainer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[trainer]}"}


@pytest.fixture(scope="module")
def server_url(tiny_paths, tmp_path_factory):
    config = tiny_config_dict(
        tiny_paths,
        limits={"max_items_per_request": 64, "max_items_in_flight_per_trainer": 512},
        batching={"max_batch_size": 8, "max_wait_ms": 2},
    )
    folder = tmp_path_factory.mktemp("trainers")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    keys = ",".join(f"{name}:{key}" for name, key in KEYS.items())
    with running_server(folder / "config.yaml", folder, env={"ALARM_API_KEYS": keys}) as url:
        yield url


def metric(base_url: str, prefix: str) -> float:
    lines = httpx.get(f"{base_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS['big']}"}],
    ids=["missing", "wrong", "not-bearer"],
)
@pytest.mark.parametrize(
    "path", ["/v1/rewards", "/get_reward", "/v1/aspects/consistency", "/v1/models"]
)
def test_scoring_routes_refuse_a_missing_or_wrong_key(server_url, headers, path):
    body = {"items": [ITEM]} if path == "/v1/rewards" else {"query": ["x"], "prompts": [""]}
    if path == "/v1/models":
        reply = httpx.get(f"{server_url}{path}", headers=headers)
    elif path == "/v1/aspects/consistency":  # no key: 401, before the body is even parsed
        json_headers = {**headers, "content-type": "application/json"}
        reply = httpx.post(f"{server_url}{path}", content=b'{"pairs": [', headers=json_headers)
    else:
        reply = httpx.post(f"{server_url}{path}", json=body, headers=headers)
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["type"] == "unauthorized"
    assert reply.headers["www-authenticate"] == "Bearer"


def test_a_valid_key_scores_and_health_stays_open(server_url):
    reply = httpx.post(f"{server_url}/v1/rewards", json={"items": [ITEM]}, headers=auth("small"))
    assert reply.status_code == 200, reply.text
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{server_url}{path}").status_code == 200


def test_metrics_are_labelled_by_configured_trainers_only(server_url):
    httpx.post(f"{server_url}/v1/rewards", json={"items": [ITEM] * 3}, headers=auth("small"))
    text = httpx.get(f"{server_url}/metrics").text
    assert metric(server_url, 'alarm_trainer_items_total{trainer="small"}') >= 3
    labels = {
        line.split('trainer="')[1].split('"')[0]
        for line in text.splitlines()
        if 'trainer="' in line and not line.startswith("#")
    }
    assert labels == {"big", "small"}
    assert all(key not in text for key in KEYS.values())


def test_a_trainer_over_its_limit_gets_429_while_another_is_served(server_url):
    refused_before = metric(server_url, 'alarm_rejected_items_total{reason="trainer_limit"}')

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=120) as client:
            # Items the cache has not seen: answered from it, a request would leave before the
            # next one arrived, and the flood might never reach the limit.
            flood = [
                client.post(
                    "/v1/rewards",
                    json={"items": distinct_items(64, f"over the limit {index}")},
                    headers=auth("big"),
                )
                for index in range(12)  # 768 items against a per-trainer limit of 512
            ]
            small = client.post("/v1/rewards", json={"items": [ITEM]}, headers=auth("small"))
            return await asyncio.gather(*flood), await small

    flood, small = asyncio.run(run())
    statuses = [r.status_code for r in flood]
    assert 429 in statuses and 200 in statuses
    refused = next(r for r in flood if r.status_code == 429)
    assert refused.json()["error"]["type"] == "too_many_requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert small.status_code == 200
    # Admission control's own count has them too, not only the per-trainer one (audit).
    refused_items = 64 * statuses.count(429)
    after = metric(server_url, 'alarm_rejected_items_total{reason="trainer_limit"}')
    assert after - refused_before == refused_items


def test_a_small_trainer_is_not_starved_by_a_flooding_one(server_url):
    """While `big` has 512 items queued, `small`'s item is answered long before `big`'s
    backlog drains (owners take turns per forward; `small`'s tokenising may still queue
    behind `big`'s, so the bound here is loose)."""

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=300) as client:
            flood = [
                asyncio.create_task(
                    client.post(
                        "/v1/rewards",
                        json={"items": distinct_items(64, f"flood {request}")},
                        headers=auth("big"),
                    )
                )
                for request in range(8)
            ]
            give_up = time.monotonic() + 60
            while metric(server_url, 'alarm_trainer_in_flight_items{trainer="big"}') < 512:
                assert time.monotonic() < give_up, "big's 512 items never were in flight at once"
                await asyncio.sleep(0.01)
            reply = await client.post(
                "/v1/rewards", json={"items": distinct_items(1, "small")}, headers=auth("small")
            )
            big_left = metric(server_url, 'alarm_trainer_in_flight_items{trainer="big"}')
            replies = await asyncio.gather(*flood)
            return reply, big_left, replies

    reply, big_left, replies = asyncio.run(run())
    assert reply.status_code == 200
    assert all(r.status_code == 200 for r in replies)
    assert big_left >= 256, f"small waited until big had only {big_left} of 512 items left"


def test_the_client_sends_its_api_key(server_url):
    from trainer_client import RewardClient, Unauthorized

    with RewardClient(server_url, api_key=KEYS["small"]) as client:
        assert len(client.rewards([(PROMPT, "Shakespeare.")])) == 1
    with RewardClient(server_url, api_key="nope") as client, pytest.raises(Unauthorized) as info:
        client.rewards([(PROMPT, "Shakespeare.")])
    assert info.value.status == 401


async def test_metrics_need_a_key_when_so_configured(tiny_config, tmp_path):
    from prometheus_client import CollectorRegistry

    from service.api import create_app
    from service.config import ServiceSettings

    settings = ServiceSettings(
        cache_dir=tmp_path, api_keys=f"small:{KEYS['small']}", metrics_require_auth=True
    )
    app = create_app(settings, tiny_config, registry=CollectorRegistry())
    transport = httpx.ASGITransport(app=app)  # no lifespan: /metrics needs no models
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        refused = await http.get("/metrics")
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        allowed = await http.get("/metrics", headers=auth("small"))
        assert allowed.status_code == 200 and "alarm_" in allowed.text
        assert (await http.get("/healthz")).status_code == 200


@pytest.mark.parametrize("key", ["clé-0123456789", "two words", "tab\there", "bell\x07"])
def test_a_key_no_header_could_carry_is_refused_at_start_naming_only_its_trainer(key):
    from service.auth import Authenticator
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match=r"API keys of \['odd'\] must be visible ASCII") as raised:
        Authenticator({"odd": key, "plain": KEYS["small"]})
    assert key not in str(raised.value)
    assert Authenticator({"plain": KEYS["small"]}).trainers == ["plain"]


def test_a_keys_file_that_is_not_utf8_is_a_configuration_error(tmp_path):
    from service.auth import Authenticator
    from service.config import ServiceSettings
    from service.errors import ConfigError

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_bytes(b"small: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read api_keys_file"):
        Authenticator.from_settings(ServiceSettings(api_keys_file=keys_file))
