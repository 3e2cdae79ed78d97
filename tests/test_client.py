"""trainer_client against a real alarm-serve process (and a real misbehaving HTTP server)."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from tests.conftest import tiny_config_dict
from tests.server_process import free_port, running_server
from trainer_client import (
    AsyncRewardClient,
    DeadlineExceeded,
    InvalidRequest,
    ProtocolError,
    RetryPolicy,
    RewardClient,
    ServerUnavailable,
    Timeouts,
    make_reward_func,
)

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
RESPONSES = [f"Shakespeare wrote it in {1590 + i}. It is a tragedy." for i in range(10)]
FAST_RETRY = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05)
PATIENT_RETRY = RetryPolicy(max_attempts=50, backoff_initial_s=0.01, backoff_max_s=0.2)


# 0: one process; 2: two HTTP front-end processes over one engine process (errors, deadlines
# and overload reach the client through the engine link as they do in one process).
@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "front-ends"])
def server_url(request, tiny_paths, tmp_path_factory):
    """A server that accepts at most 4 items per request and 8 in flight, and runs the
    models for every item (no output cache), so that repeated items still load it."""
    config = tiny_config_dict(
        tiny_paths,
        limits={"max_items_per_request": 4},
        batching={"max_queue_items": 8, "max_wait_ms": 20},
        cache={"max_items": 0},
    )
    folder = tmp_path_factory.mktemp("client-server")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"ALARM_FRONT_ENDS": str(request.param)}
    with running_server(folder / "config.yaml", folder, env=env) as url:
        yield url


def metric(base_url: str, prefix: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(prefix):
            total += float(line.split()[-1])
    return total


@pytest.fixture(scope="module")
def expected(server_url) -> list[float]:
    """Each response scored alone with a plain HTTP call, before any client test runs."""
    rewards = []
    for response in RESPONSES:
        reply = httpx.post(
            f"{server_url}/v1/rewards",
            json={"items": [{"prompt": PROMPT, "response": response}]},
        )
        rewards.append(reply.json()["results"][0]["reward"])
    return rewards


def test_large_batches_are_chunked_under_the_server_limit_and_kept_in_order(server_url, expected):
    with RewardClient(server_url, retry=FAST_RETRY) as client:
        client.wait_until_ready(30)
        batch = client.score([(PROMPT, r) for r in RESPONSES])  # 10 items, server max is 4
    assert batch.rewards == pytest.approx(expected, abs=1e-4)
    assert [r.id for r in batch.results] == [None] * 10
    assert batch.reward_definition.startswith("sha256:")


def test_caller_ids_are_echoed(server_url):
    items = [
        {"prompt": PROMPT, "response": r, "id": f"rollout-{i}"} for i, r in enumerate(RESPONSES)
    ]
    with RewardClient(server_url) as client:
        batch = client.score(items)
    assert [r.id for r in batch.results] == [f"rollout-{i}" for i in range(10)]


def test_503_storms_are_retried_until_every_reward_arrives(server_url, expected):
    """40 items in chunks of 2, 10 at once, against a queue of 8: the server must shed load."""
    rejected_before = metric(server_url, "alarm_rejected_items_total")
    with RewardClient(server_url, retry=PATIENT_RETRY, chunk_size=2, max_concurrency=10) as client:
        batch = client.score([(PROMPT, r) for r in RESPONSES * 4])
    assert batch.rewards == pytest.approx(expected * 4, abs=1e-4)
    assert metric(server_url, "alarm_rejected_items_total") > rejected_before


def test_refused_input_is_never_retried(server_url):
    refused = 'alarm_requests_total{route="/v1/rewards",status="413"}'
    before = metric(server_url, refused)
    with (
        RewardClient(server_url, retry=FAST_RETRY) as client,
        pytest.raises(InvalidRequest, match="max_text_chars") as info,
    ):
        client.score([(PROMPT, "x" * 100_001)])  # over the server's max_text_chars
    assert info.value.status == 413
    assert metric(server_url, refused) == before + 1


@pytest.mark.parametrize("response", ["bad \ud800 text", None, 3])
def test_unsendable_input_is_refused_before_any_request(response):
    with (
        RewardClient("http://127.0.0.1:9", retry=FAST_RETRY) as client,
        pytest.raises(InvalidRequest, match=r"items\.0\.response"),
    ):
        client.score([(PROMPT, response)])


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ((PROMPT,), "items.0 must be a (prompt, response) pair or a dict"),
        ([PROMPT, "a", "b"], "not list of 3"),
        ("ab", "not str"),
        ({"prompt": PROMPT}, "items.0 has no response"),
        ({"prompt": PROMPT, "response": "a", "id": 7}, "items.0.id must be a string, not int"),
    ],
)
def test_an_item_of_the_wrong_shape_is_a_typed_error(item, needle):
    """The audit: a list of three raised a bare ValueError, and an id of 7 came back as "7",
    so a caller matching results by its own id would match none."""
    with (
        RewardClient("http://127.0.0.1:9", retry=FAST_RETRY) as client,
        pytest.raises(InvalidRequest) as info,
    ):
        client.score([item])
    assert needle in str(info.value)


def test_pairs_as_lists_score_as_tuples(server_url, expected):
    """JSON-loaded rollouts are lists: [[prompt, response], ...]."""
    with RewardClient(server_url, retry=FAST_RETRY) as client:
        assert client.rewards([[PROMPT, r] for r in RESPONSES]) == pytest.approx(expected, abs=1e-4)


def test_a_refused_item_is_named_by_its_place_in_the_whole_call(server_url):
    """The audit: chunks of 4 items, the 26th with an id over the server's limit: the error
    named `items.1.id`, its place in its chunk."""
    items = [{"prompt": PROMPT, "response": "a", "id": f"r{i}"} for i in range(30)]
    items[25]["id"] = "x" * 300
    for make in (RewardClient, AsyncRewardClient):
        with pytest.raises(InvalidRequest) as info:
            if make is RewardClient:
                with RewardClient(server_url, retry=FAST_RETRY) as client:
                    client.score(items)
            else:

                async def score_async():
                    async with AsyncRewardClient(server_url, retry=FAST_RETRY) as client:
                        await client.score(items)

                asyncio.run(score_async())
        assert "items.25.id" in str(info.value), str(info.value)
        assert info.value.status == 422


@pytest.fixture(scope="module")
def small_budget_url(tiny_paths, tmp_path_factory):
    """A server that lets one trainer have at most 4 items unanswered (429 beyond)."""
    config = tiny_config_dict(
        tiny_paths,
        limits={"max_items_per_request": 4, "max_items_in_flight_per_trainer": 4},
        cache={"max_items": 0},
    )
    folder = tmp_path_factory.mktemp("client-budget")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with running_server(folder / "config.yaml", folder) as url:
        yield url


@pytest.fixture(scope="module")
def budget_expected(small_budget_url) -> list[float]:
    """Each response scored alone on that server, with a plain HTTP call."""
    return [
        httpx.post(
            f"{small_budget_url}/v1/rewards",
            json={"items": [{"prompt": PROMPT, "response": response}]},
        ).json()["results"][0]["reward"]
        for response in RESPONSES
    ]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_a_large_call_keeps_within_the_trainers_in_flight_limit(
    small_budget_url, budget_expected, chunk_size, replicas
):
    """The audit: a call sent all its chunks at once, past the server's per-trainer limit,
    and spent its retries on 429s caused by its own chunks (after about 25 s with the
    default policy, it failed on an idle server). With no retries at all, a 429 fails the
    call: none may happen. Two base URLs naming one server stand for replicas that rotation
    or failover left one chunk's budget to share (review: a budget per replica overran)."""
    refused = "alarm_trainer_rejected_items_total"
    before = metric(small_budget_url, refused)
    no_retry = RetryPolicy(max_attempts=1)
    items = [(PROMPT, r) for r in RESPONSES * 4]
    urls = [small_budget_url] * replicas
    with RewardClient(urls, retry=no_retry, chunk_size=chunk_size, max_concurrency=8) as client:
        assert client.rewards(items) == pytest.approx(budget_expected * 4, abs=1e-4)

    async def score_async() -> list[float]:
        async with AsyncRewardClient(
            urls, retry=no_retry, chunk_size=chunk_size, max_concurrency=8
        ) as client:
            return await client.rewards(items)

    assert asyncio.run(score_async()) == pytest.approx(budget_expected * 4, abs=1e-4)
    assert metric(small_budget_url, refused) == before


def test_a_dead_replica_fails_over_to_a_live_one(server_url, expected):
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient([dead, server_url], retry=FAST_RETRY, chunk_size=1) as client:
        assert client.rewards([(PROMPT, r) for r in RESPONSES]) == pytest.approx(expected, abs=1e-4)


def test_server_down_raises_a_typed_error():
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient(dead, retry=FAST_RETRY) as client, pytest.raises(ServerUnavailable):
        client.score([(PROMPT, "x")])


def test_a_slow_server_hits_the_deadline(server_url):
    timeouts = Timeouts(connect_s=1, read_s=0.001, total_s=0.5)
    retry = RetryPolicy(max_attempts=1000, backoff_initial_s=0.01, backoff_max_s=0.05)
    started = time.monotonic()
    with (
        RewardClient(server_url, timeouts=timeouts, retry=retry) as client,
        pytest.raises(DeadlineExceeded),
    ):
        client.score([(PROMPT, r) for r in RESPONSES])
    assert time.monotonic() - started < 5  # the deadline bounds the call, retries included
    # The abandoned requests may still run on the server; let them drain before the next test.
    deadline = time.monotonic() + 60
    while metric(server_url, "alarm_in_flight_items") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_every_attempt_carries_the_remaining_budget_as_a_deadline():
    """So the server can drop work the caller will no longer wait for (504, not scored)."""
    budgets = []

    def handler(request: httpx.Request) -> httpx.Response:
        budgets.append(float(request.headers["x-request-deadline-ms"]))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"limits": {"max_items_per_request": 64}})
        if len(budgets) <= 3:  # /v1/models, then two 503s, then the answer
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {}})
        items = json.loads(request.content)["items"]
        return httpx.Response(
            200,
            json={"results": [good_result(i["id"]) for i in items], "reward_definition": "d"},
        )

    timeouts = Timeouts(total_s=30)
    with RewardClient(
        "http://reward.test",
        timeouts=timeouts,
        retry=FAST_RETRY,
        transport=httpx.MockTransport(handler),
    ) as client:
        assert client.rewards([(PROMPT, "a")]) == [1.0]
    assert len(budgets) == 4
    assert all(0 < b <= 30_000 for b in budgets)
    assert budgets == sorted(budgets, reverse=True)  # the budget only shrinks


def test_async_client_scores_concurrent_calls_in_order(server_url, expected):

    async def run():
        async with AsyncRewardClient(server_url, retry=PATIENT_RETRY) as client:
            await client.wait_until_ready(30)
            return await asyncio.gather(
                *(client.rewards([(PROMPT, r) for r in RESPONSES[k:]]) for k in range(4))
            )

    for k, rewards in enumerate(asyncio.run(run())):
        assert rewards == pytest.approx(expected[k:], abs=1e-4)


class _ClosingCounted(httpx.AsyncHTTPTransport):
    """A real transport that counts how often a pool built on it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def aclose(self) -> None:
        await super().aclose()
        self.closed += 1


def test_async_client_serves_one_asyncio_run_after_another(server_url, expected):
    """A sync PPO loop may call `asyncio.run` once per step with one client: each loop gets
    connections of its own, closed as that loop shuts down (before the fix, the second
    step failed with "Event loop is closed")."""
    transport = _ClosingCounted()
    client = AsyncRewardClient(server_url, retry=PATIENT_RETRY, transport=transport)
    closed_after_step = []
    for step in range(3):
        rewards = asyncio.run(client.rewards([(PROMPT, r) for r in RESPONSES[step:]]))
        assert rewards == pytest.approx(expected[step:], abs=1e-4)
        closed_after_step.append(transport.closed)
    assert closed_after_step == [1, 2, 3]  # each step's pool, closed with its loop

    async def closed_by_caller() -> None:
        async with client:
            await client.rewards([(PROMPT, RESPONSES[0])])

    asyncio.run(closed_by_caller())  # closed by `async with`; the loop's shutdown finds it so
    assert transport.closed == 4
    with pytest.raises(RuntimeError, match="is closed"):  # closed for good, in any loop
        asyncio.run(client.rewards([(PROMPT, RESPONSES[0])]))


def test_async_client_refuses_a_second_open_event_loop(server_url, expected):
    """Two live loops cannot share connections: a clear error, not a hang or a lost reward.
    Once the first is shut down, the next loop gets connections of its own."""
    client = AsyncRewardClient(server_url, retry=PATIENT_RETRY)
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(client.rewards([(PROMPT, RESPONSES[0])])) == (
            pytest.approx(expected[:1], abs=1e-4)
        )
        with pytest.raises(RuntimeError, match="another event loop that is still open"):
            asyncio.run(client.rewards([(PROMPT, RESPONSES[0])]))
    finally:
        first.close()  # without shutting down its async generators: its pool is left open
    for step in (1, 2):  # the client's own transport: a fresh pool, the old one collected
        rewards = asyncio.run(client.rewards([(PROMPT, RESPONSES[step])]))
        assert rewards == pytest.approx(expected[step : step + 1], abs=1e-4)


def test_async_client_refuses_connections_a_closed_loop_left_in_a_given_transport(
    server_url, expected
):
    """A transport of the caller's is shared by every pool: connections a loop left in it
    when closed without `shutdown_asyncgens` would fail in the next loop after the request
    went out, so the client says why instead."""
    client = AsyncRewardClient(server_url, retry=PATIENT_RETRY, transport=_ClosingCounted())
    first = asyncio.new_event_loop()
    first.run_until_complete(client.rewards([(PROMPT, RESPONSES[0])]))
    first.close()
    with pytest.raises(RuntimeError, match="without shutting down its async generators"):
        asyncio.run(client.rewards([(PROMPT, RESPONSES[0])]))


def test_trl_style_reward_function(server_url, expected):
    with RewardClient(server_url) as client:
        reward_func = make_reward_func(client)
        plain = reward_func(prompts=[PROMPT] * 2, completions=RESPONSES[:2])
        chat = reward_func(
            prompts=[[{"role": "user", "content": PROMPT}]] * 2,
            completions=[[{"role": "assistant", "content": r}] for r in RESPONSES[:2]],
        )
    assert plain == pytest.approx(expected[:2], abs=1e-4)
    assert chat == pytest.approx(expected[:2], abs=1e-4)


class _Misbehaving(BaseHTTPRequestHandler):
    """Answers /v1/rewards with whatever `reply` the test set; /v1/models honestly."""

    reply: bytes = b""

    def do_GET(self):
        self._send(200, json.dumps({"limits": {"max_items_per_request": 64}}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self._send(200, self.reply)

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def good_result(item_id):
    return {
        "id": item_id,
        "reward": 1.0,
        "holistic": {"raw": 1.0, "normalized": 1.0},
        "gate_passed": True,
        "aspects_applied": True,
        "degenerate": False,
        "aspects": {},
        "dense": [{"end": 1, "reward": 1.0}],
        "truncated": False,
    }


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"not json", "malformed"),
        (json.dumps({"results": []}).encode(), "malformed"),
        (json.dumps({"results": [good_result("#0")], "reward_definition": "d"}).encode(), "match"),
        (
            json.dumps(
                {"results": [good_result("#1"), good_result("#0")], "reward_definition": "d"}
            ).encode(),
            "match",
        ),
    ],
)
def test_malformed_or_misattributed_replies_raise_protocol_error(reply, why):
    handler = type("Handler", (_Misbehaving,), {"reply": reply})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with RewardClient(url, retry=FAST_RETRY) as client, pytest.raises(ProtocolError, match=why):
            client.score([(PROMPT, "a"), (PROMPT, "b")])
    finally:
        server.shutdown()
        server.server_close()
