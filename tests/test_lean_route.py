"""`LeanScoringRoute`: the scoring endpoints' own per-request handling (not FastAPI's)."""

import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError

from service.api.lean_route import (
    LeanScoringRoute,
    deadline_header_adapter,
    parse_deadline_header,
    parse_json_body,
)
from service.api.routes import scoring_router
from service.schemas import RewardRequest, RewardResponse


def test_an_endpoint_with_other_parameters_is_refused_when_the_route_is_built():
    router = APIRouter(route_class=LeanScoringRoute)

    async def score(body: RewardRequest, request: Request) -> RewardResponse:
        raise AssertionError("never called")

    with pytest.raises(TypeError, match="expected"):
        router.post("/score")(score)


def test_an_endpoint_without_the_deadline_header_is_served_without_it():
    router = APIRouter(route_class=LeanScoringRoute)

    async def anyone(request: Request) -> str:
        return "anyone"

    async def score(
        body: RewardRequest, request: Request, trainer: str = Depends(anyone)
    ) -> RewardResponse:
        raise AssertionError("never called")

    router.post("/score")(score)  # built: before, only the four-parameter form was
    assert not router.routes[0].dependant.header_params  # nothing declared, nothing read


def test_python_reads_what_pydantic_core_cannot_and_the_schema_names_the_problem():
    body = b'{"items": [{"prompt": "p", "response": "bad \\ud800 text"}]}'
    with pytest.raises(RequestValidationError) as caught:
        parse_json_body(RewardRequest, body, "application/json")
    (error,) = caught.value.errors()
    assert error["loc"] == ("body", "items", 0, "response")
    assert "Unicode" in error["msg"]


@pytest.mark.parametrize(
    "body", [b'{"items": [', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000], ids=str
)
def test_what_no_parser_reads_is_invalid_json_in_the_body(body):
    with pytest.raises(RequestValidationError) as caught:
        parse_json_body(RewardRequest, body, "application/json")
    (error,) = caught.value.errors()
    assert error["type"] == "json_invalid" and error["loc"] == ("body",)


def test_a_valid_body_is_parsed_in_one_pass():
    body = b'{"items": [{"prompt": "p", "response": "r", "id": "a"}], "deadline_ms": 5}'
    parsed = parse_json_body(RewardRequest, body, "application/json")
    assert parsed.items[0].id == "a" and parsed.deadline_ms == 5


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("250", 250.0), ("0.5", 0.5)])
def test_the_deadline_header_is_read_in_milliseconds(value, expected):
    adapter = deadline_header_adapter(scoring_router.routes[0])
    assert parse_deadline_header(adapter, value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_deadline_header_that_is_not_a_positive_finite_number_is_refused(value):
    adapter = deadline_header_adapter(scoring_router.routes[0])  # the declared rule
    with pytest.raises(RequestValidationError) as caught:
        parse_deadline_header(adapter, value)
    assert caught.value.errors()[0]["loc"] == ("header", "X-Request-Deadline-Ms")


def test_only_request_models_run_the_unknown_field_check():
    """Response models are built per item on the event loop; a Python validator on each
    took a scored item's result from 16 to 28 µs (session 33). Only requests need it."""
    from pydantic import BaseModel

    from service import schemas

    requests = {"RewardItem", "RewardRequest", "ResponsePairIn", "ConsistencyRequest"}
    wire = [
        model
        for model in vars(schemas).values()
        if isinstance(model, type)
        and issubclass(model, schemas._Wire)
        and not model.__name__.startswith("_")  # the bases themselves
    ]
    assert requests <= {model.__name__ for model in wire}
    for model in wire:
        assert issubclass(model, BaseModel)
        checked = bool(model.__pydantic_decorators__.model_validators)
        assert checked == (model.__name__ in requests), model.__name__
