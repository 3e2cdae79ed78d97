"""The number no server can beat: the models' own batched forward throughput, in process.

Every item of the workload is tokenised up front (not timed) and cut into batches as the
server cuts them (`form_batches` with each model's own limits: sorted by length, or in
arrival order for models that pack their rows) under the same padded-token budget, then
each model's forward passes are timed; the limit is items / (sum of the models' forward
times).

`measure(..., window=C x k)` bounds a server at one load: C clients sending k items each
keep at most C x k items in flight, so no server can batch more than that many together;
the same measurement, with the workload cut one window of C x k items at a time, is
the most any server can do at that load point (with one item in flight: a single-item
forward per item).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from service.batch_forming import (
    BatchLimits,
    WorkItem,
    form_batches,
    split_in_two,
)
from service.config import RewardConfig
from service.engine import HOST_DEVICE, batch_limits
from service.memory import keep_freed_memory
from service.models import EncodingMemo, Prepared, RewardModel
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
    items: int  # items timed
    batches_by_model: dict[str, int]  # forward calls (`run`) per model, as the server counts


def _work_items(prepared: list[Prepared]) -> list[WorkItem[Prepared]]:
    return [WorkItem(p, p.length, len(p.rows), p.tokens, None, 0.0) for p in prepared]  # type: ignore[arg-type]


def server_batches(
    prepared: list[Prepared], limits: BatchLimits, model: RewardModel
) -> list[list[Prepared]]:
    """The server's own batch formation (`form_batches`: length-sorted, or in arrival order
    with `model`'s own padding count), applied to the whole workload at once."""
    count = padded_counter(model)

    def count_padded(batch: Sequence[WorkItem[Prepared]]) -> int:
        return count([w.payload for w in batch])

    batches = form_batches(_work_items(prepared), limits, count_padded)
    return [[w.payload for w in batch] for batch in batches]


def _largest_in_halves(batches: list[list[Prepared]], model: RewardModel) -> list[list[Prepared]]:
    """The batches with the largest cut in two halves (`split_in_two`), as a server with
    several device slots may run a model's last pending batch (side by side, when a slot
    is free)."""
    if model.device == HOST_DEVICE or not batches:
        return batches
    largest = max(batches, key=padded_counter(model))
    if len(largest) < 2:
        return batches
    halves = [[w.payload for w in half] for half in split_in_two(_work_items(largest))]
    return [b for b in batches if b is not largest] + halves


def padded_counter(model: RewardModel) -> Callable[[list[Prepared]], int]:
    """The model's own padding count where it lays rows out itself, as the server's is."""
    counter: Callable[[list[Prepared]], int] | None = getattr(model, "padded_tokens", None)
    return counter or (lambda batch: sum(len(p.rows) for p in batch) * max(p.length for p in batch))


Job = tuple[RewardModel, list[Prepared]]
WindowTiming = tuple[float, list[tuple[str, float]]]  # seconds, each forward's (model, s)


def measure(
    models: list[RewardModel],
    items: list[dict[str, str]],
    limits_of: Callable[[RewardModel], BatchLimits],
    window: int | None = None,
    workers: int = 1,
) -> LimitResult:
    """Items/s over `items`, cut into batches `window` items at a time (None: all at once).

    `workers` forwards run at once, each on its share of torch's threads, as the server
    runs them (`cpu_workers`); all models' batches of a window share the workers, and a
    window starts once the last one's forwards are done (its items were all in flight).
    With several workers each window also runs with each model's largest batch in two
    halves (what the server may do with a model's last pending batch), and the layout that
    is faster over the whole workload counts: a limit must be one that the server's own
    way of running cannot beat. Not the faster of the two in each window: where both take
    about as long, that is the lesser of two noisy timings, which flattered the limit
    (`faster_layout_timing`).
    """
    keep_freed_memory()  # the server's heap policy (`RewardEngine.start`): its forwards' too
    window = window or len(items)
    real = 0
    cut = any(limits_of(model).forward_overhead_tokens is not None for model in models)
    layouts: list[dict[str, list[Job]]] = [
        {"whole": [], "halved": []} for _ in range(0, len(items), window)
    ]
    for model in models:
        limits = limits_of(model)
        prepared = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
        for index, start in enumerate(range(0, len(prepared), window)):
            batches = server_batches(prepared[start : start + window], limits, model)
            layouts[index]["whole"] += [(model, batch) for batch in batches]
            layouts[index]["halved"] += [(model, b) for b in _largest_in_halves(batches, model)]
        real += sum(p.tokens for p in prepared)
    for layout in layouts:
        if workers == 1 or len(layout["halved"]) == len(layout["whole"]):
            del layout["halved"]  # nothing to run in halves (timing it twice would flatter)
    durations: list[tuple[str, float]] = []  # appended from the workers

    def forward(job: Job) -> None:
        started = time.perf_counter()
        job[0].run(job[1])
        durations.append((job[0].name, time.perf_counter() - started))

    def padded_tokens(job: Job) -> int:
        return padded_counter(job[0])(job[1])

    timed: list[dict[str, WindowTiming]] = []  # per window, per layout
    with ThreadPoolExecutor(
        workers, initializer=set_intra_op_threads, initargs=(intra_op_threads(workers),)
    ) as pool:
        first_of_each_model = {job[0].name: job for job in reversed(layouts[0]["whole"])}
        list(pool.map(forward, first_of_each_model.values()))  # warm-up
        both_timed = 0
        for layout in layouts:
            names = list(layout)
            if len(names) == 2:  # which runs first takes turns, so a drift falls on both
                names = names if both_timed % 2 == 0 else names[::-1]
                both_timed += 1
            timed.append({})
            for name in names:
                durations.clear()
                started = time.perf_counter()
                # The largest forwards first, so the workers finish together.
                list(pool.map(forward, sorted(layout[name], key=padded_tokens, reverse=True)))
                timed[-1][name] = (time.perf_counter() - started, list(durations))
    faster, total, kept = faster_layout_timing(timed)
    padded = sum(
        map(padded_tokens, (j for layout in layouts for j in layout.get(faster, layout["whole"])))
    )
    return LimitResult(
        window=window,
        batch_size=limits.max_batch_size,
        forward_overhead_cut=cut,
        workers=workers,
        items_per_s=len(items) / total,
        real_tokens_per_s=real / total,
        padding_efficiency=real / padded if padded else 1.0,
        seconds_by_model={
            model.name: sum(s for name, s in kept if name == model.name) for model in models
        },
        items=len(items),
        batches_by_model={
            model.name: sum(1 for name, _ in kept if name == model.name) for model in models
        },
    )


def faster_layout_timing(
    timed: Sequence[dict[str, WindowTiming]],
) -> tuple[str, float, list[tuple[str, float]]]:
    """The layout whose windows took least time in all, its seconds in all, and its
    forwards' (model, seconds). A window with nothing to halve has only its "whole"
    timing: the same work either way, timed once, it counts for both layouts.

    One choice for the whole workload: the lesser of two timings per window would, where
    both layouts take about as long, pick each window's luckier timing, and flatter the
    limit by 1.4 to 2.7 % at 8 and 16 items in flight on this VM (HISTORY.md, session 18).
    """
    by_layout = {name: [t.get(name, t["whole"]) for t in timed] for name in ("whole", "halved")}
    faster = min(by_layout, key=lambda name: sum(s for s, _ in by_layout[name]))
    spans = [span for _, window_spans in by_layout[faster] for span in window_spans]
    return faster, sum(s for s, _ in by_layout[faster]), spans


def pooled(runs: list[LimitResult]) -> LimitResult:
    """The same measurement run several times, as one: all its items (and real tokens) over
    all its time (and padded tokens); `seconds_by_model`, `items` and `batches_by_model`
    then add up over all the runs."""
    first = runs[0]
    return replace(
        first,
        items_per_s=len(runs) / sum(1 / run.items_per_s for run in runs),
        real_tokens_per_s=len(runs) / sum(1 / run.real_tokens_per_s for run in runs),
        padding_efficiency=len(runs) / sum(1 / run.padding_efficiency for run in runs),
        seconds_by_model={
            name: sum(run.seconds_by_model[name] for run in runs) for name in first.seconds_by_model
        },
        items=sum(run.items for run in runs),
        batches_by_model={
            name: sum(run.batches_by_model[name] for run in runs) for name in first.batches_by_model
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
