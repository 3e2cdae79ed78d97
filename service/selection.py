"""ALaRM's aspect selection by consistency with the holistic reward (docs/method.md section 3).

Pure functions over scored pairs: no torch, no HTTP. For each pair of responses to one
prompt, the holistic preference is sign(h1 - h2); an aspect's is the sign of the difference
of its sequence-level values (flipped for lower-is-better aspects). An aspect's
inconsistency is the share of pairs, among those the holistic reward does not tie, in which
the aspect prefers the other response; pairs the aspect ties count as consistent.

A missing value (an unscored response) is not a tie: it says nothing either way, so a pair
without a holistic value on both sides is left out of every statistic, and a pair without
an aspect's value on both sides out of that aspect's; the reports count what was left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]
Aggregate = Literal["sum", "mean"]


@dataclass(frozen=True)
class ScoredPair:
    """Sequence-level values of one pair: holistic h and each aspect's value (None = none)."""

    holistic: tuple[float | None, float | None]
    aspects: Mapping[str, tuple[float | None, float | None]]


@dataclass(frozen=True)
class AspectConsistency:
    name: str
    direction: Direction
    inconsistency: float | None  # None when no pair was counted
    disagreements: int
    pairs_counted: int  # holistic untied, and both values of this aspect present
    ties: int  # counted pairs the aspect ties (consistent by definition)
    win_rate: float | None  # share of the aspect's untied pairs where it prefers response 1
    missing: int = 0  # pairs left out: this aspect unscored for one response or both


@dataclass(frozen=True)
class ConsistencyReport:
    pairs: int
    holistic_ties: int  # among pairs with both holistic values
    holistic_win_rate: float | None
    aspects: tuple[AspectConsistency, ...]
    holistic_missing: int = 0  # pairs left out of every statistic: no holistic value


def sequence_value(raws: Sequence[float | None], aggregate: Aggregate) -> float | None:
    """One value per response from its scored segments (unscored ones are left out)."""
    scored = [r for r in raws if r is not None]
    if not scored:
        return None
    return sum(scored) if aggregate == "sum" else statistics.fmean(scored)


def preference(
    first: float | None, second: float | None, direction: Direction = "higher"
) -> int | None:
    """+1 prefers the first response, -1 the second, 0 a tie; None when a value is missing."""
    if first is None or second is None:
        return None
    if first == second:
        return 0
    better_first = first > second if direction == "higher" else first < second
    return 1 if better_first else -1


def _win_rate(preferences: Sequence[int | None]) -> float | None:
    decided = [p for p in preferences if p]  # neither a tie (0) nor missing (None)
    return sum(1 for p in decided if p > 0) / len(decided) if decided else None


def consistency(
    pairs: Sequence[ScoredPair], directions: Mapping[str, Direction]
) -> ConsistencyReport:
    all_holistic = [preference(*p.holistic) for p in pairs]
    # A pair without a holistic value on both sides is in no figure, the aspects' win rates
    # and missing counts included.
    judged = [(p, h) for p, h in zip(pairs, all_holistic, strict=True) if h is not None]
    holistic = [h for _, h in judged]
    results = []
    for name, direction in directions.items():
        aspect = [preference(*p.aspects[name], direction) for p, _ in judged]
        counted = [(h, a) for h, a in zip(holistic, aspect, strict=True) if h and a is not None]
        disagreements = sum(1 for h, a in counted if a == -h)
        results.append(
            AspectConsistency(
                name=name,
                direction=direction,
                inconsistency=disagreements / len(counted) if counted else None,
                disagreements=disagreements,
                pairs_counted=len(counted),
                ties=sum(1 for _, a in counted if a == 0),
                win_rate=_win_rate(aspect),
                missing=sum(1 for a in aspect if a is None),
            )
        )
    return ConsistencyReport(
        pairs=len(pairs),
        holistic_ties=sum(1 for h in holistic if h == 0),
        holistic_win_rate=_win_rate(holistic),
        aspects=tuple(results),
        holistic_missing=len(pairs) - len(judged),
    )


def select(
    report: ConsistencyReport, top_k: int | None = None, max_inconsistency: float | None = None
) -> list[str]:
    """Aspects to keep: all under `max_inconsistency`, else the best `top_k`, else the
    lowest inconsistency (ties kept together), as the paper kept one aspect per task."""
    ranked = sorted(
        (a for a in report.aspects if a.inconsistency is not None),
        key=lambda a: (a.inconsistency, a.name),
    )
    if max_inconsistency is not None:
        return [a.name for a in ranked if a.inconsistency <= max_inconsistency]  # type: ignore[operator]
    if top_k is not None:
        return [a.name for a in ranked[:top_k]]
    if not ranked:
        return []
    best = ranked[0].inconsistency
    return [a.name for a in ranked if a.inconsistency == best]
