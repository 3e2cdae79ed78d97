"""The consistency metric (docs/method.md section 3) on hand-made pairs."""

import pytest

from service.selection import (
    ScoredPair,
    consistency,
    preference,
    select,
    sequence_value,
)


def pair(h1, h2, **aspects):
    return ScoredPair((h1, h2), {name: values for name, values in aspects.items()})


PAIRS = [
    # holistic prefers 1, 1, 2, 2, tie
    pair(2.0, 1.0, agrees=(5, 1), disagrees=(1, 5), ties=(3, 3), errors=(0.1, 0.4)),
    pair(3.0, 0.0, agrees=(2, 1), disagrees=(0, 2), ties=(1, 1), errors=(0.0, 0.2)),
    pair(0.0, 1.0, agrees=(1, 4), disagrees=(4, 1), ties=(2, 2), errors=(0.5, 0.1)),
    pair(-1.0, 1.0, agrees=(0, 9), disagrees=(9, 0), ties=(7, 7), errors=(0.9, 0.0)),
    pair(1.0, 1.0, agrees=(0, 9), disagrees=(0, 9), ties=(0, 0), errors=(0.0, 0.9)),
]
DIRECTIONS = {"agrees": "higher", "disagrees": "higher", "ties": "higher", "errors": "lower"}


def by_name(report):
    return {a.name: a for a in report.aspects}


def test_an_aspect_that_always_agrees_is_fully_consistent():
    report = by_name(consistency(PAIRS, DIRECTIONS))
    assert report["agrees"].inconsistency == 0.0
    assert report["agrees"].pairs_counted == 4  # the holistic tie is not counted


def test_an_aspect_that_always_disagrees_is_fully_inconsistent():
    assert by_name(consistency(PAIRS, DIRECTIONS))["disagrees"].inconsistency == 1.0


def test_aspect_ties_count_as_consistent():
    ties = by_name(consistency(PAIRS, DIRECTIONS))["ties"]
    assert ties.inconsistency == 0.0
    assert ties.ties == 4
    assert ties.win_rate is None  # it never prefers either response


def test_lower_is_better_aspects_flip_the_preference():
    errors = by_name(consistency(PAIRS, DIRECTIONS))["errors"]
    assert errors.inconsistency == 0.0  # fewer errors where the holistic reward is higher
    higher = by_name(consistency(PAIRS, {"errors": "higher"}))["errors"]
    assert higher.inconsistency == 1.0


def test_mixed_agreement_gives_the_share_of_disagreeing_pairs():
    pairs = [pair(1, 0, a=(1, 0)), pair(1, 0, a=(0, 1)), pair(1, 0, a=(0, 1)), pair(0, 1, a=(0, 1))]
    (result,) = consistency(pairs, {"a": "higher"}).aspects
    assert result.inconsistency == pytest.approx(2 / 4)
    assert result.disagreements == 2
    assert result.win_rate == pytest.approx(1 / 4)


def test_win_rates_of_response_one_and_holistic_ties():
    report = consistency(PAIRS, DIRECTIONS)
    assert report.pairs == 5 and report.holistic_ties == 1
    assert report.holistic_win_rate == pytest.approx(2 / 4)
    assert by_name(report)["agrees"].win_rate == pytest.approx(2 / 5)


def test_missing_values_are_not_ties():
    assert preference(None, 1.0) is None and preference(1.0, None) is None
    assert preference(None, None) is None and preference(1.0, 1.0) == 0
    assert sequence_value([None, None], "mean") is None
    assert sequence_value([0.5, None, -0.5, 0.5], "sum") == pytest.approx(0.5)
    assert sequence_value([0.5, None, -0.5, 0.5], "mean") == pytest.approx(0.5 / 3)


def test_a_pair_with_an_unscored_aspect_is_left_out_of_that_aspect_only():
    pairs = [
        pair(2.0, 1.0, a=(None, 5.0), b=(1, 0)),
        pair(2.0, 1.0, a=(0.0, None), b=(1, 0)),
        pair(2.0, 1.0, a=(0.0, 1.0), b=(1, 0)),
        pair(2.0, 1.0, a=(1.0, 0.0), b=(1, 0)),
    ]
    report = by_name(consistency(pairs, {"a": "higher", "b": "higher"}))
    a = report["a"]
    assert (a.pairs_counted, a.missing, a.ties, a.disagreements) == (2, 2, 0, 1)
    assert a.inconsistency == pytest.approx(1 / 2)  # not 1/4: the missing ones are no ties
    assert a.win_rate == pytest.approx(1 / 2)
    assert (report["b"].pairs_counted, report["b"].missing) == (4, 0)


def test_an_aspect_never_scored_has_no_inconsistency_and_is_not_selected():
    pairs = [pair(2.0, 1.0, a=(None, 5.0), b=(0, 1)), pair(2.0, 1.0, a=(None, None), b=(1, 0))]
    report = consistency(pairs, {"a": "higher", "b": "higher"})
    a = by_name(report)["a"]
    assert a.inconsistency is None and a.pairs_counted == 0 and a.missing == 2
    assert select(report) == ["b"]


def test_a_pair_without_a_holistic_value_is_left_out_not_tied():
    pairs = [
        pair(None, 1.0, a=(0.0, 5.0)),
        pair(2.0, None, a=(0.0, 5.0)),
        pair(2.0, 1.0, a=(1.0, 0.0)),
        pair(1.0, 1.0, a=(0.0, 1.0)),
    ]
    report = consistency(pairs, {"a": "higher"})
    assert (report.pairs, report.holistic_ties, report.holistic_missing) == (4, 1, 2)
    assert report.holistic_win_rate == 1.0
    (a,) = report.aspects
    assert (a.pairs_counted, a.disagreements, a.inconsistency) == (1, 0, 0.0)


def test_a_pair_without_a_holistic_value_is_in_no_aspect_figure_either():
    """The audit: an aspect's win rate and missing count took in the pairs that the report
    says are left out of every figure (one pair with an empty response made a win rate)."""
    pairs = [
        pair(None, 1.0, a=(9.0, 0.0), b=(None, 1.0)),
        pair(2.0, 1.0, a=(1.0, 0.0), b=(1.0, 0.0)),
        pair(1.0, 1.0, a=(0.0, 1.0), b=(1.0, 2.0)),
    ]
    report = consistency(pairs, {"a": "higher", "b": "higher"})
    assert report.holistic_missing == 1
    a, b = report.aspects
    assert (a.win_rate, a.missing) == (0.5, 0)
    assert (b.win_rate, b.missing) == (0.5, 0)


def test_the_report_files_say_how_many_pairs_were_left_out(tmp_path):
    import json

    from service.config import RewardConfig
    from service.selection_report import write_report

    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    aspects = [{"name": n, "kind": "rule", "mean": 1} for n in ("a", "b")]
    config = RewardConfig.model_validate({"holistic": holistic, "aspects": aspects})
    pairs = [pair(None, 1.0, a=(1, 0), b=(1, 0)), pair(2.0, 1.0, a=(None, 0), b=(1, 0))]
    report = consistency(pairs, {"a": "higher", "b": "higher"})
    paths = write_report(report, select(report), config, tmp_path)
    summary = json.loads(paths["json"].read_text())
    assert summary["holistic_missing"] == 1 and summary["holistic_ties"] == 0
    rows = {row["name"]: row for row in summary["aspects"]}
    assert rows["a"]["missing"] == 1 and rows["a"]["inconsistency"] is None
    assert "no pair with both scores" in rows["a"]["why"]
    assert rows["b"]["selected"] and rows["b"]["pairs_counted"] == 1


def test_selection_keeps_the_lowest_or_the_top_k_or_all_under_a_bound():
    report = consistency(PAIRS, DIRECTIONS)
    assert select(report) == ["agrees", "errors", "ties"]  # tied at 0.0, all kept
    assert select(report, top_k=1) == ["agrees"]
    assert select(report, max_inconsistency=0.5) == ["agrees", "errors", "ties"]
    assert select(report, max_inconsistency=1.0) == ["agrees", "errors", "ties", "disagrees"]


def test_select_aspects_cli_goes_from_pairs_to_a_selected_config(tiny_config_file, tmp_path):
    """End to end through real (tiny) models: pairs file -> table, chart, config."""
    import csv
    import json
    import subprocess

    from service.config import load_reward_config
    from tests.server_process import ALARM_SERVE

    pairs = tmp_path / "pairs.jsonl"
    lines = [
        {
            "prompt": "Who wrote Hamlet?",
            "response_1": "Shakespeare wrote it. In 1600.",
            "response_2": "Marlowe.",
        },
        {
            "prompt": "Capital of France?",
            "response_1": "Paris.",
            "response_2": "It is Paris. A big city. On the Seine.",
        },
        {
            "prompt": "Largest planet?",
            "response_1": "Jupiter is the largest.",
            "response_2": "Saturn, probably. Or not.",
        },
    ]
    pairs.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "selection"
    result = subprocess.run(
        [
            ALARM_SERVE,
            "select-aspects",
            "--pairs",
            str(pairs),
            "--config",
            str(tiny_config_file),
            "--out",
            str(out),
            "--top-k",
            "2",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "consistency.json").read_text())
    assert summary["pairs"] == 3
    assert {a["name"] for a in summary["aspects"]} == {"factuality", "completeness", "length"}
    assert len(summary["selected"]) == 2
    with (out / "consistency.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["name"] for row in table] == [a["name"] for a in summary["aspects"]]
    assert all(row["why"] for row in table)
    selected = load_reward_config(out / "selected_config.yaml")
    assert [a.name for a in selected.aspects] == [
        a.name
        for a in load_reward_config(tiny_config_file).aspects
        if a.name in summary["selected"]
    ]
    assert (out / "consistency.png").stat().st_size > 5_000
    assert "kept" in result.stdout and "dropped" in result.stdout


def _aspect_spec(fields: dict):
    from service.config import RewardConfig

    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    return RewardConfig.model_validate({"holistic": holistic, "aspects": [fields]}).aspects[0]


BANNED = {"name": "banned", "kind": "rule", "rule": "regex", "pattern": "as an AI", "mean": 1}


@pytest.mark.parametrize(
    ("fields", "direction"),
    [
        (BANNED, "higher"),
        ({**BANNED, "weight": -1.0}, "lower"),  # a banned-phrase count: fewer is better
        ({"name": "readability", "kind": "readability", "scale": -1.0}, "lower"),  # easier text
        ({"name": "readability", "kind": "readability"}, "higher"),
        ({**BANNED, "weight": -1.0, "scale": -2.0}, "higher"),
        ({**BANNED, "weight": 0.0, "direction": "lower"}, "lower"),  # no reward: any way goes
    ],
)
def test_an_aspects_direction_follows_its_reward_unless_set(fields, direction):
    """The audit: a negative weight kept `higher`, so selection judged the aspect against
    the reward it gives."""
    assert _aspect_spec(fields).selection_direction == direction


@pytest.mark.parametrize(
    ("fields", "rises"),
    [
        ({**BANNED, "weight": -1.0, "direction": "higher"}, "falls"),
        ({"name": "readability", "kind": "readability", "direction": "lower"}, "rises"),
    ],
)
def test_a_direction_against_the_reward_fails_at_start_up(fields, rises):
    with pytest.raises(ValueError, match=f"reward {rises} with the raw value"):
        _aspect_spec(fields)


def test_a_derived_direction_is_not_written_into_a_selected_config():
    """The selected config keeps the caller's own settings: a derived direction written out
    would fail at start-up once the weight's sign is flipped there."""
    spec = _aspect_spec({**BANNED, "weight": -1.0})
    assert spec.direction is None and "direction" not in spec.model_fields_set


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("field", ["weight", "scale", "shift"])
def test_a_shaping_value_that_is_not_finite_fails_at_start_up(field, value):
    """A NaN weight made every reward NaN; the config accepted it."""
    with pytest.raises(ValueError, match=field):
        _aspect_spec({**BANNED, field: value})


def test_selection_compares_raw_holistic_and_raw_aspect_values_aggregated_per_aspect():
    """Consistency (docs/method.md section 3) takes h, not r_h or its floor, and each aspect's
    raw segment values, summed or averaged as configured, never the shaped rewards."""
    from service.aspect_selection import to_scored_pairs
    from service.combine import SegmentScore, combine_response
    from service.config import RewardConfig
    from service.engine import ScoredItem

    config = RewardConfig.model_validate(
        {
            "holistic": {"name": "h", "kind": "sequence_scalar", "path": "x", "mu": 2.0},
            "aspects": [
                {"name": "summed", "kind": "grammar", "aggregate": "sum"},
                {"name": "averaged", "kind": "rule", "mean": 1, "scale": 3.0, "shift": 1.0},
            ],
        }
    )
    holistic, shaping = config.holistic_params(), config.aspect_params()

    def item(response: str, h: float, summed: list[float], averaged: list[float]) -> ScoredItem:
        segments = {
            name: [SegmentScore(i, i + 1, raw) for i, raw in enumerate(raws)]
            for name, raws in (("summed", summed), ("averaged", averaged))
        }
        return ScoredItem(combine_response(response, h, segments, holistic, shaping), False)

    # The second response is degenerate (empty): its r_h is the floor, its h stays -3.0.
    first = [item("An answer.", 1.5, [-1.0, 0.0, 0.0], [0.2, 0.4])]
    second = [item("", -3.0, [-1.0, -1.0], [0.9])]
    (scored,) = to_scored_pairs(first, second, config)
    assert scored.holistic == (1.5, -3.0)
    assert scored.aspects["summed"] == (-1.0, -2.0)
    assert scored.aspects["averaged"] == (pytest.approx(0.3), pytest.approx(0.9))
