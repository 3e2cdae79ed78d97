"""What `alarm-serve select-aspects` writes: a table (JSON, CSV), a chart, a new config."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import yaml

from service.config import RewardConfig
from service.selection import AspectConsistency, ConsistencyReport


def _reason(aspect: AspectConsistency, report: ConsistencyReport, kept: bool) -> str:
    if aspect.inconsistency is None:
        # Which of the two is why no pair was counted, so that a missing score is not
        # mistaken for a holistic tie.
        if aspect.missing or report.holistic_missing:
            return "dropped: no pair with both scores where the holistic reward is not tied"
        return "dropped: the holistic reward tied every pair"
    return "kept" if kept else "dropped: less consistent with the holistic reward"


def write_report(
    report: ConsistencyReport, selected: list[str], config: RewardConfig, out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            **asdict(a),
            "selected": a.name in selected,
            "why": _reason(a, report, a.name in selected),
        }
        for a in sorted(report.aspects, key=lambda a: (a.inconsistency is None, a.inconsistency))
    ]
    paths = {
        "json": out_dir / "consistency.json",
        "csv": out_dir / "consistency.csv",
        "png": out_dir / "consistency.png",
        "config": out_dir / "selected_config.yaml",
    }
    summary = {
        "pairs": report.pairs,
        "holistic_ties": report.holistic_ties,
        "holistic_missing": report.holistic_missing,
        "holistic_win_rate": report.holistic_win_rate,
        "aspects": rows,
        "selected": selected,
    }
    paths["json"].write_text(json.dumps(summary, indent=2))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
    kept = config.model_copy(update={"aspects": [a for a in config.aspects if a.name in selected]})
    header = (
        "# Written by `alarm-serve select-aspects`: the aspects most consistent with the\n"
        f"# holistic reward on {report.pairs} pairs. Kept: {', '.join(selected) or 'none'}.\n"
    )
    paths["config"].write_text(
        header + yaml.safe_dump(kept.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    )
    _plot(rows, report, paths["png"])
    return paths


def _plot(rows: list[dict], report: ConsistencyReport, path: Path) -> None:
    """Bars of inconsistency per aspect, kept ones highlighted (the paper's Figure 3 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["inconsistency"] is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(shown) + 2.0), 3.6))
    colours = ["tab:green" if r["selected"] else "tab:gray" for r in shown]
    values = [100 * r["inconsistency"] for r in shown]
    bars = ax.bar([r["name"] for r in shown], values, color=colours)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.1f}%",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.axhline(50, color="black", linestyle=":", linewidth=1)
    ax.set(
        ylabel="inconsistency with holistic (%)",
        ylim=(0, 100),
        title=f"Aspect consistency on {report.pairs} pairs (green: selected)",
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
