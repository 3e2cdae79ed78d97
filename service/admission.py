"""Admission: a bounded queue for the whole service, and a fair share per trainer.

Checked before any work (tokenising included): an overloaded service answers 503 with
Retry-After at once instead of queueing without bound, and one trainer's flood gets 429
while the others are still served.
"""

from __future__ import annotations

from service.config import LimitsConfig
from service.errors import Overloaded, TooManyRequests
from service.metrics import ServiceMetrics


class Admission:
    """Items in flight, overall and by trainer; `admit` before scoring, `release` after."""

    def __init__(self, max_queue_items: int, limits: LimitsConfig, metrics: ServiceMetrics) -> None:
        self._max_queue_items = max_queue_items
        self._per_trainer = limits.max_items_in_flight_per_trainer
        self._metrics = metrics
        self._in_flight = 0
        self._in_flight_by_trainer: dict[str, int] = {}
        # The most items in flight at once since the service was last empty, and in the
        # busy spell before that one (from one empty moment to the next).
        self._spell_peak = 0
        self._last_spell_peak = 0

    @property
    def one_at_a_time(self) -> bool:
        """Whether items come one at a time: never more than one in flight in this busy
        spell or the last. Clients that send together also empty the service between
        their rounds, so a spell that has just begun with one item does not tell."""
        return self._spell_peak <= 1 and self._last_spell_peak <= 1

    def admit(self, trainer: str, count: int) -> None:
        """Take `count` items in, or raise: the trainer's limit (429) or a full queue (503)."""
        mine = self._in_flight_by_trainer.get(trainer, 0)
        if mine + count > self._per_trainer:
            self._metrics.rejected.labels("trainer_limit").inc(count)
            self._metrics.trainer_rejected.labels(trainer, "trainer_limit").inc(count)
            raise TooManyRequests(
                f"trainer {trainer!r} has {mine} items in flight (limit {self._per_trainer})"
            )
        limit = self._max_queue_items
        if self._in_flight + count > limit:
            self._metrics.rejected.labels("queue_full").inc(count)
            self._metrics.trainer_rejected.labels(trainer, "queue_full").inc(count)
            raise Overloaded(f"queue full ({self._in_flight} items in flight, limit {limit})")
        self._track(trainer, count)
        self._metrics.labelled(self._metrics.trainer_items, trainer).inc(count)

    def release(self, trainer: str, count: int) -> None:
        """`count` admitted items are done (scored, failed or abandoned)."""
        self._track(trainer, -count)

    def _track(self, trainer: str, delta: int) -> None:
        self._in_flight += delta
        self._spell_peak = max(self._spell_peak, self._in_flight)
        if self._in_flight == 0:
            self._last_spell_peak, self._spell_peak = self._spell_peak, 0
        self._in_flight_by_trainer[trainer] = self._in_flight_by_trainer.get(trainer, 0) + delta
        self._metrics.in_flight.set(self._in_flight)
        in_flight = self._in_flight_by_trainer[trainer]
        self._metrics.labelled(self._metrics.trainer_in_flight, trainer).set(in_flight)
