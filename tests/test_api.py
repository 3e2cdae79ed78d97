"""The HTTP API through a real ASGI client, real lifespan, real tiny models and batching."""

import asyncio
import json
import random

import pytest

from service.config import RewardConfig
from tests.conftest import asgi_client, tiny_config_dict, wait_ready

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ANSWER = "William Shakespeare wrote Hamlet. It is a tragedy. He wrote it around 1600."


@pytest.fixture
async def client(tiny_config, tmp_path):
    async with asgi_client(tiny_config, tmp_path) as client:
        await wait_ready(client)
        yield client


def assert_error(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error


async def test_scores_items_in_order_with_hierarchical_structure(client):
    items = [
        {"prompt": PROMPT, "response": ANSWER, "id": "a"},
        {"prompt": PROMPT, "response": "Marlowe.", "id": "b"},
        {"prompt": PROMPT, "response": ""},
    ]
    response = await client.post("/v1/rewards", json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reward_definition"].startswith("sha256:")
    results = body["results"]
    assert [r["id"] for r in results] == ["a", "b", None]
    first = results[0]
    assert set(first["aspects"]) == {"factuality", "completeness", "length"}
    sentences = first["aspects"]["factuality"]["segments"]
    assert [ANSWER[s["start"] : s["end"]] for s in sentences] == [
        "William Shakespeare wrote Hamlet.",
        "It is a tragedy.",
        "He wrote it around 1600.",
    ]
    for result, item in zip(results, items, strict=True):
        dense = result["dense"]
        assert sum(d["reward"] for d in dense) == pytest.approx(result["reward"], abs=1e-9)
        assert dense[-1]["end"] == len(item["response"])
    assert results[2]["degenerate"] and results[2]["holistic"]["normalized"] == -10.0


async def test_modes_change_the_total_and_the_definition(client):
    item = {"prompt": PROMPT, "response": ANSWER}
    by_mode = {}
    for mode in ("hierarchical", "holistic_only", "aspect_only", "weighted_sum"):
        response = await client.post("/v1/rewards", json={"items": [item], "mode": mode})
        assert response.status_code == 200
        by_mode[mode] = response.json()
    totals = {m: b["results"][0]["reward"] for m, b in by_mode.items()}
    # The tiny config's threshold passes every response, so hierarchical == weighted_sum.
    assert totals["hierarchical"] == pytest.approx(totals["weighted_sum"])
    assert totals["weighted_sum"] == pytest.approx(totals["holistic_only"] + totals["aspect_only"])
    assert len({b["reward_definition"] for b in by_mode.values()}) == 4


async def test_hundred_concurrent_requests_score_like_each_item_alone(client):
    """Batch composition must not change a score, and no result lands on another item."""
    rng = random.Random(1)
    words = ANSWER.split()
    responses = [" ".join(words[: rng.randint(0, len(words))]) + "." for _ in range(30)]
    alone = {}
    for text in responses:
        r = await client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": text}]})
        alone[text] = r.json()["results"][0]

    requests = [
        [
            {"prompt": PROMPT, "response": rng.choice(responses), "id": f"{n}-{i}"}
            for i in range(rng.randint(1, 8))
        ]
        for n in range(100)
    ]
    replies = await asyncio.gather(
        *(client.post("/v1/rewards", json={"items": items}) for items in requests)
    )
    for items, reply in zip(requests, replies, strict=True):
        assert reply.status_code == 200, reply.text
        results = reply.json()["results"]
        assert [r["id"] for r in results] == [i["id"] for i in items]
        for item, result in zip(items, results, strict=True):
            expected = alone[item["response"]]
            assert result["reward"] == pytest.approx(expected["reward"], abs=1e-4)
            assert result["holistic"]["raw"] == pytest.approx(expected["holistic"]["raw"], abs=1e-4)
    metrics = (await client.get("/metrics")).text
    assert 'alarm_batch_size_items_count{model="holistic"}' in metrics


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"items": []}, "items"),
        ({"items": [{"prompt": 1, "response": "x"}]}, "prompt"),
        ({"items": [{"prompt": "p"}]}, "response"),
        ({"items": [{"prompt": "p", "response": "r"}], "mode": "best"}, "mode"),
        ({"items": [{"prompt": "p", "response": "r", "colour": "red"}]}, "colour"),
        ({"items": "nope"}, "items"),
        ({}, "items"),
        ([1, 2], "body"),
    ],
)
async def test_invalid_bodies_get_422_naming_the_problem(client, body, needle):
    response = await client.post("/v1/rewards", json=body)
    error = assert_error(response, 422, "invalid_request")
    assert needle in json.dumps(error)


async def test_malformed_json_and_lone_surrogates_get_422(client):
    headers = {"content-type": "application/json"}
    response = await client.post("/v1/rewards", content=b'{"items": [', headers=headers)
    assert_error(response, 422, "invalid_request")
    surrogate = b'{"items": [{"prompt": "p", "response": "bad \\ud800 text"}]}'
    response = await client.post("/v1/rewards", content=surrogate, headers=headers)
    assert "Unicode" in assert_error(response, 422, "invalid_request")["message"]


@pytest.mark.parametrize("path", ["/v1/rewards", "/get_reward"])
@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.alarm+json", 200),
        ("text/plain", 422),
        (None, 422),
    ],
)
async def test_scoring_bodies_are_read_as_json_only_when_declared_json(
    client, path, content_type, status
):
    body = {"items": [{"prompt": "p", "response": "r"}]}
    if path == "/get_reward":
        body = {"query": ["p r"], "prompts": ["p"]}
    headers = {} if content_type is None else {"content-type": content_type}
    response = await client.post(path, content=json.dumps(body).encode(), headers=headers)
    if status == 200:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
    else:
        error = assert_error(response, 422, "invalid_request")
        assert "Content-Type" in error["message"] and error["details"][0]["loc"] == ["body"]


async def test_an_empty_body_and_a_bad_deadline_header_get_422_located(client):
    headers = {"content-type": "application/json"}
    empty = assert_error(
        await client.post("/v1/rewards", content=b"", headers=headers), 422, "invalid_request"
    )
    assert empty["details"][0]["loc"] == ["body"]
    headers["X-Request-Deadline-Ms"] = "-1"
    item = b'{"items": [{"prompt": "p", "response": "r"}]}'
    response = await client.post("/v1/rewards", content=item, headers=headers)
    late = assert_error(response, 422, "invalid_request")
    assert late["details"][0]["loc"] == ["header", "X-Request-Deadline-Ms"]


async def test_a_lone_surrogate_in_an_id_gets_422_not_a_broken_reply(client):
    body = b'{"items": [{"prompt": "p", "response": "r", "id": "\\udc00"}]}'
    response = await client.post(
        "/v1/rewards", content=body, headers={"content-type": "application/json"}
    )
    assert "items.0.id" in assert_error(response, 422, "invalid_request")["message"]


async def test_nul_bytes_and_unicode_are_scored(client):
    items = [{"prompt": "p\x00q", "response": "héllo \x00 wörld. 日本語です。"}]
    response = await client.post("/v1/rewards", json={"items": items})
    assert response.status_code == 200, response.text


async def test_oversized_requests_get_413(tiny_paths, tmp_path):
    limits = {"max_items_per_request": 3, "max_text_chars": 50, "max_request_bytes": 4096}
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, limits=limits))
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        many = {"items": [{"prompt": "p", "response": "r"}] * 4}
        assert (
            "max_items_per_request"
            in assert_error(await client.post("/v1/rewards", json=many), 413, "payload_too_large")[
                "message"
            ]
        )
        long_text = {"items": [{"prompt": "p", "response": "r" * 51}]}
        assert (
            "items.0.response"
            in assert_error(
                await client.post("/v1/rewards", json=long_text), 413, "payload_too_large"
            )["message"]
        )
        huge = {"items": [{"prompt": "p" * 5000, "response": "r"}]}
        assert_error(await client.post("/v1/rewards", json=huge), 413, "payload_too_large")
        # Refused by its Content-Length before routing, yet counted under its route.
        metrics = (await client.get("/metrics")).text
        assert 'alarm_requests_total{route="/v1/rewards",status="413"} 3.0' in metrics
        assert 'route="unmatched"' not in metrics


async def test_a_full_queue_answers_503_with_retry_after(tiny_paths, tmp_path):
    config = RewardConfig.model_validate(
        tiny_config_dict(
            tiny_paths,
            batching={"max_queue_items": 4, "max_wait_ms": 50},
            limits={"max_items_per_request": 4},
        )
    )
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        items = [{"prompt": PROMPT, "response": ANSWER}] * 3
        replies = await asyncio.gather(
            *(client.post("/v1/rewards", json={"items": items}) for _ in range(6))
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 1 and 503 in statuses
        for reply in replies:
            if reply.status_code == 503:
                assert_error(reply, 503, "overloaded")
                assert int(reply.headers["retry-after"]) >= 1
        # The service recovers once the queue drains.
        assert (await client.post("/v1/rewards", json={"items": items})).status_code == 200


async def test_a_model_failure_fails_that_request_and_the_service_stays_ready(client, monkeypatch):
    from service.models.segment_classifier import SegmentClassifierModel

    original = SegmentClassifierModel.run
    calls = {"n": 0}

    def fail_once(self, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return original(self, batch)

    monkeypatch.setattr(SegmentClassifierModel, "run", fail_once)
    body = {"items": [{"prompt": PROMPT, "response": ANSWER}]}
    error = assert_error(await client.post("/v1/rewards", json=body), 500, "model_failure")
    assert "factuality" in error["message"]
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.post("/v1/rewards", json=body)).status_code == 200


async def test_queue_depth_falls_as_batches_leave_not_only_when_the_request_ends(
    tiny_paths, tmp_path, monkeypatch
):
    """The audit: the gauge was set when a request's items were queued and when it ended, so
    a long request's depth stood at its item count throughout."""
    import threading

    from service.models.segment_classifier import SegmentClassifierModel

    original = SegmentClassifierModel.run
    calls: list[int] = []
    release = threading.Event()

    def held_after_the_first(self, batch):
        calls.append(len(batch))
        if len(calls) > 1:
            release.wait(60)
        return original(self, batch)

    def depth(metrics: str) -> float:
        _, _, rest = metrics.partition('alarm_queue_depth_items{model="factuality"} ')
        return float(rest.split()[0])

    monkeypatch.setattr(SegmentClassifierModel, "run", held_after_the_first)
    config = RewardConfig.model_validate(
        tiny_config_dict(tiny_paths, batching={"max_batch_size": 2}, cache={"max_items": 0})
    )
    items = [{"prompt": PROMPT, "response": f"{ANSWER} Number {i}."} for i in range(8)]
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        calls.clear()  # the load's own forwards
        scoring = asyncio.ensure_future(client.post("/v1/rewards", json={"items": items}))
        try:
            for _ in range(600):  # the first batch done, a later one held
                if len(calls) > 1 and depth((await client.get("/metrics")).text) < 8:
                    break
                await asyncio.sleep(0.05)
            assert not scoring.done()
            assert depth((await client.get("/metrics")).text) < 8
        finally:
            release.set()
        assert (await scoring).status_code == 200
        assert depth((await client.get("/metrics")).text) == 0


async def test_a_host_model_scores_each_request_in_one_call_off_the_event_loop(client, monkeypatch):
    import threading

    from service.models.rules import RuleModel

    original = RuleModel.run
    calls: list[tuple[int, str]] = []

    def recording_run(self, batch):
        calls.append((len(batch), threading.current_thread().name))
        if len(calls) == 2:
            raise ValueError("a rule that cannot count")
        return original(self, batch)

    def counted(metrics: str, name: str) -> float:
        _, found, rest = metrics.partition(f'{name}{{model="length"}} ')
        return float(rest.split()[0]) if found else 0.0

    scored = "alarm_items_scored_total"
    before = (await client.get("/metrics")).text
    monkeypatch.setattr(RuleModel, "run", recording_run)
    items = [{"prompt": PROMPT, "response": f"{ANSWER} ({n})"} for n in range(5)]
    assert (await client.post("/v1/rewards", json={"items": items})).status_code == 200
    assert calls[0][0] == 5 and calls[0][1].startswith("tokenize")  # one call, every item
    fresh = {"items": [{"prompt": PROMPT, "response": "Not cached."}]}  # the first are
    error = assert_error(await client.post("/v1/rewards", json=fresh), 500, "model_failure")
    assert "length" in error["message"]
    after = (await client.get("/metrics")).text
    assert counted(after, scored) - counted(before, scored) == 5  # the failed one: none
    batches = "alarm_batch_size_items_count"
    assert counted(after, batches) - counted(before, batches) == 2  # the failed one too
    failures = "alarm_batch_failures_total"
    assert counted(after, failures) - counted(before, failures) == 1


async def test_models_endpoint_reports_models_devices_and_limits(client):
    body = (await client.get("/v1/models")).json()
    assert [(m["name"], m["role"], m["device"]) for m in body["models"]] == [
        ("holistic", "holistic", "cpu"),
        ("factuality", "aspect", "cpu"),
        ("completeness", "aspect", "cpu"),
        ("length", "aspect", "host"),
    ]
    declared = [
        (m["details"]["granularity"], m["details"]["direction"], m["details"].get("aggregate"))
        for m in body["models"]
    ]
    assert declared == [
        ("sequence", "higher", None),
        ("segment", "higher", "mean"),
        ("sequence", "higher", "mean"),
        ("sequence", "higher", "mean"),
    ]
    assert body["combination"]["mode"] == "hierarchical"
    assert body["limits"]["max_items_per_request"] == 512
    assert set(body["reward_definitions"]) == {
        "hierarchical",
        "weighted_sum",
        "holistic_only",
        "aspect_only",
    }


async def test_health_and_metrics(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    await client.post("/v1/rewards", json={"items": [{"prompt": "p", "response": "r."}]})
    metrics = (await client.get("/metrics")).text
    for name in (
        "alarm_requests_total",
        "alarm_request_duration_seconds",
        "alarm_queue_wait_seconds",
        "alarm_batch_size_items",
        "alarm_batch_padded_tokens",
        "alarm_forward_duration_seconds",
        "alarm_queue_depth_items",
        "alarm_items_scored_total",
    ):
        assert name in metrics
    assert 'alarm_requests_total{route="/v1/rewards",status="200"}' in metrics
    # Rejections show at zero before the first one; latencies resolve below 5 ms (audit).
    for reason in ("queue_full", "trainer_limit"):
        assert f'alarm_rejected_items_total{{reason="{reason}"}} 0.0' in metrics
    assert 'alarm_queue_wait_seconds_bucket{le="0.00025",model=' in metrics
    # A host model (the length rule) runs no tokens: no token series, no 0/0 efficiency.
    assert 'alarm_batch_size_items_count{model="length"}' in metrics
    assert 'model="length"' not in "".join(
        line for line in metrics.splitlines() if "tokens" in line
    )
    assert 'alarm_padded_tokens_total{model="holistic"}' in metrics


async def test_requests_are_counted_by_route_template_and_unknown_paths_under_one_label(client):
    await client.get("/openapi.json")
    await client.get("/docs")
    for path in ("/nowhere", "/v1/models/extra", "/docs/x"):
        await client.get(path)
    metrics = (await client.get("/metrics")).text
    assert 'alarm_requests_total{route="/openapi.json",status="200"}' in metrics
    assert 'alarm_requests_total{route="/docs",status="200"}' in metrics
    unmatched = [line for line in metrics.splitlines() if 'route="unmatched"' in line]
    assert any(
        line.startswith('alarm_requests_total{route="unmatched",status="404"} ')
        for line in unmatched
    )
    assert not any(path in metrics for path in ("/nowhere", "/v1/models/extra", "/docs/x"))


async def test_a_model_that_cannot_load_keeps_the_service_unready(tiny_paths, tmp_path):
    broken = tiny_config_dict(tiny_paths)
    broken["holistic"]["path"] = str(tmp_path / "missing-model")
    config = RewardConfig.model_validate(broken)
    async with asgi_client(config, tmp_path) as client:
        for _ in range(200):
            response = await client.get("/readyz")
            if "loading failed" in response.text:
                break
            await asyncio.sleep(0.05)
        assert_error(response, 503, "not_ready")
        body = {"items": [{"prompt": "p", "response": "r"}]}
        assert_error(await client.post("/v1/rewards", json=body), 503, "not_ready")
        assert (await client.get("/healthz")).status_code == 200


async def test_openrlhf_get_reward_splits_by_prompt_prefix(client):
    prompt = "Human: Who wrote Hamlet?\nAssistant: "
    queries = [prompt + "Shakespeare.", prompt + "Marlowe wrote it. Probably."]
    reply = await client.post("/get_reward", json={"query": queries, "prompts": [prompt] * 2})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    direct = await client.post(
        "/v1/rewards",
        json={"items": [{"prompt": prompt, "response": q[len(prompt) :]} for q in queries]},
    )
    expected = [r["reward"] for r in direct.json()["results"]]
    assert body["rewards"] == pytest.approx(expected, abs=1e-4)
    assert body["scores"] == body["rewards"]
    assert set(body["extra_logs"]) == {
        "holistic",
        "gate_passed",
        "aspect/factuality",
        "aspect/completeness",
        "aspect/length",
    }
    assert all(len(v) == 2 for v in body["extra_logs"].values())


async def test_openrlhf_accepts_empty_lists_and_refuses_unsplittable_queries(client):
    reply = await client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert reply.json() == {
        "rewards": [],
        "scores": [],
        "extra_logs": {
            "holistic": [],
            "gate_passed": [],
            "aspect/factuality": [],
            "aspect/completeness": [],
            "aspect/length": [],
        },
    }
    no_prompts = await client.post("/get_reward", json={"query": ["a b"]})
    assert "response_separator" in assert_error(no_prompts, 422, "invalid_request")["message"]
    mismatch = await client.post("/get_reward", json={"query": ["abc"], "prompts": ["xyz"]})
    assert "query.0" in assert_error(mismatch, 422, "invalid_request")["message"]


async def test_openrlhf_splits_on_a_configured_separator(tiny_paths, tmp_path):
    config = RewardConfig.model_validate(
        tiny_config_dict(tiny_paths, openrlhf={"response_separator": "Assistant:"})
    )
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        query = "Human: Who wrote Hamlet?\nAssistant: Shakespeare. He did."
        reply = await client.post("/get_reward", json={"query": [query]})
        assert reply.status_code == 200, reply.text
        direct = await client.post(
            "/v1/rewards",
            json={
                "items": [
                    {"prompt": "Human: Who wrote Hamlet?\n", "response": "Shakespeare. He did."}
                ]
            },
        )
        assert reply.json()["rewards"][0] == pytest.approx(
            direct.json()["results"][0]["reward"], abs=1e-4
        )


async def test_a_non_finite_score_is_a_model_failure_not_a_broken_reply(client, monkeypatch):
    from service.models.base import HolisticScore
    from service.models.sequence_scalar import SequenceScalarModel

    original = SequenceScalarModel.run

    def overflowing(self, batch):
        if self.role == "aspect":
            return original(self, batch)
        return [HolisticScore(float("nan"), False) for _ in batch]

    monkeypatch.setattr(SequenceScalarModel, "run", overflowing)
    body = {"items": [{"prompt": PROMPT, "response": ANSWER}]}
    error = assert_error(await client.post("/v1/rewards", json=body), 500, "model_failure")
    assert "non-finite" in error["message"]


async def test_aspect_consistency_endpoint_matches_a_hand_computation(client):
    pairs = [
        {"prompt": PROMPT, "response_1": ANSWER, "response_2": "Marlowe."},
        {"prompt": PROMPT, "response_1": "No.", "response_2": "It was Shakespeare, surely."},
        {"prompt": PROMPT, "response_1": "Shakespeare.", "response_2": "Shakespeare."},
    ]
    reply = await client.post("/v1/aspects/consistency", json={"pairs": pairs})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    length = next(a for a in body["aspects"] if a["name"] == "length")

    async def holistic(response):
        scored = await client.post(
            "/v1/rewards", json={"items": [{"prompt": PROMPT, "response": response}]}
        )
        return scored.json()["results"][0]["holistic"]["raw"]

    counted = disagreements = 0
    for pair in pairs:
        h1, h2 = await holistic(pair["response_1"]), await holistic(pair["response_2"])
        w1, w2 = len(pair["response_1"].split()), len(pair["response_2"].split())
        if h1 == h2:
            continue
        counted += 1
        if w1 != w2 and (w1 > w2) != (h1 > h2):
            disagreements += 1
    assert length["pairs_counted"] == counted == 2  # identical responses tie the holistic
    assert length["inconsistency"] == pytest.approx(disagreements / counted)
    assert body["pairs"] == 3 and body["holistic_ties"] == 1
    # Every response was scored: nothing left out (test_selection covers what is).
    assert body["holistic_missing"] == 0 and all(a["missing"] == 0 for a in body["aspects"])
    assert len(body["selected"]) >= 1
    assert body["reward_definition"].startswith("sha256:")
