"""Per-trainer request rate limit: one token bucket per trainer name."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.config import LimitsConfig


@dataclass
class _Bucket:
    tokens: float
    updated_at: float


class RequestRateLimiter:
    """Allows `rate` requests per second per key, with bursts of up to `burst` requests.

    Keys are trainer names, which the authenticator bounds to the configured ones, so the
    table cannot grow without limit.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate)))
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def try_acquire(self, key: str) -> float:
        """Take one request's token: 0.0 if allowed, else the seconds until one is free."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated_at) * self.rate)
        bucket.updated_at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def rate_limiter_for(limits: LimitsConfig) -> RequestRateLimiter | None:
    """The configured per-trainer limiter, or None when requests are not rate limited."""
    if limits.max_requests_per_second_per_trainer is None:
        return None
    return RequestRateLimiter(
        limits.max_requests_per_second_per_trainer, limits.request_burst_per_trainer
    )
