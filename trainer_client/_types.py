"""Typed results mirroring the service's `/v1/rewards` reply, and the client's settings."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class _Reply(BaseModel):
    # Unknown fields are ignored so a newer server does not break an older client; a NaN
    # or infinite number is a broken reply, never a reward to train on.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class Holistic(_Reply):
    raw: float | None
    normalized: float


class Segment(_Reply):
    start: int
    end: int
    raw: float | None
    reward: float | None


class AspectReward(_Reply):
    value: float
    segments: list[Segment]


class DenseReward(_Reply):
    end: int  # character end offset in the response
    reward: float


class RewardResult(_Reply):
    id: str | None
    reward: float
    holistic: Holistic
    gate_passed: bool
    aspects_applied: bool
    degenerate: bool
    aspects: dict[str, AspectReward]
    dense: list[DenseReward]
    truncated: bool


class RewardReply(_Reply):
    results: list[RewardResult]
    reward_definition: str


@dataclass(frozen=True)
class RewardBatch:
    """Every result of one call, in input order, and the definition that produced them."""

    results: list[RewardResult]
    reward_definition: str

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.results]


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    read_s: float = 120.0  # one HTTP attempt
    total_s: float = 600.0  # the whole call, retries included


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    jitter: float = 0.5  # +- this fraction of each delay, so trainers do not retry in lockstep
