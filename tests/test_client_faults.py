"""trainer_client against replies that misbehave, served by httpx's mock transports.

Each test is a way a reward could be lost, misattributed or held up: a sick replica's
Retry-After, a reply that trickles in, a chunk failing beside others, a broken reply.
"""

import asyncio
import email.utils
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from random import Random

import httpx
import pytest

from tests.test_client import PROMPT, good_result
from trainer_client import (
    AsyncRewardClient,
    DeadlineExceeded,
    InvalidRequest,
    ProtocolError,
    RetryPolicy,
    RewardClient,
    ServerUnavailable,
    Timeouts,
)
from trainer_client._protocol import CallPlan, _retry_after

MODELS_REPLY = {"limits": {"max_items_per_request": 64}}
Handler = Callable[[httpx.Request], httpx.Response]


def answer(request: httpx.Request, **overrides: object) -> httpx.Response:
    """A well-formed reply to `request`, each result changed by `overrides`."""
    items = json.loads(request.content)["items"]
    results = [{**good_result(item["id"]), **overrides} for item in items]
    return httpx.Response(200, json={"results": results, "reward_definition": "d"})


def serving(rewards: Handler) -> Handler:
    """`/v1/models` answered honestly, `/v1/rewards` by `rewards`."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS_REPLY)
        return rewards(request)

    return handle


def sync_client(handler: Handler, urls: str | list[str] = "http://a.test", **options):
    return RewardClient(urls, transport=httpx.MockTransport(handler), **options)


def async_client(handler: Handler, urls: str | list[str] = "http://a.test", **options):
    return AsyncRewardClient(urls, transport=httpx.MockTransport(handler), **options)


def test_a_sick_replicas_retry_after_does_not_hold_back_a_healthy_one():
    """A replica that failed to load answers 503 with Retry-After 30; the other one works.
    Every call must go on to the healthy replica at once, well inside a 10 s budget."""
    sick_posts = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "sick.test":
            sick_posts.append(request)
            body = {"error": {"type": "not_ready", "message": "model loading failed"}}
            return httpx.Response(503, headers={"retry-after": "30"}, json=body)
        return answer(request)

    urls = ["http://sick.test", "http://healthy.test"]
    options = {"timeouts": Timeouts(total_s=10), "seed": 0}
    with sync_client(serving(handle), urls, **options) as client:
        for _ in range(4):
            assert client.rewards([(PROMPT, "a")]) == [1.0]

    async def score_async() -> None:
        async with async_client(serving(handle), urls, **options) as client:
            for _ in range(4):
                assert await client.rewards([(PROMPT, "a")]) == [1.0]

    asyncio.run(score_async())
    assert sick_posts, "the rotation never reached the sick replica: the test proves nothing"


def test_a_replica_is_not_retried_sooner_than_it_asked_but_another_is_tried_at_once():
    policy = RetryPolicy(max_attempts=8, backoff_initial_s=0.01, backoff_max_s=0.01, jitter=0)
    plan = CallPlan(["http://a.test", "http://b.test"], 0, policy, time.monotonic() + 60, Random(0))
    busy = ServerUnavailable("HTTP 503")
    assert plan.url() == "http://a.test"
    assert plan.next_delay(busy, retry_after_s=30) == 0.0  # b has not asked for anything
    assert plan.url() == "http://b.test"
    assert 29.0 < plan.next_delay(busy, retry_after_s=None) <= 30.0  # back to a: it asked 30 s
    assert plan.url() == "http://a.test"
    alone = CallPlan(["http://a.test"], 0, policy, time.monotonic() + 60, Random(0))
    assert 6.9 < alone.next_delay(busy, retry_after_s=7) <= 7.0
    with pytest.raises(DeadlineExceeded):  # what a replica asks for past the budget: give up
        alone.next_delay(busy, retry_after_s=120)


def test_retry_after_is_read_as_seconds_or_as_an_http_date():
    def retry_after(value: str) -> float | None:
        return _retry_after(httpx.Response(503, headers={"retry-after": value}))

    assert retry_after("2") == 2.0
    assert retry_after("-1") == 0.0
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= (retry_after(in_30_s) or 0.0) <= 30.0
    assert retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after("soon") is None
    assert retry_after("Wed, 21 Oct 99999999999 07:28:00 GMT") is None  # past datetime's years
    assert retry_after("Wed, 21 Oct 2015 07:28:00 +99999999999") is None  # an offset too far
    assert _retry_after(httpx.Response(503)) is None


def test_a_reply_with_a_header_that_is_not_ascii_is_read_like_any_other():
    """The sync client rebuilds each reply from the bytes it read; a UTF-8 header value (an
    X-Request-ID set by a proxy, echoed back) must not turn a 200 into an error."""

    def handle(request: httpx.Request) -> httpx.Response:
        reply = answer(request)
        return httpx.Response(
            200, headers=[(b"x-request-id", "café".encode())], content=reply.content
        )

    with sync_client(serving(handle)) as client:
        assert client.rewards([(PROMPT, "a")]) == [1.0]


def test_callers_ids_come_back_as_given_even_when_they_look_like_the_clients_own():
    with sync_client(serving(answer)) as client:
        items = [
            {"prompt": PROMPT, "response": "a", "id": "#1"},
            (PROMPT, "b"),
            {"prompt": PROMPT, "response": "c", "id": "x"},
        ]
        assert [r.id for r in client.score(items).results] == ["#1", None, "x"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_reward_that_is_not_a_finite_number_is_a_protocol_error(value):
    def handle(request: httpx.Request) -> httpx.Response:
        reply = json.loads(answer(request).content)
        body = json.dumps(reply).replace('"reward": 1.0', f'"reward": {value}', 1)
        return httpx.Response(200, content=body.encode())

    with sync_client(serving(handle)) as client, pytest.raises(ProtocolError, match="finite"):
        client.score([(PROMPT, "a")])


@pytest.mark.parametrize(
    "reply",
    [
        {"html": "<html>a login page</html>"},
        {"json": {"models": []}},
        {"json": {"limits": {"max_items_per_request": None}}},
        {"json": {"limits": {"max_items_per_request": 0}}},
        {"content": b'{"limits": {"max_items_per_request": 1e999}}'},  # inf: int() overflows
    ],
)
def test_a_broken_models_reply_is_a_protocol_error_from_both_clients(reply):
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, **reply)
        return answer(request)

    with sync_client(handle) as client, pytest.raises(ProtocolError):
        client.score([(PROMPT, "a")])

    async def score_async() -> None:
        async with async_client(handle) as client:
            await client.score([(PROMPT, "a")])

    with pytest.raises(ProtocolError):
        asyncio.run(score_async())


def test_a_reply_that_trickles_in_is_cut_off_by_the_calls_budget():
    """httpx's read timeout bounds each read, not the reply: a byte every 20 ms would hold a
    plain request for seconds. The call must end with DeadlineExceeded near its 1 s budget."""
    body = json.dumps({"results": [good_result("#0")], "reward_definition": "d"}).encode()

    def trickle() -> Iterator[bytes]:
        for byte in body:
            time.sleep(0.02)
            yield bytes([byte])

    async def trickle_async() -> AsyncIterator[bytes]:
        for byte in body:
            await asyncio.sleep(0.02)
            yield bytes([byte])

    timeouts = Timeouts(read_s=0.4, total_s=1.0)
    retry = RetryPolicy(max_attempts=10, backoff_initial_s=0.01, backoff_max_s=0.01)
    assert len(body) * 0.02 > 4 * timeouts.total_s  # a whole reply would take far longer
    started = time.monotonic()
    handler = serving(lambda _: httpx.Response(200, content=trickle()))
    with (
        sync_client(handler, timeouts=timeouts, retry=retry) as client,
        pytest.raises(DeadlineExceeded, match="no whole reply"),
    ):
        client.score([(PROMPT, "a")])
    assert time.monotonic() - started < 2 * timeouts.total_s

    async def score_async() -> None:
        handler = serving(lambda _: httpx.Response(200, content=trickle_async()))
        async with async_client(handler, timeouts=timeouts, retry=retry) as client:
            await client.score([(PROMPT, "a")])

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="no whole reply"):
        asyncio.run(score_async())
    assert time.monotonic() - started < 2 * timeouts.total_s


def test_when_one_chunk_is_refused_the_others_stop_retrying():
    """The sync client's other chunks used to retry on in its thread pool, and `close()`
    waited for them: up to the whole call's budget after the caller had its error."""
    posts = {"bad": 0, "ok": 0}
    ok_retrying = threading.Event()

    def handle(request: httpx.Request) -> httpx.Response:
        response = json.loads(request.content)["items"][0]["response"]
        posts[response] += 1
        if response == "bad":
            assert ok_retrying.wait(10)  # refused only once the other chunk is retrying
            return httpx.Response(422, json={"error": {"message": "refused"}})
        ok_retrying.set()
        busy = {"error": {"type": "overloaded", "message": "queue full"}}
        return httpx.Response(503, headers={"retry-after": "0.5"}, json=busy)

    with (
        sync_client(serving(handle), chunk_size=1, timeouts=Timeouts(total_s=30)) as client,
        pytest.raises(InvalidRequest, match="refused"),
    ):
        client.score([(PROMPT, "bad"), (PROMPT, "ok")])
    assert posts["bad"] == 1
    assert posts["ok"] == 1  # its first attempt, and none after the refusal


def test_the_servers_504_is_the_calls_deadline_and_a_proxys_504_is_retried():
    """The server answers 504 `deadline_exceeded` when the budget the call sent ran out
    there: the call is over, as if its own clock had said so. A proxy's 504 (no such body)
    says nothing about the call's budget: another attempt may well be answered."""
    posts: list[str] = []

    def server_timed_out(request: httpx.Request) -> httpx.Response:
        posts.append("server")
        body = {"error": {"type": "deadline_exceeded", "message": "deadline passed"}}
        return httpx.Response(504, json=body)

    with (
        sync_client(serving(server_timed_out), retry=RetryPolicy(max_attempts=5)) as client,
        pytest.raises(DeadlineExceeded, match="deadline passed") as info,
    ):
        client.score([(PROMPT, "a")])
    assert info.value.status == 504 and posts == ["server"]  # not retried

    def proxy_timed_out_once(request: httpx.Request) -> httpx.Response:
        posts.append("proxy")
        if posts.count("proxy") == 1:
            return httpx.Response(504, text="<html>Gateway Timeout</html>")
        return answer(request)

    fast = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.01)
    with sync_client(serving(proxy_timed_out_once), retry=fast) as client:
        assert client.rewards([(PROMPT, "a")]) == [1.0]
    assert posts.count("proxy") == 2

    async def score_async() -> None:
        async with async_client(serving(server_timed_out)) as client:
            await client.score([(PROMPT, "a")])

    with pytest.raises(DeadlineExceeded):
        asyncio.run(score_async())
