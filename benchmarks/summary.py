"""A benchmark run's figures per load point: medians of rounds, paired ratios, the
low-load latency, the chart and the printed table, from what `benchmarks.bench` measured."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any


def known_values(values: list[float]) -> list[float]:
    """The values that are not NaN (a figure a round could not take, e.g. a ratio to a
    side that served nothing)."""
    return [value for value in values if not math.isnan(value)]


def _median_known(values: list[float]) -> float:
    """The median of the values that are not NaN (NaN when none is)."""
    known = known_values(values)
    return statistics.median(known) if known else float("nan")


def median_round(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (its latencies with it), every round beside it."""
    median = dict(sorted(rows, key=lambda row: row["items_per_s"])[len(rows) // 2])
    median["rounds_items_per_s"] = [row["items_per_s"] for row in rows]
    median["rounds_faults_per_item"] = [row.get("faults_per_item") for row in rows]
    if "host_cpu_share" in median:  # one figure per point: the median of the rounds
        median["rounds_host_cpu_share"] = [row["host_cpu_share"] for row in rows]
        median["host_cpu_share"] = _median_known(median["rounds_host_cpu_share"])
    return median


def plot(results: dict[str, Any], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["concurrency"], r["items_per_request"]) for r in results["alarm-serve"]]
    labels = [f"C={c}\nk={k}" for c, k in points]
    xs = range(len(points))
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        offset = (index - (len(systems) - 1) / 2) * width
        lefts = [x + offset for x in xs]
        tput.bar(lefts, [r["items_per_s"] for r in results[system]], width, label=system)
        lat.bar(lefts, [r["p99_ms"] for r in results[system]], width, label=system)
    span = 0.9  # a limit marker spans its point's group of bars
    for key, style, label in (
        ("limit", "-", "in-process limit (all items batched together)"),
        ("in_flight_limit", ":", "in-process limit (C x k items in flight)"),
    ):
        for x, ratio in zip(xs, results["ratios"], strict=True):
            tput.hlines(
                ratio[key],
                x - span / 2,
                x + span / 2,
                colors="black",
                linestyles=style,
                label=label if x == 0 else None,
            )
    highest = max(r["limit"] for r in results["ratios"])
    tput.set(title="throughput (items/s)", xticks=list(xs), xticklabels=labels)
    tput.set_ylim(0, 1.45 * highest)  # room for the legend above the limits
    lat.set(title="p99 latency (ms, log)", xticks=list(xs), xticklabels=labels, yscale="log")
    tput.legend(fontsize=8, loc="upper left", ncol=3)
    lat.legend(fontsize=8)
    for ax in (tput, lat):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def low_load_latency(results: dict[str, Any], max_wait_ms: float) -> dict[str, float] | None:
    """One client, one item: the mean latency (closed loop: 1 / throughput) beyond the mean
    single-item forward of every model in process over the very items that run sent; the
    target allows 10 ms beyond the forward plus the batching wait."""
    for ours, ratio in zip(results["alarm-serve"], results["ratios"], strict=True):
        if (ours["concurrency"], ours["items_per_request"]) == (1, 1):
            forward_ms = 1000 / ratio["in_flight_limit"]
            mean_ms = 1000 / ours["items_per_s"]
            return {
                "single_item_forward_ms": forward_ms,
                "max_wait_ms": max_wait_ms,
                "alarm_mean_ms": mean_ms,
                "alarm_beyond_forward_ms": mean_ms - forward_ms,
            }
    return None


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of ours / theirs, each round's pair measured close together:
    the VM's drift between rounds cancels out of each pair."""
    if not all(theirs):
        return float("nan")  # a peer that served nothing in a round: no ratio
    return statistics.median(o / t for o, t in zip(ours, theirs, strict=True))


def write_atomically(path: Path, text: str) -> None:
    """A run killed mid-write (a lease's time limit) leaves the previous file whole."""
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    os.replace(staging, path)


def summarise(
    results: dict[str, Any],
    by_point: dict[tuple[int, int], dict[str, Any]],
    systems: list[str],
    peer_systems: dict[str, str],
    max_wait_ms: float,
) -> None:
    """Per-system rows, limits, ratios and low-load latency of the points measured so far
    (`peer_systems`: each peer's short name, as in `alarm_over_<name>`, to its system)."""
    done = [(c, k) for c, k in results["grid"] if (c, k) in by_point]
    results["complete"] = len(done) == len(results["grid"])
    for system in systems:
        results[system] = [by_point[point]["systems"][system] for point in done]
    results["limit"]["by_point"] = [
        {"concurrency": c, "items_per_request": k, **by_point[(c, k)]["limits"]} for c, k in done
    ]
    results["ratios"] = []
    for point, ours in zip(done, results["alarm-serve"], strict=True):
        limits = by_point[point]["limits"]
        ours_rounds = ours["rounds_items_per_s"]
        results["ratios"].append(
            {
                "concurrency": point[0],
                "items_per_request": point[1],
                "limit": limits["full"]["median_items_per_s"],
                "in_flight_limit": limits["in_flight"]["median_items_per_s"],
                "alarm_over_limit": paired_ratio(ours_rounds, limits["full"]["rounds_items_per_s"]),
                "alarm_over_in_flight_limit": paired_ratio(
                    ours_rounds, limits["in_flight"]["rounds_items_per_s"]
                ),
                **{
                    f"alarm_over_{name}": paired_ratio(
                        ours_rounds,
                        by_point[point]["systems"][system]["rounds_items_per_s"],
                    )
                    for name, system in peer_systems.items()
                },
                "padding_efficiency": ours["padding_efficiency"],
                "host_cpu_share": ours["host_cpu_share"],
            }
        )
    low_load = low_load_latency(results, max_wait_ms)
    if low_load is not None:
        results["low_load"] = low_load


def print_table(results: dict[str, Any], peers: list[str]) -> None:
    """Every point's ratios, and the low-load latency against what the target allows."""
    print(
        "\nC     k    alarm/limit  alarm/in-flight"
        + "".join(f"  alarm/{n:9s}" for n in peers)
        + "  pad-eff  host-CPU"
    )
    for r in results["ratios"]:
        print(
            f"{r['concurrency']:<5d} {r['items_per_request']:<4d} {r['alarm_over_limit']:11.2f}"
            f"  {r['alarm_over_in_flight_limit']:15.2f}"
            + "".join(f"  {r[f'alarm_over_{n}']:15.2f}" for n in peers)
            + f"  {r['padding_efficiency']:7.3f}  {r['host_cpu_share']:8.3f}"
        )
    low_load = results.get("low_load")
    if low_load is not None:
        print(
            f"\nC=1 k=1: mean latency {low_load['alarm_mean_ms']:.1f} ms = single-item "
            f"forward {low_load['single_item_forward_ms']:.1f} ms (the same items, in "
            f"process) + {low_load['alarm_beyond_forward_ms']:.1f} ms (the target allows "
            f"10 ms + the {low_load['max_wait_ms']:g} ms max wait)"
        )
