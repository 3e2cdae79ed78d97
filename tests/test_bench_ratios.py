"""The benchmark's ratios pair each round's figures, so that drift between rounds cancels."""

import math

from benchmarks.bench import _paired_ratio


def test_paired_ratio_is_the_median_of_each_rounds_ratio() -> None:
    # The machine doubled its speed between rounds: each round says 2x, the medians of the
    # two columns (20 / 15) would say 1.33x.
    assert _paired_ratio([10.0, 20.0, 30.0], [5.0, 10.0, 15.0]) == 2.0
    assert _paired_ratio([10.0, 20.0, 30.0], [5.0, 20.0, 15.0]) == 2.0


def test_a_round_where_the_other_side_served_nothing_gives_no_ratio() -> None:
    assert math.isnan(_paired_ratio([10.0, 20.0], [5.0, 0.0]))
