"""Full benchmark runs side by side, as a Markdown table, from their results.json files.

    python -m benchmarks.runs_table "session 23 (03228c0)=benchmarks/results/...json" ...

One run's table cannot say whether a target holds: on this VM the same load point moves
by up to a quarter of the in-flight limit between full runs (benchmarks/RESULTS.md). This table
puts every run's alarm-serve / in-flight limit at each load point in one row, and its
least lead over each peer, so that in how many runs a target was met can be read off.
Ratios are cut (not rounded) to the shown decimals, so a point below a target never
prints at it (0.89995 shows as 0.89).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from benchmarks.summary import known_values

IN_FLIGHT_TARGET = 0.9  # issue 7: alarm-serve at least 0.9 of the in-process limit
PEERS = ("naive", "litserve", "ray")


def cut(value: float, decimals: int = 2) -> str:
    """`value` (not negative) with `decimals` decimals, cut, never rounded up to a target.
    Rounded to 9 decimals first, so that a float just below an exact decimal (1.15 is
    1.1499999...) is not cut a step lower."""
    scale = 10**decimals
    return f"{math.floor(round(value * scale, 9)) / scale:.{decimals}f}"


def _points(runs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Every load point any run measured, in the order the runs measured them."""
    seen: dict[tuple[int, int], None] = {}
    for run in runs:
        for ratio in run["ratios"]:
            seen.setdefault((ratio["concurrency"], ratio["items_per_request"]), None)
    return list(seen)


def runs_table(labelled: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run: alarm-serve / in-flight limit per load point (bold below the
    target), how many points reached it, the least alarm-serve / peer over the points
    (bold below 1; "-" where the run did not measure that peer), the least padding
    efficiency and the low-load latency beyond one item's forwards ("-" without C=1 k=1).
    A ratio the run could not take (NaN: a round where one side served nothing) or did not
    record shows as "n/a" and counts neither as met nor in a least lead, which is then
    marked "*"."""
    points = _points([run for _, run in labelled])
    header = (
        ["run"]
        + [f"C={c} k={k}" for c, k in points]
        + ["points >= 0.9"]
        + [f"least alarm / {peer}" for peer in PEERS]
        + ["least padding eff.", "low load: ms beyond a forward"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, run in labelled:
        by_point = {(r["concurrency"], r["items_per_request"]): r for r in run["ratios"]}
        cells = [label]
        met = 0
        for point in points:
            ratio = by_point.get(point)
            if ratio is None:
                cells.append("-")
                continue
            value = ratio.get("alarm_over_in_flight_limit", math.nan)
            if math.isnan(value):  # not measured, or nothing to compare: no figure, not met
                cells.append("n/a")
                continue
            met += value >= IN_FLIGHT_TARGET
            cells.append(cut(value) if value >= IN_FLIGHT_TARGET else f"**{cut(value)}**")
        cells.append(f"{met} of {len(by_point)}")
        for peer in PEERS:
            leads = [r[f"alarm_over_{peer}"] for r in run["ratios"] if f"alarm_over_{peer}" in r]
            known = known_values(leads)
            if not known:
                cells.append("n/a" if leads else "-")
                continue
            least = min(known)
            unknown = "*" if len(known) < len(leads) else ""  # some points could not count
            cells.append((cut(least) if least >= 1 else f"**{cut(least)}**") + unknown)
        paddings = known_values([r.get("padding_efficiency", math.nan) for r in run["ratios"]])
        cells.append(cut(min(paddings), 3) if paddings else "n/a")
        low_load = run.get("low_load")
        cells.append("-" if low_load is None else f"{low_load['alarm_beyond_forward_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _labelled_path(text: str) -> tuple[str, Path]:
    label, sep, path = text.rpartition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=_labelled_path, help="LABEL=results.json")
    args = parser.parse_args(argv)
    labelled = [(label, json.loads(path.read_text())) for label, path in args.runs]
    print(runs_table(labelled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
