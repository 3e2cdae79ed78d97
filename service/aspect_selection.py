"""Score response pairs through the engine and measure each aspect's consistency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.config import RewardConfig
from service.engine import ScoredItem, ScoreInput, ScoringEngine
from service.selection import ConsistencyReport, ScoredPair, consistency, sequence_value


@dataclass(frozen=True)
class ResponsePair:
    prompt: str
    response_1: str
    response_2: str


def _values(scored: ScoredItem, config: RewardConfig) -> dict[str, float | None]:
    return {
        spec.name: sequence_value(
            [s.raw for s in scored.combined.aspects[spec.name].segments], spec.aggregate
        )
        for spec in config.aspects
    }


def to_scored_pairs(
    first: Sequence[ScoredItem], second: Sequence[ScoredItem], config: RewardConfig
) -> list[ScoredPair]:
    pairs = []
    for one, two in zip(first, second, strict=True):
        values_1, values_2 = _values(one, config), _values(two, config)
        pairs.append(
            ScoredPair(
                holistic=(one.combined.holistic_raw, two.combined.holistic_raw),
                aspects={name: (values_1[name], values_2[name]) for name in values_1},
            )
        )
    return pairs


async def measure_consistency(
    engine: ScoringEngine,
    config: RewardConfig,
    pairs: Sequence[ResponsePair],
    trainer: str = "anonymous",
    chunk_items: int | None = None,
) -> ConsistencyReport:
    """Both responses of every pair through every model, then the consistency metric."""
    chunk = chunk_items or config.limits.max_items_per_request
    items = [ScoreInput(p.prompt, p.response_1) for p in pairs] + [
        ScoreInput(p.prompt, p.response_2) for p in pairs
    ]
    scored: list[ScoredItem] = []
    for start in range(0, len(items), chunk):
        scored += await engine.score(items[start : start + chunk], trainer=trainer)
    first, second = scored[: len(pairs)], scored[len(pairs) :]
    directions = {spec.name: spec.selection_direction for spec in config.aspects}
    return consistency(to_scored_pairs(first, second, config), directions)
