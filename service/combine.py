"""ALaRM's hierarchical reward combination (docs/method.md section 2), as pure per-response math.

No torch and no batching here: a response's reward depends only on its own scores and the
static parameters, so it cannot depend on what else shared its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class CombineMode(StrEnum):
    hierarchical = "hierarchical"
    weighted_sum = "weighted_sum"
    holistic_only = "holistic_only"
    aspect_only = "aspect_only"


@dataclass(frozen=True)
class HolisticParams:
    """z-normalisation statistics, gate and weight of the holistic reward."""

    mu: float = 0.0
    sigma: float = 1.0
    threshold: float = 0.6  # eps: aspects count only when r_h >= threshold
    weight: float = 5.0  # lambda
    min_response_chars: int = 1  # shorter (after strip) is degenerate; empty always is
    degenerate_floor: float = -10.0  # r_h forced for degenerate responses, in every mode


@dataclass(frozen=True)
class AspectParams:
    """How one aspect's raw value becomes its reward: affine, optional sigmoid, weight."""

    name: str
    weight: float = 1.0
    scale: float = 1.0
    shift: float = 0.0
    sigmoid: bool = True


@dataclass(frozen=True)
class SegmentScore:
    """An aspect's raw value for response characters [start, end); raw None = unscored."""

    start: int
    end: int
    raw: float | None


@dataclass(frozen=True)
class ScoredSegment:
    start: int
    end: int
    raw: float | None
    reward: float | None  # w_k * s(scale * (raw + shift)); None when unscored


@dataclass(frozen=True)
class AspectReward:
    value: float  # sum of the segment rewards, before the gate
    segments: tuple[ScoredSegment, ...]


@dataclass(frozen=True)
class DenseReward:
    end: int  # character end offset in the response
    reward: float


@dataclass(frozen=True)
class CombinedReward:
    reward: float  # sum of dense
    holistic_raw: float | None
    holistic_normalized: float
    degenerate: bool
    gate_passed: bool  # r_h >= threshold (never for a degenerate response)
    aspects_applied: bool  # whether aspect rewards are in `dense` under this mode
    aspects: Mapping[str, AspectReward]
    dense: tuple[DenseReward, ...]


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)  # avoids overflow for very negative z
    return ez / (1.0 + ez)


def shape_aspect_value(raw: float, params: AspectParams) -> float:
    """w_k * s(R_k): the reward one segment contributes at its end position."""
    value = params.scale * (raw + params.shift)
    if params.sigmoid:
        value = sigmoid(value)
    return params.weight * value


def is_degenerate(response: str, params: HolisticParams) -> bool:
    """Empty (nothing but whitespace) or shorter than the minimum, after strip.

    An empty response is degenerate whatever `min_response_chars` says: 0 must not turn the
    floor off for the one response that has nothing to score.
    """
    stripped = response.strip()
    return not stripped or len(stripped) < params.min_response_chars


def normalize_holistic(
    raw: float | None, response: str, params: HolisticParams
) -> tuple[float, bool]:
    """r_h = (h - mu) / sigma, or the floor for degenerate (empty or too short) responses."""
    if raw is None or is_degenerate(response, params):
        return params.degenerate_floor, True
    return (raw - params.mu) / params.sigma, False


def aspects_apply(mode: CombineMode, gate_passed: bool, degenerate: bool = False) -> bool:
    """Whether a_t is in r_t. Never for a degenerate response: the paper's code gives it
    only lambda * floor, in every mode, before its modes are even looked at."""
    if degenerate:
        return False
    if mode is CombineMode.hierarchical:
        return gate_passed
    return mode in (CombineMode.weighted_sum, CombineMode.aspect_only)


def combine_response(
    response: str,
    holistic_raw: float | None,
    aspect_segments: Mapping[str, Sequence[SegmentScore]],
    holistic: HolisticParams,
    aspects: Sequence[AspectParams],
    mode: CombineMode = CombineMode.hierarchical,
) -> CombinedReward:
    """r_t = [r_h >= eps] * a_t + [t == T] * lambda * r_h, keyed by character end offset.

    A degenerate response gets only lambda * floor at its end, in every mode (aspect_only
    too), as the paper's code does for too-short responses; its aspect values are still
    reported, and it never passes the gate.
    """
    r_h, degenerate = normalize_holistic(holistic_raw, response, holistic)
    gate_passed = not degenerate and r_h >= holistic.threshold
    use_aspects = aspects_apply(mode, gate_passed, degenerate)

    dense_by_end: dict[int, float] = {}
    aspect_rewards: dict[str, AspectReward] = {}
    for params in aspects:
        scored = tuple(
            ScoredSegment(
                seg.start,
                seg.end,
                seg.raw,
                None if seg.raw is None else shape_aspect_value(seg.raw, params),
            )
            for seg in aspect_segments.get(params.name, ())
        )
        aspect_rewards[params.name] = AspectReward(
            value=sum((s.reward for s in scored if s.reward is not None), 0.0),
            segments=scored,
        )
        if use_aspects:
            for seg in scored:
                if seg.reward is not None:
                    dense_by_end[seg.end] = dense_by_end.get(seg.end, 0.0) + seg.reward

    if degenerate or mode is not CombineMode.aspect_only:
        end = len(response)
        dense_by_end[end] = dense_by_end.get(end, 0.0) + holistic.weight * r_h

    dense = tuple(DenseReward(end, reward) for end, reward in sorted(dense_by_end.items()))
    return CombinedReward(
        reward=sum(d.reward for d in dense),
        holistic_raw=holistic_raw,
        holistic_normalized=r_h,
        degenerate=degenerate,
        gate_passed=gate_passed,
        aspects_applied=use_aspects,
        aspects=aspect_rewards,
        dense=dense,
    )
