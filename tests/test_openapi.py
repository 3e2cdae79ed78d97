"""openapi.yaml is generated from the app; this fails when the two drift apart, or when the
app sends what the contract does not declare."""

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from service.__main__ import render_openapi
from service.config import RewardConfig, ServiceSettings, load_reward_config
from tests.conftest import tiny_config_dict, wait_ready

SPEC = Path(__file__).resolve().parents[1] / "openapi.yaml"
SCORING_BODIES = {
    "/v1/rewards": {"items": [{"prompt": "p", "response": "r"}]},
    "/get_reward": {"query": ["p r"], "prompts": ["p"]},
    "/v1/aspects/consistency": {"pairs": [{"prompt": "p", "response_1": "a", "response_2": "b"}]},
}
# Framing, not contract: the ASGI server and the content itself account for these.
FRAMING_HEADERS = {"content-length", "content-type", "transfer-encoding", "date", "server"}
KEY = "key-of-alpha"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC.read_text())


def test_openapi_yaml_matches_the_served_schema(spec):
    served = yaml.safe_load(render_openapi())
    assert spec == served, "openapi.yaml is stale: run `make openapi`"


def test_every_route_is_in_the_contract(spec):
    paths = spec["paths"]
    assert {"/v1/rewards", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    errors = paths["/v1/rewards"]["post"]["responses"]
    assert {"200", "413", "422", "503"} <= set(errors)


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    ]


def test_every_operation_takes_and_returns_a_request_id_and_says_when_a_key_is_optional(spec):
    schemes = spec["components"]["securitySchemes"]
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["ApiKey"].items()
    for method, path, operation in operations(spec):
        where = f"{method} {path}"
        parameters = {(p["in"], p["name"]): p for p in operation.get("parameters", [])}
        request_id = parameters[("header", "X-Request-ID")]
        assert not request_id["required"], where
        for status, response in operation["responses"].items():
            assert "X-Request-ID" in response.get("headers", {}), f"{where} {status}"
        assert "413" in operation["responses"], where  # the byte cap, on every route
        if "401" in operation["responses"]:
            # A key is needed only where the server has keys configured: anonymous is allowed.
            assert operation["security"] == [{"ApiKey": []}, {}], where
        else:
            assert "security" not in operation, where


def contract_breaches(spec: dict[str, Any], reply: httpx.Response) -> list[str]:
    """What `reply` sent that its route and status do not declare, and the reverse."""
    request = reply.request
    method, path, status = request.method, request.url.path, reply.status_code
    where = f"{method} {path} -> {status}"
    operation = spec["paths"][path][method.lower()]
    declared = operation["responses"].get(str(status)) or operation["responses"].get("default")
    if declared is None:
        return [f"{where}: the status is not declared"]
    headers = {name.lower(): header for name, header in declared.get("headers", {}).items()}
    sent = {name.lower() for name in reply.headers} - FRAMING_HEADERS
    breaches = [f"{where}: sends {name}, undeclared" for name in sorted(sent - set(headers))]
    breaches += [
        f"{where}: declares {name} required, not sent"
        for name, header in headers.items()
        if header.get("required") and name not in sent
    ]
    if status == 401:
        schemes = spec.get("components", {}).get("securitySchemes", {})
        bearer = {
            name
            for name, s in schemes.items()
            if (s["type"], s.get("scheme")) == ("http", "bearer")
        }
        if not any(bearer & set(requirement) for requirement in operation.get("security", [])):
            breaches.append(f"{where}: refuses a missing key, declares no bearer scheme")
    elif "authorization" not in request.headers and operation.get("security", [{}]).count({}) == 0:
        breaches.append(f"{where}: served without a key, yet the contract requires one")
    if status >= 400 and "application/json" not in declared.get("content", {}):
        breaches.append(f"{where}: the error body is not declared")
    return breaches


async def served(app) -> tuple[Any, httpx.AsyncClient]:
    lifespan = LifespanManager(app, startup_timeout=120, shutdown_timeout=60)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=lifespan.app), base_url="http://t")
    return lifespan, client


async def test_every_header_the_app_sends_is_declared_for_its_route_and_status(
    spec, tiny_paths, tmp_path
):
    """Against the real app with keys and a rate limit: 200, 401, 413, 422, 429 and 504 on
    every route that can answer them, and the request id as sent, cut to 128 characters."""
    from service.api import create_app

    limits = {
        "max_request_bytes": 4096,
        "max_requests_per_second_per_trainer": 0.001,  # no refill during the test
        "request_burst_per_trainer": 7,  # the scoring requests below before the 429s
    }
    # One model, the holistic one, and a rule aspect: quick to load.
    length = {"name": "length", "kind": "rule", "unit": "words", "mean": 20, "weight": 0.5}
    sections = {"limits": limits, "aspects": [length]}
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, **sections))
    settings = ServiceSettings(
        cache_dir=tmp_path, api_keys=f"alpha:{KEY}", metrics_require_auth=True
    )
    app = create_app(settings, config, registry=CollectorRegistry())
    replies: list[httpx.Response] = []
    lifespan, client = await served(app)
    try:
        await wait_ready(client)
        long_id = "r" * 200
        send = client.request
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            replies.append(await send("GET", path))
            replies.append(await send("GET", path, headers={**BEARER, "X-Request-ID": long_id}))
        for path, body in SCORING_BODIES.items():
            replies.append(await send("POST", path, json=body))  # 401
            replies.append(await send("POST", path, json=body, headers=BEARER))  # 200
            replies.append(await send("POST", path, json={}, headers=BEARER))  # 422
        deadline = {**BEARER, "X-Request-Deadline-Ms": "0.000001"}
        replies.append(
            await send("POST", "/v1/rewards", json=SCORING_BODIES["/v1/rewards"], headers=deadline)
        )
        for path, body in SCORING_BODIES.items():
            replies.append(await send("POST", path, json=body, headers=BEARER))  # 429
        big = b"x" * 5000  # refused by its Content-Length, before routing
        replies.append(await send("POST", "/v1/rewards", content=big, headers=BEARER))
        replies.append(await send("GET", "/healthz", content=big))
        # 404 and 405 have no operation to be declared on; the ErrorResponse schema names them.
        for method, path in (("GET", "/nowhere"), ("GET", "/v1/rewards")):
            refused = await send(method, path)
            assert refused.json()["error"]["request_id"] == refused.headers["x-request-id"]
        assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)

    statuses = {(r.request.url.path, r.status_code) for r in replies}
    for path in SCORING_BODIES:
        assert {(path, 200), (path, 401), (path, 422), (path, 429)} <= statuses, path
    assert {("/v1/rewards", 504), ("/v1/rewards", 413), ("/healthz", 413)} <= statuses
    assert {("/metrics", 401), ("/v1/models", 401), ("/v1/models", 200)} <= statuses
    assert [r.headers["x-request-id"] for r in replies if "x-request-id" in r.request.headers] == [
        long_id[:128]
    ] * 4
    breaches = [b for reply in replies for b in contract_breaches(spec, reply)]
    assert not breaches, "\n".join(breaches)


async def test_headers_of_a_service_that_is_not_ready_are_declared(spec, tmp_path):
    """No keys configured (every route open) and models that failed to load: 503s."""
    from service.api import create_app

    def fail(config, cache_dir):
        raise RuntimeError("no models in this test")

    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        load_reward_config(None),
        registry=CollectorRegistry(),
        load=fail,
    )
    replies: list[httpx.Response] = []
    lifespan, client = await served(app)
    try:
        with pytest.raises(AssertionError, match="loading failed"):
            await wait_ready(client, timeout_s=30)
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
            replies.append(await client.get(path))
        for path, body in SCORING_BODIES.items():
            replies.append(await client.post(path, json=body))
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)

    assert [r.status_code for r in replies] == [200, 503, 200, 503, 503, 503, 503]
    breaches = [b for reply in replies for b in contract_breaches(spec, reply)]
    assert not breaches, "\n".join(breaches)
