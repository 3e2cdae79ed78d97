"""Bad input against a real server process: schemathesis fuzzing from the committed
openapi.yaml, then hand-written hostile bodies over raw HTTP.

Every request must get a documented status and a body that matches the contract: a 200
result where the input is legal, else the one error shape with the right type. Never a 5xx,
never a hang.
"""

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.schemas import ErrorResponse, OpenRLHFResponse, RewardResponse
from tests.conftest import tiny_config_dict
from tests.server_process import running_server

try:
    import schemathesis
except ImportError:  # it needs Python 3.11+; the hand-written cases below still run
    schemathesis = None

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"
# Small enough that the edges are cheap to reach, large enough for 10k tiny items to pass the
# body cap and hit the item cap.
LIMITS = {"max_items_per_request": 512, "max_text_chars": 2048, "max_request_bytes": 1 << 20}
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("bad-input")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths, limits=LIMITS)))
    with running_server(config, root / "cache") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=TIMEOUT_S) as client:
        yield client


if schemathesis is not None:
    FUZZ = schemathesis.Config.from_dict(
        {
            "seed": 20240311,
            "generation": {
                "mode": "all",  # valid and schema-violating requests
                "max-examples": 50,
                "deterministic": True,
                "database": "none",
                # HTTP lets a request carry headers the contract does not name (an unknown
                # header is not an error); unknown body fields are tested by hand below.
                "allow-extra-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": TIMEOUT_S,
            # A valid-by-schema request may still be refused by a rule the schema cannot state.
            "operations": [
                {
                    "include-path": "/v1/rewards",
                    # A valid but tiny deadline_ms / X-Request-Deadline-Ms expires: 504.
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": ["2xx", "413", "504"]},
                        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]},
                    },
                },
                {
                    # Without `prompts` a query splits on a separator this config does not set.
                    "include-path": "/get_reward",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": ["2xx", "413", "422"]}
                    },
                },
            ],
        }
    )
    schema = schemathesis.openapi.from_path(SPEC, config=FUZZ)

    @schema.parametrize()
    def test_fuzzed_requests_get_documented_statuses_and_bodies(case, server):
        case.call_and_validate(base_url=server)

else:

    @pytest.mark.skip(reason="schemathesis is not installed (it needs Python 3.11+)")
    def test_fuzzed_requests_get_documented_statuses_and_bodies():
        pass


def post_raw(http: httpx.Client, body: bytes, path: str = "/v1/rewards") -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = ErrorResponse.model_validate(response.json()).error
    assert error.type == error_type
    assert error.message
    assert error.request_id == response.headers["x-request-id"]
    return error.model_dump()


def assert_scored(response: httpx.Response, items: list[dict]) -> None:
    assert response.status_code == 200, response.text
    results = RewardResponse.model_validate(response.json()).results
    assert len(results) == len(items)
    for item, result in zip(items, results, strict=True):
        assert result.dense[-1].end == len(item["response"])


ITEM = {"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote it."}
ITEM_JSON = b'{"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote it."}'
DEEP = b"[" * 10_000 + b"]" * 10_000


@pytest.mark.parametrize(
    "item",
    [
        {"prompt": "", "response": ""},
        {"prompt": "", "response": "An answer without a question."},
        {"prompt": "A question without an answer?", "response": ""},
        {"prompt": "p\x00q", "response": "a\x00b. \x00"},
        {"prompt": "\x00", "response": "\x00"},
        {"prompt": "ü" * LIMITS["max_text_chars"], "response": "ß" * LIMITS["max_text_chars"]},
    ],
    ids=["both-empty", "empty-prompt", "empty-response", "nul-bytes", "only-nul", "at-limit"],
)
def test_legal_edge_texts_are_scored(http, item):
    assert_scored(http.post("/v1/rewards", json={"items": [item]}), [item])


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_a_text_one_character_over_the_limit_gets_413_naming_it(http, field):
    item = {**ITEM, field: "x" * (LIMITS["max_text_chars"] + 1)}
    error = assert_error(http.post("/v1/rewards", json={"items": [item]}), 413, "payload_too_large")
    assert f"items.0.{field}" in error["message"]


OVER = "x" * (LIMITS["max_text_chars"] + 1)


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/get_reward", {"query": ["p" + OVER], "prompts": ["p"]}, "query.0's response"),
        ("/get_reward", {"query": ["ok", OVER + "a"], "prompts": ["ok", OVER]}, "prompts.1"),
        (
            "/v1/aspects/consistency",
            {
                "pairs": [{"prompt": "p", "response_1": "a", "response_2": "b"}] * 2
                + [{"prompt": "p", "response_1": "a", "response_2": OVER}]
            },
            "pairs.2.response_2",
        ),
        (
            "/v1/aspects/consistency",
            {"pairs": [{"prompt": OVER, "response_1": "a", "response_2": "b"}]},
            "pairs.0.prompt",
        ),
    ],
)
def test_a_text_over_the_limit_is_named_where_each_route_holds_it(http, path, body, where):
    """The audit: these routes named `items.0.response`, a field their bodies do not have."""
    error = assert_error(http.post(path, json=body), 413, "payload_too_large")
    assert error["message"].startswith(f"{where}: {len(OVER)} characters exceed")


def test_ten_thousand_items_get_413(http):
    error = assert_error(
        http.post("/v1/rewards", json={"items": [ITEM] * 10_000}), 413, "payload_too_large"
    )
    assert "max_items_per_request" in error["message"]
    reply = http.post("/get_reward", json={"query": ["pq"] * 10_000, "prompts": ["p"] * 10_000})
    assert_error(reply, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/rewards", b'{"items": [' + b",".join([b"{}"] * 100_000) + b"]}"),
        ("/get_reward", b'{"query": [' + b",".join([b"1"] * 100_000) + b"]}"),
        ("/v1/aspects/consistency", b'{"pairs": [' + b",".join([b"{}"] * 50_000) + b"]}"),
        ("/get_reward", b'{"query": ["pq"], "prompts": [' + b",".join([b"1"] * 100_000) + b"]}"),
    ],
)
def test_a_flood_of_invalid_items_is_refused_by_its_count_before_any_is_read(http, path, body):
    """Each invalid item's errors used to come back, here 200,000, built on the event loop
    while every other request waited; the count alone is enough to refuse them."""
    assert len(body) < LIMITS["max_request_bytes"]
    error = assert_error(post_raw(http, body, path), 413, "payload_too_large")
    assert error["message"] == "100000 items exceed max_items_per_request=512"
    assert not error["details"]


def test_an_object_with_many_unknown_fields_gets_one_error_not_one_each(http):
    unknown = b",".join(b'"k%d": 1' % i for i in range(60_000))
    body = b'{"items": [{"prompt": "p", "response": "r", ' + unknown + b"}]}"
    assert len(body) < LIMITS["max_request_bytes"]
    error = assert_error(post_raw(http, body), 422, "invalid_request")
    assert len(error["details"]) == 1
    assert "60002 fields, of which at most 3 are known" in error["message"]


def test_a_body_over_max_request_bytes_gets_413_with_or_without_content_length(http):
    padding = b" " * LIMITS["max_request_bytes"]
    body = b'{"items": [' + ITEM_JSON + b"]}" + padding
    assert_error(post_raw(http, body), 413, "payload_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    response = http.post(
        "/v1/rewards", content=chunked(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "body",
    [
        # Not JSON, or not UTF-8.
        b"",
        b"{",
        b'{"items": [' + ITEM_JSON,
        b'{"items": [{"prompt": "caf\xe9", "response": "r"}]}',
        b'\xff\xfe{"items": []}',
        b"null",
        # Lone surrogates, as JSON escapes, in every string position.
        b'{"items": [{"prompt": "\\ud800", "response": "r"}]}',
        b'{"items": [{"prompt": "p", "response": "bad \\udfff text"}]}',
        b'{"items": [{"prompt": "p", "response": "r", "id": "\\ud83d"}]}',
        b'{"items": [' + ITEM_JSON + b'], "mode": "\\ud800"}',
        b'{"items": [' + ITEM_JSON + b'], "\\ud800": 1}',
        b'{"items": [{"prompt": "p", "response": "r", "\\udc00": 1}]}',
        # Nesting deeper than any parser should follow.
        b'{"items": ' + DEEP + b"}",
        b'{"items": [' + ITEM_JSON + b'], "extra": ' + DEEP + b"}",
        b'{"items": [{"prompt": ' + DEEP + b', "response": "r"}]}',
        b'{"items": [' + ITEM_JSON + b'], "extra": ' + b"[" * 500 + b"]" * 500 + b"}",
        # Wrong types everywhere.
        b'{"items": {"prompt": "p", "response": "r"}}',
        b'{"items": "p"}',
        b'{"items": null}',
        b'{"items": []}',
        b'{"items": [null]}',
        b'{"items": [[]]}',
        b'{"items": [{"prompt": 1, "response": "r"}]}',
        b'{"items": [{"prompt": null, "response": "r"}]}',
        b'{"items": [{"prompt": ["p"], "response": "r"}]}',
        b'{"items": [{"prompt": {"text": "p"}, "response": "r"}]}',
        b'{"items": [{"prompt": "p", "response": true}]}',
        b'{"items": [{"prompt": "p", "response": "r", "id": 7}]}',
        b'{"items": [' + ITEM_JSON + b'], "mode": 1}',
        b'{"items": [' + ITEM_JSON + b'], "mode": ["hierarchical"]}',
        b'{"items": [' + ITEM_JSON + b'], "mode": "best"}',
        b"[" + ITEM_JSON + b"]",
        b'"items"',
        b"3.5",
        # NaN and Infinity literals (not JSON, but Python's parser knows them).
        b'{"items": [' + ITEM_JSON + b'], "mode": NaN}',
        b'{"items": [{"prompt": Infinity, "response": "r"}]}',
        b'{"items": [{"prompt": "p", "response": "r", "id": -Infinity}]}',
        b'{"items": NaN}',
        # A deadline that is not a number (`true` was read as 1 ms, "5000" as 5 s).
        b'{"items": [' + ITEM_JSON + b'], "deadline_ms": true}',
        b'{"items": [' + ITEM_JSON + b'], "deadline_ms": false}',
        b'{"items": [' + ITEM_JSON + b'], "deadline_ms": "5000"}',
        # Unknown fields, top level and per item.
        b'{"items": [' + ITEM_JSON + b'], "temperature": 0.7}',
        b'{"items": [{"prompt": "p", "response": "r", "score": 1.0}]}',
        b'{"items": [{"prompt": "p", "response": "r", "extra": NaN}]}',
    ],
)
def test_invalid_bodies_get_422_invalid_request(http, body):
    assert_error(post_raw(http, body), 422, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        b'{"query": "p r"}',
        b'{"query": [1]}',
        b'{"query": null}',
        b'{"query": ["\\ud800"], "prompts": [""]}',
        b'{"query": ["ok"], "prompts": ["\\udfff"]}',
        b'{"query": ["caf\xe9"], "prompts": [""]}',
        b'{"query": ' + DEEP + b"}",
        b'{"query": ["a"], "prompts": ["a"], "labels": ' + DEEP + b"}",
        b'{"query": NaN}',
    ],
)
def test_invalid_openrlhf_bodies_get_422_invalid_request(http, body):
    assert_error(post_raw(http, body, "/get_reward"), 422, "invalid_request")


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b'{"pairs": []}', "text/plain", "expected Content-Type application/json"),
        (b'{"pairs": [', "application/json", "cannot be parsed as JSON"),
        (b'{"pairs": [{"prompt": "p", "response_1": "a"}]}', "application/json", "response_2"),
    ],
)
def test_the_consistency_route_refuses_bad_bodies_as_the_scoring_routes_do(
    http, body, content_type, message
):
    response = http.post(
        "/v1/aspects/consistency", content=body, headers={"content-type": content_type}
    )
    assert message in assert_error(response, 422, "invalid_request")["message"]


def test_openrlhf_scores_empty_and_nul_texts(http):
    queries = ["", "p", "p\x00", "\x00q"]
    reply = http.post("/get_reward", json={"query": queries, "prompts": ["", "p", "p", "\x00"]})
    assert reply.status_code == 200, reply.text
    assert len(OpenRLHFResponse.model_validate(reply.json()).rewards) == len(queries)


def test_a_request_id_comes_back_as_the_bytes_it_was_sent_as(http):
    sent = "café-☕-1".encode()  # UTF-8, which the server reads as latin-1 bytes
    response = http.post("/v1/rewards", json={"items": [ITEM]}, headers={"x-request-id": sent})
    assert response.status_code == 200, response.text
    assert dict(response.headers.raw)[b"x-request-id"] == sent


def requests_counted(http: httpx.Client, route: str, status: str) -> float:
    prefix = f'alarm_requests_total{{route="{route}",status="{status}"}} '
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.mark.parametrize("path", ["/v1/rewards", "/get_reward", "/v1/aspects/consistency"])
def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_server_error(server, http, path):
    before = {status: requests_counted(http, path, status) for status in ("499", "500", "422")}
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as connection:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        connection.sendall(head.encode() + b"Content-Length: 1000\r\n\r\n" + b'{"items": [')
    deadline = time.monotonic() + TIMEOUT_S
    while requests_counted(http, path, "499") == before["499"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert requests_counted(http, path, "499") == before["499"] + 1
    assert requests_counted(http, path, "500") == before["500"]
    assert requests_counted(http, path, "422") == before["422"]


def test_unknown_routes_and_methods_get_the_error_shape(http):
    assert_error(http.get("/v2/rewards"), 404, "not_found")
    response = http.put("/v1/rewards", json={"items": [ITEM]})
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_the_server_is_still_ready_and_scores_after_all_of_it(http):
    assert http.get("/readyz").status_code == 200
    assert_scored(http.post("/v1/rewards", json={"items": [ITEM]}), [ITEM])
