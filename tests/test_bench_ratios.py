"""The benchmark's ratios pair each round's figures, so that drift between rounds cancels."""

import math

from benchmarks.bench import _paired_ratio, host_cpu_share


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    # The machine doubled its speed between rounds: each round says 2x, the medians of the
    # two columns (20 / 15) would say 1.33x.
    assert _paired_ratio([10.0, 20.0, 30.0], [5.0, 10.0, 15.0]) == 2.0
    assert _paired_ratio([10.0, 20.0, 30.0], [5.0, 20.0, 15.0]) == 2.0


def test_a_round_where_the_other_side_served_nothing_gives_no_ratio() -> None:
    assert math.isnan(_paired_ratio([10.0, 20.0], [5.0, 0.0]))


def _scrape(seconds: dict[str, float]) -> str:
    lines = ["# TYPE alarm_thread_cpu_seconds_total counter"]
    lines += [f'alarm_thread_cpu_seconds_total{{threads="{g}"}} {v}' for g, v in seconds.items()]
    return "\n".join([*lines, 'alarm_real_tokens_total{model="holistic"} 5.0'])


def test_host_cpu_share_is_the_event_loop_and_tokenizers_over_all_groups_between_scrapes():
    before = _scrape({"event_loop": 10.0, "tokenize": 5.0, "device:cpu": 100.0})
    # 1 + 2 host seconds against 27 of forwards in between: 0.1, whatever came before.
    after = _scrape({"event_loop": 11.0, "tokenize": 7.0, "device:cpu": 127.0})
    assert host_cpu_share(before, after) == 3.0 / 30.0


def test_without_thread_clocks_the_share_is_unknown_not_zero():
    assert math.isnan(host_cpu_share("", ""))
