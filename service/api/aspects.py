"""`POST /v1/aspects/consistency`: ALaRM's aspect selection on a trainer's own rollouts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.api.disconnect import cancel_on_disconnect
from service.api.lean_route import LeanScoringRoute
from service.api.routes import (
    ERROR_RESPONSES,
    check_limits,
    documented,
    engine_of,
    operation_extra,
    scoring_trainer_of,
    state_of,
)
from service.aspect_selection import ResponsePair, measure_consistency
from service.engine import ScoreInput
from service.schemas import AspectConsistencyResult, ConsistencyRequest, ConsistencyResponse
from service.selection import select

router = APIRouter(route_class=LeanScoringRoute)  # the scoring routes' parsing and errors


@router.post(
    "/v1/aspects/consistency",
    response_model=ConsistencyResponse,
    responses=documented(ERROR_RESPONSES),
    openapi_extra=operation_extra(key=True),
)
async def aspect_consistency(
    body: ConsistencyRequest, request: Request, trainer: str = Depends(scoring_trainer_of)
) -> ConsistencyResponse:
    """How consistent each aspect is with the holistic reward on these response pairs.

    Both responses of each pair are scored by every model; an aspect's inconsistency is the
    share of pairs, among those the holistic reward does not tie, where the aspect prefers
    the other response (ties are consistent). `selected` applies `max_inconsistency` or
    `top_k`, else keeps the lowest, as ALaRM kept one aspect per task.
    """
    engine = engine_of(request)
    config = state_of(request).config
    pairs = [ResponsePair(p.prompt, p.response_1, p.response_2) for p in body.pairs]
    check_limits(
        [ScoreInput(p.prompt, r) for p in pairs for r in (p.response_1, p.response_2)],
        config.limits,
        lambda index, field: (
            f"pairs.{index // 2}." + (field if field == "prompt" else f"response_{index % 2 + 1}")
        ),
    )
    report = await cancel_on_disconnect(
        request, measure_consistency(engine, config, pairs, trainer)
    )
    selected = select(report, body.top_k, body.max_inconsistency)
    return ConsistencyResponse(
        pairs=report.pairs,
        holistic_ties=report.holistic_ties,
        holistic_missing=report.holistic_missing,
        holistic_win_rate=report.holistic_win_rate,
        aspects=[
            AspectConsistencyResult(
                name=a.name,
                direction=a.direction,
                inconsistency=a.inconsistency,
                disagreements=a.disagreements,
                pairs_counted=a.pairs_counted,
                ties=a.ties,
                win_rate=a.win_rate,
                missing=a.missing,
                selected=a.name in selected,
            )
            for a in report.aspects
        ],
        selected=selected,
        reward_definition=engine.catalog.reward_definition(config.combination.mode),
    )
