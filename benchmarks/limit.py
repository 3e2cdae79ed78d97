"""The number no server can beat: the models' own batched forward throughput, in process.

Every item of the workload is tokenised up front (not timed), sorted by length and cut
into batches under the same padded-token budget as the server, then each model's forward
passes are timed; the limit is items / (sum of the models' forward times).

`measure(..., window=C x k)` bounds a server at one load: C clients sending k items each
keep at most C x k items in flight, so no server can sort more than that many at once; the
same measurement, with the workload sorted and cut one window of C x k items at a time, is
the most any server can do at that load point (with one item in flight: a single-item
forward per item).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from service.batching import BatchLimits, WorkItem, form_batches
from service.config import RewardConfig
from service.engine import batch_limits
from service.models import Prepared, RewardModel
from service.models.loading import intra_op_threads, set_intra_op_threads


@dataclass(frozen=True)
class LimitResult:
    window: int  # items sorted together (the whole workload, or those in flight)
    batch_size: int
    forward_overhead_cut: bool  # batches cut where padding costs more than a forward
    workers: int  # forwards run at once
    items_per_s: float
    real_tokens_per_s: float
    padding_efficiency: float
    seconds_by_model: dict[str, float]  # forward time per model (overlapping with workers)


def _sorted_batches(prepared: list[Prepared], limits: BatchLimits) -> list[list[Prepared]]:
    """The server's own batch formation, applied to the whole workload at once."""
    work = [WorkItem(p, p.length, len(p.rows), p.tokens, None, 0.0) for p in prepared]  # type: ignore[arg-type]
    return [[w.payload for w in batch] for batch in form_batches(work, limits)]


def _padded_counter(model: RewardModel) -> Callable[[list[Prepared]], int]:
    """The model's own padding count where it lays rows out itself, as the server's is."""
    counter: Callable[[list[Prepared]], int] | None = getattr(model, "padded_tokens", None)
    return counter or (lambda batch: sum(len(p.rows) for p in batch) * max(p.length for p in batch))


def measure(
    models: list[RewardModel],
    items: list[dict[str, str]],
    limits_of: Callable[[RewardModel], BatchLimits],
    window: int | None = None,
    workers: int = 1,
) -> LimitResult:
    """Items/s over `items`, sorted and cut `window` items at a time (None: all at once).

    `workers` forwards run at once, each on its share of torch's threads, as the server
    runs them (`cpu_workers`); all models' batches of a window share the workers, and a
    window starts once the last one's forwards are done (its items were all in flight).
    """
    window = window or len(items)
    real = padded = 0
    cut = any(limits_of(model).forward_overhead_tokens is not None for model in models)
    windows: list[list[tuple[RewardModel, list[Prepared]]]] = [
        [] for _ in range(0, len(items), window)
    ]
    for model in models:
        limits = limits_of(model)
        prepared = [model.prepare(i["prompt"], i["response"]) for i in items]
        for index, start in enumerate(range(0, len(prepared), window)):
            batches = _sorted_batches(prepared[start : start + window], limits)
            windows[index] += [(model, batch) for batch in batches]
            padded += sum(map(_padded_counter(model), batches))
        real += sum(p.tokens for p in prepared)
    durations: list[tuple[str, float]] = []  # appended from the workers

    def forward(job: tuple[RewardModel, list[Prepared]]) -> None:
        started = time.perf_counter()
        job[0].run(job[1])
        durations.append((job[0].name, time.perf_counter() - started))

    def cost(job: tuple[RewardModel, list[Prepared]]) -> int:
        return -_padded_counter(job[0])(job[1])

    with ThreadPoolExecutor(
        workers, initializer=set_intra_op_threads, initargs=(intra_op_threads(workers),)
    ) as pool:
        first_of_each_model = {job[0].name: job for job in reversed(windows[0])}
        list(pool.map(forward, first_of_each_model.values()))  # warm-up
        durations.clear()
        started = time.perf_counter()
        for jobs in windows:  # the largest forwards first, so the workers finish together
            list(pool.map(forward, sorted(jobs, key=cost)))
        total = time.perf_counter() - started
    return LimitResult(
        window=window,
        batch_size=limits.max_batch_size,
        forward_overhead_cut=cut,
        workers=workers,
        items_per_s=len(items) / total,
        real_tokens_per_s=real / total,
        padding_efficiency=real / padded if padded else 1.0,
        seconds_by_model={
            model.name: sum(s for name, s in durations if name == model.name) for model in models
        },
    )


def best_limit(
    models: list[RewardModel],
    config: RewardConfig,
    items: list[dict[str, str]],
    batch_sizes: list[int],
    workers: list[int],
) -> tuple[LimitResult, list[LimitResult]]:
    """The best of every batch size and number of forwards at once, each with the server's
    own batch cuts and without."""

    def limits_of(size: int, cut: bool) -> Callable[[RewardModel], BatchLimits]:
        def limits(model: RewardModel) -> BatchLimits:
            server = batch_limits(config, model)
            overhead = server.forward_overhead_tokens if cut else None
            return replace(server, max_batch_size=size, forward_overhead_tokens=overhead)

        return limits

    results = [
        measure(models, items, limits_of(size, cut), workers=count)
        for count in workers
        for size in batch_sizes
        for cut in (True, False)
    ]
    return max(results, key=lambda r: r.items_per_s), results
