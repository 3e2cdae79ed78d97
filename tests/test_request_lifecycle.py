"""Request rate limits, the output cache and client disconnects, against a real server."""

import asyncio
import time

import httpx
import pytest
import yaml

from service.rate_limit import RequestRateLimiter
from service.score_cache import ScoreCache, item_key
from tests.conftest import tiny_config_dict
from tests.server_process import running_server

KEYS = {"fast": "key-fast-0123456789", "calm": "key-calm-0123456789"}
PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
RATE = 4.0
BURST = 10


def auth(trainer: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[trainer]}"}


def items(count: int, tag: str) -> list[dict[str, str]]:
    return [
        {"prompt": PROMPT, "response": f"Shakespeare wrote it ({tag} {i})."} for i in range(count)
    ]


def metric(base_url: str, prefix: str) -> float:
    lines = httpx.get(f"{base_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


# 0: HTTP in the engine's process; 2: two front-end processes over one engine process, whose
# rate limits, cache and metrics must behave as one server's.
@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "front-ends"])
def server_url(request, tiny_paths, tmp_path_factory):
    config = tiny_config_dict(
        tiny_paths,
        limits={
            "max_items_per_request": 64,
            "max_items_in_flight_per_trainer": 1024,
            "max_requests_per_second_per_trainer": RATE,
            "request_burst_per_trainer": BURST,
        },
        batching={"max_batch_size": 8, "max_wait_ms": 2},
    )
    folder = tmp_path_factory.mktemp("lifecycle")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    keys = ",".join(f"{name}:{key}" for name, key in KEYS.items())
    env = {"ALARM_API_KEYS": keys, "ALARM_FRONT_ENDS": str(request.param)}
    with running_server(folder / "config.yaml", folder, env=env) as url:
        yield url


# --- pure parts -------------------------------------------------------------------------


def test_the_rate_limiter_allows_a_burst_then_the_rate():
    now = [0.0]
    limiter = RequestRateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("a") == pytest.approx(0.5)  # one token takes 1 / rate
    assert limiter.try_acquire("b") == 0.0  # buckets are per trainer
    now[0] = 0.25
    assert limiter.try_acquire("a") == pytest.approx(0.25)
    now[0] = 0.5
    assert limiter.try_acquire("a") == 0.0
    now[0] = 100.0  # a long pause refills no more than the burst
    assert [limiter.try_acquire("a") for _ in range(4)][-1] > 0


def test_the_default_burst_is_one_second_of_requests():
    assert RequestRateLimiter(rate=0.5).burst == 1
    assert RequestRateLimiter(rate=7.5).burst == 8


def test_the_cache_evicts_the_least_recently_used_output():
    cache: ScoreCache[str] = ScoreCache(max_items=2)
    a, b, c = (item_key("q", r) for r in ("a", "b", "c"))
    cache.put(a, "A")
    cache.put(b, "B")
    assert cache.get(a) == "A"  # now b is the oldest
    cache.put(c, "C")
    assert (cache.get(a), cache.get(b), cache.get(c), len(cache)) == ("A", None, "C", 2)
    off: ScoreCache[str] = ScoreCache(max_items=0)
    off.put(a, "A")
    assert off.get(a) is None


def test_cache_keys_separate_prompt_from_response():
    assert item_key("ab", "c") != item_key("a", "bc")
    assert item_key("q", "r") == item_key("q", "r")
    assert item_key("q", "\ud800") != item_key("q", "?")  # lone surrogates still hash


# --- over real HTTP ---------------------------------------------------------------------


def test_a_trainer_over_its_request_rate_gets_429_and_another_is_served(server_url):
    async def burst(client: httpx.AsyncClient, trainer: str, count: int) -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                client.post(
                    "/v1/rewards", json={"items": items(1, f"rate {i}")}, headers=auth(trainer)
                )
                for i in range(count)
            )
        )

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:
            fast = await burst(client, "fast", BURST + 6)
            calm = await burst(client, "calm", 2)
            await asyncio.sleep(1.5 / RATE)
            again = await burst(client, "fast", 1)
            return fast, calm, again

    refused_before = metric(server_url, 'alarm_trainer_rate_limited_requests_total{trainer="fast"}')
    fast, calm, again = asyncio.run(run())
    statuses = [r.status_code for r in fast]
    assert set(statuses) == {200, 429}
    # The burst, plus what the rate refilled while the requests were arriving.
    assert BURST <= statuses.count(200) <= BURST + 2
    refused = [r for r in fast if r.status_code == 429]
    assert refused[0].json()["error"]["type"] == "too_many_requests"
    assert int(refused[0].headers["retry-after"]) >= 1
    assert [r.status_code for r in calm] == [200, 200]
    assert again[0].status_code == 200
    refused_after = metric(server_url, 'alarm_trainer_rate_limited_requests_total{trainer="fast"}')
    assert refused_after - refused_before == len(refused)


def test_a_repeated_request_is_answered_from_the_cache_with_the_same_rewards(server_url):
    request = {"items": [*items(3, "cached"), items(1, "cached")[0]]}  # one repeat inside
    scored = 'alarm_items_scored_total{model="holistic"}'
    hits = 'alarm_cache_lookups_total{model="holistic",result="hit"}'
    scored_before, hits_before = metric(server_url, scored), metric(server_url, hits)
    first = httpx.post(f"{server_url}/v1/rewards", json=request, headers=auth("calm"), timeout=60)
    scored_mid, hits_mid = metric(server_url, scored), metric(server_url, hits)
    time.sleep(1 / RATE)  # stay under the rate limit
    second = httpx.post(f"{server_url}/v1/rewards", json=request, headers=auth("calm"), timeout=60)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["results"][3] == first.json()["results"][0]
    assert scored_mid - scored_before == 3  # the repeat inside the request ran once
    assert hits_mid - hits_before == 0
    assert metric(server_url, scored) == scored_mid  # the second request ran no model
    assert metric(server_url, hits) - hits_mid == 4


def test_work_of_a_client_that_hung_up_is_dropped_before_the_models(server_url):
    """`fast` queues 512 items, then sends 16 more and hangs up while they wait behind its
    own backlog: those 16 never reach a model, and a retry still gets every reward."""
    scored = 'alarm_items_scored_total{model="holistic"}'
    dropped = 'alarm_dropped_items_total{model="holistic",reason="cancelled"}'
    abandoned = items(16, "abandoned")

    async def run():
        async with httpx.AsyncClient(base_url=server_url, timeout=300) as client:
            flood = [
                asyncio.create_task(
                    client.post(
                        "/v1/rewards",
                        json={"items": items(64, f"backlog {r}")},
                        headers=auth("fast"),
                    )
                )
                for r in range(8)
            ]
            give_up = time.monotonic() + 60
            while metric(server_url, 'alarm_trainer_in_flight_items{trainer="fast"}') < 512:
                assert time.monotonic() < give_up, "the backlog never built up"
                await asyncio.sleep(0.01)
            with pytest.raises(httpx.ReadTimeout):
                await client.post(
                    "/v1/rewards", json={"items": abandoned}, headers=auth("fast"), timeout=0.5
                )
            return await asyncio.gather(*flood)

    time.sleep(BURST / RATE)  # a full bucket for the 9 requests below
    scored_before, dropped_before = metric(server_url, scored), metric(server_url, dropped)
    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [200] * 8
    deadline = time.monotonic() + 10  # the backlog's answers may leave before the drop is counted
    while metric(server_url, dropped) - dropped_before < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server_url, dropped) - dropped_before == 16
    assert metric(server_url, scored) - scored_before == 512
    assert metric(server_url, 'alarm_requests_total{route="/v1/rewards",status="499"}') >= 1
    retry = httpx.post(
        f"{server_url}/v1/rewards", json={"items": abandoned}, headers=auth("fast"), timeout=60
    )
    assert retry.status_code == 200
    assert len(retry.json()["results"]) == 16
