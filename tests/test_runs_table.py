"""The runs table: each full run's ratios per load point, read from its results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.runs_table import cut, main, runs_table


def _ratio(c: int, k: int, in_flight: float, naive: float, **peers: float) -> dict[str, float]:
    return {
        "concurrency": c,
        "items_per_request": k,
        "alarm_over_in_flight_limit": in_flight,
        "alarm_over_naive": naive,
        "padding_efficiency": 0.9 + c / 1000,
        **{f"alarm_over_{name}": value for name, value in peers.items()},
    }


def test_a_ratio_just_below_a_target_is_cut_not_rounded_up_to_it() -> None:
    assert cut(0.89995) == "0.89"
    assert cut(0.904) == "0.90"
    assert cut(1.0) == "1.00"
    assert cut(1.15) == "1.15"  # 1.1499999... as a float, an exact decimal all the same
    assert cut(0.29) == "0.29"


def test_each_run_is_one_row_with_the_points_it_met_and_its_least_lead() -> None:
    full = {
        "ratios": [
            _ratio(1, 1, 0.93, 1.5, litserve=1.2, ray=2.0),
            _ratio(64, 1, 0.89995, 2.0, litserve=0.96, ray=1.4),
        ],
        "low_load": {"alarm_beyond_forward_ms": 2.94},
    }
    partial = {"ratios": [_ratio(64, 1, 0.95, 1.1)]}  # one point, no LitServe nor Ray
    table = runs_table([("run A", full), ("run B", partial)])

    header, rule, row_a, row_b = table.splitlines()
    assert header.split(" | ")[1:3] == ["C=1 k=1", "C=64 k=1"]
    assert row_a == "| run A | 0.93 | **0.89** | 1 of 2 | 1.50 | **0.96** | 1.40 | 0.901 | 2.9 |"
    assert row_b == "| run B | - | 0.95 | 1 of 1 | 1.10 | - | - | 0.964 | - |"
    assert rule.count("---") == len(header.split(" | "))


def test_the_command_prints_the_table_of_the_files_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"ratios": [_ratio(8, 16, 0.91, 1.05)]}))

    assert main([f"session 9 (abc1234)={path}"]) == 0

    assert "| session 9 (abc1234) | 0.91 | 1 of 1 | 1.05 | - | - | 0.908 | - |" in (
        capsys.readouterr().out
    )


def test_a_run_named_without_a_label_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "results.json")])


def test_a_ratio_the_run_could_not_take_is_shown_as_such_and_left_out() -> None:
    nan = float("nan")
    run = {
        "ratios": [
            _ratio(1, 1, nan, 1.5, litserve=nan),
            _ratio(8, 1, 0.95, nan, litserve=nan),
        ]
    }

    row = runs_table([("run", run)]).splitlines()[2]

    assert row == "| run | n/a | 0.95 | 1 of 2 | 1.50* | n/a | - | 0.901 | - |"


def test_a_run_without_a_figure_shows_n_a_rather_than_failing() -> None:
    bare = {"concurrency": 1, "items_per_request": 1, "padding_efficiency": float("nan")}

    row = runs_table([("old", {"ratios": [bare]})]).splitlines()[2]

    assert row == "| old | n/a | 0 of 1 | - | - | - | n/a | - |"
