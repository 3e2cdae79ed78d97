"""The benchmark's ratios pair each round's figures, so that drift between rounds cancels."""

import math
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks.bench import _parser, source_revision
from benchmarks.scrape import batch_stats, host_cpu_share
from benchmarks.summary import paired_ratio, summarise


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    # The machine doubled its speed between rounds: each round says 2x, the medians of the
    # two columns (20 / 15) would say 1.33x.
    assert paired_ratio([10.0, 20.0, 30.0], [5.0, 10.0, 15.0]) == 2.0
    assert paired_ratio([10.0, 20.0, 30.0], [5.0, 20.0, 15.0]) == 2.0


def test_a_round_where_the_other_side_served_nothing_gives_no_ratio() -> None:
    assert math.isnan(paired_ratio([10.0, 20.0], [5.0, 0.0]))


def _scrape(seconds: dict[str, float]) -> str:
    lines = ["# TYPE alarm_thread_cpu_seconds_total counter"]
    lines += [f'alarm_thread_cpu_seconds_total{{threads="{g}"}} {v}' for g, v in seconds.items()]
    return "\n".join([*lines, 'alarm_real_tokens_total{model="holistic"} 5.0'])


def test_host_cpu_share_is_the_event_loop_and_tokenizers_over_all_groups_between_scrapes():
    before = _scrape({"event_loop": 10.0, "tokenize": 5.0, "device:cpu": 100.0})
    # 1 + 2 host seconds against 27 of forwards in between: 0.1, whatever came before.
    after = _scrape({"event_loop": 11.0, "tokenize": 7.0, "device:cpu": 127.0})
    assert host_cpu_share(before, after) == 3.0 / 30.0


def test_a_split_servers_front_ends_count_as_host_work():
    before = _scrape({"event_loop": 10.0, "tokenize": 5.0, "front_ends": 20.0, "device:cpu": 100.0})
    # 1 + 2 + 3 host seconds against 24 of forwards in between: 0.2.
    after = _scrape({"event_loop": 11.0, "tokenize": 7.0, "front_ends": 23.0, "device:cpu": 124.0})
    assert host_cpu_share(before, after) == 6.0 / 30.0


def test_without_thread_clocks_the_share_is_unknown_not_zero():
    assert math.isnan(host_cpu_share("", ""))


def _measured_point(point: tuple[int, int], ours: float, naive: float, limit: float) -> dict:
    def system(items_per_s: float) -> dict:
        return {
            "concurrency": point[0],
            "items_per_request": point[1],
            "items_per_s": items_per_s,
            "rounds_items_per_s": [items_per_s],
            "padding_efficiency": 0.9,
            "host_cpu_share": 0.1,
        }

    limits = {"median_items_per_s": limit, "rounds_items_per_s": [limit], "rounds": []}
    return {
        "systems": {"alarm-serve": system(ours), "naive-fastapi": system(naive)},
        "limits": {"in_flight": limits, "full": limits},
    }


def test_a_run_cut_short_keeps_the_points_it_finished_and_says_it_is_incomplete():
    results: dict = {"grid": [(1, 1), (8, 16)], "limit": {}}
    by_point = {(1, 1): _measured_point((1, 1), 40.0, 20.0, 50.0)}
    systems = ["alarm-serve", "naive-fastapi"]
    summarise(results, by_point, systems, {"naive": "naive-fastapi"}, 5.0)
    assert results["complete"] is False
    assert [(r["concurrency"], r["alarm_over_naive"]) for r in results["ratios"]] == [(1, 2.0)]
    assert results["low_load"]["alarm_beyond_forward_ms"] == 1000 / 40.0 - 1000 / 50.0

    by_point[(8, 16)] = _measured_point((8, 16), 300.0, 100.0, 400.0)
    summarise(results, by_point, systems, {"naive": "naive-fastapi"}, 5.0)
    assert results["complete"] is True
    assert [r["alarm_over_in_flight_limit"] for r in results["ratios"]] == [0.8, 0.75]
    assert [row["items_per_s"] for row in results["naive-fastapi"]] == [20.0, 100.0]


def _forward_scrape(counts: dict[str, tuple[float, float, float]]) -> str:
    """Per model: (batches, forward seconds, items), as the server's histograms count them."""
    lines = []
    for model, (batches, seconds, items) in counts.items():
        lines += [
            f'alarm_forward_duration_seconds_count{{model="{model}"}} {batches}',
            f'alarm_forward_duration_seconds_sum{{model="{model}"}} {seconds}',
            f'alarm_forward_duration_seconds_bucket{{le="0.5",model="{model}"}} {batches}',
            f'alarm_batch_size_items_sum{{model="{model}"}} {items}',
        ]
    return "\n".join(lines)


def test_batch_stats_are_each_models_batches_between_two_scrapes():
    before = _forward_scrape({"holistic": (10.0, 1.0, 100.0), "relevance": (4.0, 0.5, 100.0)})
    # 4 more holistic batches of 256 items in 0.2 s; no relevance batch in between; the
    # host rule's calls, which run no forward, are not batches.
    after = _forward_scrape(
        {"holistic": (14.0, 1.2, 356.0), "relevance": (4.0, 0.5, 100.0), "length": (9, 0.1, 9)}
    )
    stats = batch_stats(before, after)
    assert list(stats) == ["holistic"]
    assert stats["holistic"]["batches"] == 4.0
    assert stats["holistic"]["items_per_batch"] == 64.0
    assert stats["holistic"]["mean_forward_ms"] == pytest.approx(50.0)


def _git(directory: Path, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    return subprocess.run(
        ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()


def _repository_with_one_commit(directory: Path) -> str:
    """A fresh repository in `directory` holding tracked.py; its commit, short."""
    _git(directory, "init", "-q")
    (directory / "tracked.py").write_text("x = 1\n")
    _git(directory, "add", "tracked.py")
    _git(directory, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return _git(directory, "rev-parse", "--short", "HEAD")


def test_a_run_names_the_commit_it_measured_and_says_when_tracked_files_changed(tmp_path):
    commit = _repository_with_one_commit(tmp_path)

    (tmp_path / "untracked.txt").write_text("not code under test")
    assert source_revision(tmp_path) == commit
    (tmp_path / "tracked.py").write_text("x = 2\n")
    assert source_revision(tmp_path) == f"{commit}-dirty"


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
    assert source_revision(tmp_path) == "unknown"


def test_the_callers_git_variables_do_not_redirect_the_commit_read(tmp_path, monkeypatch):
    commit = _repository_with_one_commit(tmp_path)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))

    assert source_revision(tmp_path) == commit


def test_peers_none_runs_alarm_serve_and_its_limits_alone() -> None:
    parser = _parser()
    assert parser.parse_args(["--peers", "none"]).peers == []
    assert parser.parse_args(["--peers", "naive,litserve"]).peers == ["naive", "litserve"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--peers", "naive,triton"])
