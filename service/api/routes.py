"""Thin HTTP routes: validate, call the engine, map the result. Docstrings are API docs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.openapi.models import HTTPBearer as HTTPBearerScheme
from fastapi.security.base import SecurityBase
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import WithJsonSchema

from service.api.disconnect import cancel_on_disconnect
from service.api.lean_route import DEADLINE_HEADER, LeanScoringRoute
from service.combine import CombineMode
from service.config import LimitsConfig
from service.engine import ScoredItem, ScoreInput, ScoringEngine
from service.engine_link import ENGINE_GONE
from service.errors import NotReady, PayloadTooLarge, TooManyRequests, check_item_count
from service.schemas import (
    AspectResult,
    DenseReward,
    ErrorResponse,
    HealthResponse,
    HolisticResult,
    ModelInfo,
    ModelsResponse,
    RewardItem,
    RewardRequest,
    RewardResponse,
    RewardResult,
    SegmentResult,
)

router = APIRouter()
# The scoring hot path: see service.api.lean_route.
scoring_router = APIRouter(route_class=LeanScoringRoute)
# A deadline as a header, for clients that cannot add a body field (or speak a fixed body).
DeadlineHeaderMs = Annotated[
    float | None,
    # Absent means no deadline; a header cannot carry a JSON null, so don't document one.
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0}),
    Header(
        alias=DEADLINE_HEADER,
        gt=0,
        allow_inf_nan=False,
        description="Milliseconds from when the server receives the request; work not "
        "scored by then is dropped (504). On `/v1/rewards` the body's `deadline_ms` wins "
        "when both are sent.",
    ),
]
REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128  # what service.api.middleware keeps of a client's id
API_KEY_SCHEME = "ApiKey"
# Headers as OpenAPI header objects: what replies carry besides their body.
RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    REQUEST_ID_HEADER: {
        "description": "The request's own `X-Request-ID` (its first "
        f"{MAX_REQUEST_ID_CHARS} characters), else one the server made; an error body's "
        "`request_id` too.",
        "required": True,
        "schema": {"type": "string", "maxLength": MAX_REQUEST_ID_CHARS},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
    "WWW-Authenticate": {
        "description": "The scheme to send the API key with: `Authorization: Bearer <key>`.",
        "required": True,
        "schema": {"type": "string", "enum": ["Bearer"]},
    },
}
HEADERS_BY_STATUS: dict[int | str, tuple[str, ...]] = {
    401: ("WWW-Authenticate",),
    429: ("Retry-After",),
    503: ("Retry-After",),
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    413: {
        "model": ErrorResponse,
        "description": "Too many items, a text too long, or a body over max_request_bytes.",
    },
    422: {"model": ErrorResponse, "description": "Malformed or invalid request."},
    500: {"model": ErrorResponse, "description": "A model failed on this request's batch."},
    429: {
        "model": ErrorResponse,
        "description": "This trainer is over its limit; see Retry-After.",
    },
    503: {"model": ErrorResponse, "description": "Overloaded or not ready; see Retry-After."},
}
DEADLINE_RESPONSE: dict[int | str, dict[str, Any]] = {
    504: {
        "model": ErrorResponse,
        "description": "The request's deadline passed before it was scored; the work was dropped.",
    },
}
# The middleware's cap on any request's body, by its Content-Length, before routing.
BODY_CAP_RESPONSE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "A body over max_request_bytes."},
}


def documented(responses: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`, with the 413 of the body cap that every route has, and the
    headers each reply carries: `X-Request-ID` on every one (200 included), `Retry-After` on
    429 and 503, `WWW-Authenticate` on 401. Fresh dicts per route: FastAPI merges these
    into the operation it builds."""
    documented = {200: {}, **BODY_CAP_RESPONSE, **responses}
    return {
        status: {
            **response,
            "headers": {
                name: dict(RESPONSE_HEADERS[name])
                for name in (REQUEST_ID_HEADER, *HEADERS_BY_STATUS.get(status, ()))
            },
        }
        for status, response in documented.items()
    }


def operation_extra(key: bool = False) -> dict[str, Any]:
    """What an operation declares beyond its signature: the `X-Request-ID` header every route
    takes (read by the middleware, never by the endpoint) and, with `key`, that a caller may
    also come without an API key (`{}`: needed only where the server has keys configured).
    The key's scheme itself comes with the dependency that checks it (`ApiKeyCheck`)."""
    request_id = {
        "name": REQUEST_ID_HEADER,
        "in": "header",
        "required": False,
        "description": "An id to trace this request by, echoed in the reply's `X-Request-ID` "
        f"and an error body's `request_id`; only its first {MAX_REQUEST_ID_CHARS} characters "
        "are kept. Without one, the server makes one.",
        "schema": {"type": "string"},
    }
    extra: dict[str, Any] = {"parameters": [request_id]}
    if key:
        extra["security"] = [{}]
    return extra


def state_of(request: Request) -> Any:
    return request.app.state.alarm


def engine_of(request: Request) -> ScoringEngine:
    state = state_of(request)
    if state.engine is None:
        if state.engine_lost:
            raise NotReady(ENGINE_GONE)
        if state.load_error:
            raise NotReady(f"model loading failed: {state.load_error}", retry_after_s=30)
        raise NotReady("models are still loading")
    return state.engine


def trainer_of(request: Request) -> str:
    """The calling trainer, from its `Authorization: Bearer <key>` header (401 otherwise)."""
    return str(state_of(request).auth.trainer_for(request.headers.get("authorization")))


class ApiKeyCheck(SecurityBase):
    """A trainer dependency that is also the API key's HTTP bearer scheme in openapi.yaml:
    FastAPI lists a dependency that is a `SecurityBase` as the operation's security, and
    calls it like any other, so declaring the scheme adds no work per request (the scoring
    routes' `LeanScoringRoute` calls it directly). Subclasses' `__call__` is the check."""

    def __init__(self) -> None:
        self.model = HTTPBearerScheme(
            description="A trainer's API key, as `Authorization: Bearer <key>` (no other "
            "header or scheme is read). Checked only where the server has keys configured "
            "(`ALARM_API_KEYS` or `ALARM_API_KEYS_FILE`); otherwise the header is not read and "
            "every caller is the trainer `anonymous`."
        )
        self.scheme_name = API_KEY_SCHEME


# Dependencies are coroutines: FastAPI runs a plain `def` dependency in a thread pool,
# one thread hop per request for a dictionary lookup.
class _AuthenticatedTrainer(ApiKeyCheck):
    async def __call__(self, request: Request) -> str:
        return trainer_of(request)


class _ScoringTrainer(ApiKeyCheck):
    async def __call__(self, request: Request) -> str:
        """The calling trainer, within its request-rate limit (429 + Retry-After beyond it)."""
        trainer = trainer_of(request)
        state = state_of(request)
        limiter = state.rate_limiter
        if limiter is not None:
            wait_s = await state.rate_limit_wait(limiter, trainer)
            if wait_s > 0:
                state.metrics.trainer_rate_limited.labels(trainer).inc()
                raise TooManyRequests(
                    f"trainer {trainer!r} is over its limit of {limiter.rate:g} requests/s",
                    retry_after_s=wait_s,
                )
        return trainer


authenticated_trainer = _AuthenticatedTrainer()
scoring_trainer_of = _ScoringTrainer()


def deadline_of(request: Request, deadline_ms: float | None) -> float | None:
    """The absolute `time.monotonic()` deadline of a budget counted from the request's arrival."""
    if deadline_ms is None:
        return None
    received_at = getattr(request.state, "received_at", None)
    return (time.monotonic() if received_at is None else received_at) + deadline_ms / 1000


def item_field(index: int, field: str) -> str:
    """Where `/v1/rewards`' body holds an item's text."""
    return f"items.{index}.{field}"


def check_limits(
    items: Sequence[ScoreInput],
    limits: LimitsConfig,
    locate: Callable[[int, str], str] = item_field,
) -> None:
    """The item and text limits; a text over its limit is named where the caller's body
    holds it (`locate(index, "prompt" | "response")`), since each route lays items out its
    own way."""
    check_item_count(len(items), limits.max_items_per_request)
    for index, item in enumerate(items):
        for field in ("prompt", "response"):
            size = len(getattr(item, field))
            if size > limits.max_text_chars:
                raise PayloadTooLarge(
                    f"{locate(index, field)}: {size} characters exceed "
                    f"max_text_chars={limits.max_text_chars}"
                )


def _to_result(item: RewardItem, scored: ScoredItem) -> RewardResult:
    c = scored.combined
    return RewardResult(
        id=item.id,
        reward=c.reward,
        holistic=HolisticResult(raw=c.holistic_raw, normalized=c.holistic_normalized),
        gate_passed=c.gate_passed,
        aspects_applied=c.aspects_applied,
        degenerate=c.degenerate,
        aspects={
            name: AspectResult(
                value=a.value,
                segments=[
                    SegmentResult(start=s.start, end=s.end, raw=s.raw, reward=s.reward)
                    for s in a.segments
                ],
            )
            for name, a in c.aspects.items()
        },
        dense=[DenseReward(end=d.end, reward=d.reward) for d in c.dense],
        truncated=scored.truncated,
    )


@scoring_router.post(
    "/v1/rewards",
    response_model=RewardResponse,
    responses=documented({**ERROR_RESPONSES, **DEADLINE_RESPONSE}),
    openapi_extra=operation_extra(key=True),
)
async def score_rewards(
    body: RewardRequest,
    request: Request,
    deadline_header_ms: DeadlineHeaderMs = None,
    trainer: str = Depends(scoring_trainer_of),
) -> RewardResponse:
    """Score (prompt, response) items with ALaRM hierarchical rewards.

    One result per item, in order. `dense` holds the per-position rewards keyed to
    character end offsets of the response (the holistic term at `end == len(response)`);
    its sum is `reward`. `reward_definition` identifies the models and parameters used.

    With a deadline (`deadline_ms` or the `X-Request-Deadline-Ms` header: milliseconds
    from when the server receives the request), work that has not reached a model in time
    is dropped and the request fails with 504 `deadline_exceeded`.
    """
    engine = engine_of(request)
    config = state_of(request).config
    items = [ScoreInput(i.prompt, i.response) for i in body.items]
    check_limits(items, config.limits)
    mode = body.mode or config.combination.mode
    deadline_ms = body.deadline_ms if body.deadline_ms is not None else deadline_header_ms
    scored = await cancel_on_disconnect(
        request, engine.score(items, mode, trainer, deadline_of(request, deadline_ms))
    )
    return RewardResponse(
        results=[_to_result(item, s) for item, s in zip(body.items, scored, strict=True)],
        reward_definition=engine.catalog.reward_definition(mode),
    )


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses=documented({401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]}),
    openapi_extra=operation_extra(key=True),
)
async def list_models(request: Request, _: str = Depends(authenticated_trainer)) -> ModelsResponse:
    """The loaded models, their devices, the combination parameters and request limits."""
    engine = engine_of(request)
    config = state_of(request).config
    return ModelsResponse(
        models=[ModelInfo(**m) for m in engine.catalog.describe_models()],
        combination=config.combination.model_dump(mode="json"),
        batching=config.batching.model_dump(mode="json"),
        limits=config.limits.model_dump(mode="json"),
        reward_definitions={m.value: engine.catalog.reward_definition(m) for m in CombineMode},
    )


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses=documented({}),
    openapi_extra=operation_extra(),
)
async def healthz() -> HealthResponse:
    """Liveness: the process is up and serving HTTP."""
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses=documented({503: ERROR_RESPONSES[503]}),
    openapi_extra=operation_extra(),
)
async def readyz(request: Request) -> HealthResponse:
    """Readiness: every model is loaded and has scored a warm-up item."""
    engine_of(request)
    return HealthResponse(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses=documented({200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]}),
    # The key is checked in the endpoint, as configured (metrics_require_auth): declared here.
    openapi_extra={**operation_extra(), "security": [{API_KEY_SCHEME: []}, {}]},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (prefix `alarm_`); needs an API key if so configured."""
    if state_of(request).settings.metrics_require_auth:
        trainer_of(request)
    return Response(await state_of(request).scrape(), media_type=CONTENT_TYPE_LATEST)
