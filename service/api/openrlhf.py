"""`POST /get_reward`: OpenRLHF's remote reward-model protocol over the same engine."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.disconnect import cancel_on_disconnect
from service.api.lean_route import LeanScoringRoute
from service.api.routes import (
    DEADLINE_RESPONSE,
    ERROR_RESPONSES,
    DeadlineHeaderMs,
    check_limits,
    deadline_of,
    documented,
    engine_of,
    operation_extra,
    scoring_trainer_of,
    state_of,
)
from service.engine import ScoreInput
from service.errors import InvalidRequest
from service.schemas import OpenRLHFRequest, OpenRLHFResponse

router = APIRouter(route_class=LeanScoringRoute)  # a scoring hot path too


def split_queries(body: OpenRLHFRequest, separator: str | None) -> list[ScoreInput]:
    """Recover (prompt, response) from each full text, or refuse with a precise error."""
    if body.prompts is not None:
        if len(body.prompts) != len(body.query):
            raise InvalidRequest(
                f"prompts has {len(body.prompts)} entries for {len(body.query)} queries"
            )
        pairs = []
        for index, (query, prompt) in enumerate(zip(body.query, body.prompts, strict=True)):
            if not query.startswith(prompt):
                raise InvalidRequest(f"query.{index} does not start with prompts.{index}")
            pairs.append(ScoreInput(prompt, query[len(prompt) :]))
        return pairs
    if separator is None:
        raise InvalidRequest(
            "send `prompts`, or configure openrlhf.response_separator on the server"
        )
    pairs = []
    for index, query in enumerate(body.query):
        cut = query.rfind(separator)
        if cut < 0:
            raise InvalidRequest(f"query.{index} does not contain the separator {separator!r}")
        pairs.append(ScoreInput(query[:cut], query[cut + len(separator) :].lstrip()))
    return pairs


@router.post(
    "/get_reward",
    response_model=OpenRLHFResponse,
    responses=documented({**ERROR_RESPONSES, **DEADLINE_RESPONSE}),
    openapi_extra=operation_extra(key=True),
)
async def get_reward(
    body: OpenRLHFRequest,
    request: Request,
    deadline_header_ms: DeadlineHeaderMs = None,
    trainer: str = Depends(scoring_trainer_of),
) -> OpenRLHFResponse:
    """OpenRLHF-compatible scoring: point `--remote_rm_url` at `http://HOST:PORT/get_reward`.

    Each query is a full text; its prompt is the matching `prompts` entry (a prefix of the
    query) or, without `prompts`, everything before the configured response separator.
    OpenRLHF's body has no deadline field: send `X-Request-Deadline-Ms` for one.
    """
    engine = engine_of(request)
    config = state_of(request).config
    items = split_queries(body, config.openrlhf.response_separator)

    def locate(index: int, field: str) -> str:
        if field == "prompt" and body.prompts is not None:
            return f"prompts.{index}"
        return f"query.{index}'s {field}"

    check_limits(items, config.limits, locate)
    scored = []
    if items:
        deadline = deadline_of(request, deadline_header_ms)
        scoring = engine.score(items, config.combination.mode, trainer, deadline)
        scored = await cancel_on_disconnect(request, scoring)
    rewards = [s.combined.reward for s in scored]
    logs: dict[str, list[float]] = {
        "holistic": [s.combined.holistic_normalized for s in scored],
        "gate_passed": [float(s.combined.gate_passed) for s in scored],
    }
    for name in (a.name for a in config.aspects):
        logs[f"aspect/{name}"] = [s.combined.aspects[name].value for s in scored]
    return OpenRLHFResponse(rewards=rewards, scores=rewards, extra_logs=logs)
