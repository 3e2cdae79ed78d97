"""One load point, measured in rounds: every server under the same load in turn, and the
in-process limits beside alarm-serve's load, each figure the median of its rounds."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import httpx

from benchmarks.gpu_utilisation import GpuUtilisation
from benchmarks.limit import LimitResult, pooled
from benchmarks.load import LoadResult, run_load
from benchmarks.scrape import (
    batch_line,
    batch_stats,
    host_cpu_share,
    limit_batch_stats,
    padding_efficiency,
)
from benchmarks.servers import page_faults, paused, server_processes
from benchmarks.summary import median_round

LIMIT_ITEMS = 256  # workload items the in-process limits are measured on


def load_once(
    name: str,
    url: str,
    leader: int,
    items: list[dict[str, str]],
    point: tuple[int, int],
    seconds: float,
) -> dict[str, Any]:
    concurrency, per_request = point
    before = httpx.get(f"{url}/metrics").text if name == "alarm-serve" else ""
    pids = server_processes(leader)
    faults = page_faults(pids)
    with GpuUtilisation() as gpu:
        result: LoadResult = asyncio.run(
            run_load(url, "/v1/rewards", items, concurrency, per_request, seconds)
        )
    faults = page_faults(pids) - faults
    scored = result.requests * per_request
    row = {
        "system": name,
        **asdict(result),
        "gpu_utilisation_percent": gpu.mean_percent,
        # The server's page faults (all its processes) per item scored: memory it gave
        # back and had to fault in again, each page zero-filled.
        "faults_per_item": faults / scored if scored else None,
    }
    if name == "alarm-serve":
        after = httpx.get(f"{url}/metrics").text
        row["padding_efficiency"] = padding_efficiency(before, after)
        row["host_cpu_share"] = host_cpu_share(before, after)
        row["batches"] = batch_stats(before, after)
    print(
        f"  {name:13s} {result.items_per_s:8.1f} items/s  p50 {result.p50_ms:8.1f} ms"
        f"  p99 {result.p99_ms:8.1f} ms  errors {result.errors}"
        + (f"  faults/item {row['faults_per_item']:.0f}" if scored else "")
        + (f"  host CPU {row['host_cpu_share']:.3f}" if "host_cpu_share" in row else "")
        + (f"  GPU {gpu.mean_percent:.0f}%" if gpu.mean_percent is not None else "")
        + (f"\n    batches: {batch_line(row['batches'])}" if "batches" in row else ""),
        flush=True,
    )
    return row


def measure_point(
    servers: dict[str, str],
    leaders: dict[str, int],
    limit_of: Callable[[int, list[dict[str, str]] | None], LimitResult],
    items: list[dict[str, str]],
    point: tuple[int, int],
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """Every server and the in-process limits at one load point, in rounds close together.

    This VM's speed drifts by tens of per cent within minutes, so the systems and limits
    compared at a point are measured in turns, each round starting with a different
    server, the in-flight limit on both sides of alarm-serve (the two timings pooled) and
    the full limit right after it, and each figure is the median of its rounds. Whatever
    is not being measured is paused (`leaders`: each server's process-group leader), so
    that no idle server's background work takes CPU from the one under load or from the
    in-process limits.
    """
    window = _in_flight(*point)
    names = list(servers)
    by_system: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    limits: dict[str, list[LimitResult]] = {"in_flight": [], "full": []}
    before_after: list[list[float]] = []  # each round's in-flight limit timings, items/s
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            before: list[LimitResult] = []
            if name == "alarm-serve" and window > 1:
                # The in-flight limit on both sides of alarm-serve's load: a drift of this
                # VM's speed within the round moves both alike. (One item in flight runs the
                # very items alarm-serve was sent, known only after its load.)
                with paused(list(leaders.values())):
                    before.append(limit_of(window, None))
            with paused([leader for other, leader in leaders.items() if other != name]):
                by_system[name].append(
                    load_once(name, servers[name], leaders[name], items, point, seconds)
                )
            if name != "alarm-serve":
                continue
            # The in-flight limit again (pooled with its timing before the load) and the
            # full limit, right after alarm-serve, so that each round's ratio compares
            # figures taken seconds apart. One item in flight: single-item forwards of the
            # very items alarm-serve was sent (the load sends the workload in order), for
            # the latency breakdown.
            sent = round(by_system[name][-1]["requests"] * point[1])
            with paused(list(leaders.values())):
                after = limit_of(window, items[: max(1, sent)] if window == 1 else None)
                limits["in_flight"].append(pooled([*before, after]))
                before_after.append([run.items_per_s for run in (*before, after)])
                limits["full"].append(limit_of(LIMIT_ITEMS, None))
            print(
                f"  in-process: {limits['in_flight'][-1].items_per_s:.1f} items/s with "
                f"{window} in flight"
                + (
                    f" ({before[0].items_per_s:.1f} before, {after.items_per_s:.1f} after)"
                    if before
                    else ""
                )
                + f", {limits['full'][-1].items_per_s:.1f} with all {LIMIT_ITEMS}"
                + f"\n    batches in flight: {batch_line(limit_batch_stats(after))}",
                flush=True,
            )
    measured: dict[str, Any] = {
        "systems": {name: median_round(rows) for name, rows in by_system.items()},
        "limits": {
            key: {
                "median_items_per_s": statistics.median(r.items_per_s for r in results),
                "rounds_items_per_s": [r.items_per_s for r in results],
                "rounds": [asdict(r) for r in results],
            }
            for key, results in limits.items()
        },
    }
    measured["limits"]["in_flight"]["rounds_before_after_items_per_s"] = before_after
    return measured


def _in_flight(concurrency: int, items_per_request: int) -> int:
    """Items a load point keeps in flight (C x k), as far as the limit's workload goes."""
    return min(concurrency * items_per_request, LIMIT_ITEMS)
