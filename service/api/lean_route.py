"""A route class for the scoring endpoints that skips FastAPI's generic per-request work.

Per request, FastAPI solves an endpoint's parameters generically (a dependency graph, the
body parsed into Python objects and then validated, the returned model validated again and
serialised through its response field). The event loop bounds a host-bound GPU's
throughput, and in `benchmarks.host_ceiling` (single-item requests, C=64 and 256) it spent
1.35 ms per request through FastAPI's generic route and 0.96 ms through this one
(benchmarks/HISTORY.md, session 11). `LeanScoringRoute` keeps everything
FastAPI derives from the endpoint's signature (OpenAPI, 405s, the route label of the HTTP
metrics, the error handlers) and does the per-request part itself: the trainer dependency
the endpoint declares is called, the body is parsed and validated in one pass by
pydantic-core, the deadline header is read, and the returned model is serialised as is.
Bad input gets the same 422 `invalid_request` errors as through FastAPI (locations start
with `body` or `header`).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Coroutine, Sequence
from email.message import Message
from types import MethodType
from typing import Annotated, Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from service.schemas import MAX_ITEMS

# What an endpoint served by this class takes, by name (checked when the route is built):
# all of these, or all but the deadline header.
SCORING_PARAMETERS = ("body", "request", "deadline_header_ms", "trainer")
WITHOUT_DEADLINE = tuple(name for name in SCORING_PARAMETERS if name != "deadline_header_ms")
DEADLINE_HEADER = "X-Request-Deadline-Ms"
M = TypeVar("M", bound=BaseModel)


def _located(errors: Sequence[Any], *prefix: str) -> list[dict[str, Any]]:
    return [{**error, "loc": (*prefix, *error.get("loc", ()))} for error in errors]


@functools.lru_cache(maxsize=64)  # clients send a few spellings; parsing one is slow
def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: `application/json` or `application/*+json`, parameters aside."""
    if not content_type:
        return False
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse_json_body(
    model: type[M], raw: bytes, content_type: str | None, max_items: int | None = None
) -> M:
    """`raw` validated as `model`, or a `RequestValidationError` located in the body.

    pydantic-core parses and validates in one pass. What it cannot parse goes through
    Python's parser once more, for its reading of what it accepts and pydantic-core does
    not (a lone surrogate escape, which the schema then refuses by name) and for its errors.
    """
    if not raw:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}]
        )
    if not _is_json(content_type):
        message = f"expected Content-Type application/json, got {content_type or 'none'}"
        raise RequestValidationError([{"type": "content_type", "loc": ("body",), "msg": message}])
    context = {MAX_ITEMS: max_items}  # a longer list is refused before its items are read
    try:
        return model.model_validate_json(raw, context=context)
    except ValidationError as exc:
        if not any(error["type"] == "json_invalid" for error in exc.errors()):
            raise RequestValidationError(_located(exc.errors(), "body")) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        message = f"cannot be parsed as JSON ({type(exc).__name__}: {exc})"
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": message}]
        ) from None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise RequestValidationError(_located(exc.errors(), "body")) from None


def deadline_header_adapter(route: APIRoute) -> TypeAdapter[Any]:
    """A validator for the deadline header as the endpoint declares it (type and limits),
    so that the rule is stated once, in the signature that also becomes openapi.yaml."""
    (field,) = [p for p in route.dependant.header_params if p.alias == DEADLINE_HEADER]
    declared: Any = Annotated[field.field_info.annotation, *field.field_info.metadata]
    return TypeAdapter(declared)


def parse_deadline_header(adapter: TypeAdapter[Any], value: str | None) -> float | None:
    """The deadline header in milliseconds, None if absent; a 422 located in the header."""
    if value is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError(_located(exc.errors(), "header", DEADLINE_HEADER)) from None


class LeanScoringRoute(APIRoute):
    """For endpoints taking exactly `SCORING_PARAMETERS`, or those but the deadline header;
    `trainer` is the one declared dependency, called with the request first (so a missing
    key is a 401 whatever the body), and `app.dependency_overrides` does not reach it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint
        names = tuple(inspect.signature(endpoint).parameters)
        if names not in (SCORING_PARAMETERS, WITHOUT_DEADLINE):
            raise TypeError(f"{endpoint.__name__} takes {names}, expected {SCORING_PARAMETERS}")
        body_model = self.body_field.field_info.annotation if self.body_field else None
        if not (isinstance(body_model, type) and issubclass(body_model, BaseModel)):
            raise TypeError(f"{endpoint.__name__}: `body` must be a pydantic model")
        (trainer_dependency,) = [d for d in self.dependant.dependencies if d.name == "trainer"]
        call = trainer_dependency.call
        assert call is not None
        # A callable instance (the API key's security scheme, service.api.routes.ApiKeyCheck)
        # is called through its bound `__call__`: the same call, no per-request lookup.
        trainer_of = call if inspect.isfunction(call) else MethodType(type(call).__call__, call)
        deadline_ms_of = deadline_header_adapter(self) if names == SCORING_PARAMETERS else None

        async def handle(request: Request) -> Response:
            trainer = await trainer_of(request)
            limits = request.app.state.alarm.config.limits
            body = parse_json_body(
                body_model,
                await request.body(),
                request.headers.get("content-type"),
                limits.max_items_per_request,
            )
            parameters: dict[str, Any] = {"body": body, "request": request, "trainer": trainer}
            if deadline_ms_of is not None:
                header = request.headers.get(DEADLINE_HEADER)
                parameters["deadline_header_ms"] = parse_deadline_header(deadline_ms_of, header)
            result: BaseModel = await endpoint(**parameters)
            return Response(result.model_dump_json(), media_type="application/json")

        return handle
