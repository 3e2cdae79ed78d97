"""The ALaRM combination math (docs/method.md section 2), pinned to the paper's numbers."""

import math

import pytest

from service.combine import (
    AspectParams,
    CombineMode,
    HolisticParams,
    SegmentScore,
    combine_response,
    shape_aspect_value,
    sigmoid,
)
from service.config import CombinationConfig, RewardConfig

# Long-form QA settings of the paper: eps 0.6, lambda 5, mu/sigma of UltraRM.
QA = HolisticParams(mu=-4.8961, sigma=3.0596, threshold=0.6, weight=5.0)
FACTUALITY = AspectParams("factuality", weight=1.0)
RESPONSE = "Paris is the capital. It is in France."
SEGMENTS = {"factuality": [SegmentScore(0, 21, 0.5), SegmentScore(22, 38, -0.5)]}


def raw_for(r_h: float, params: HolisticParams = QA) -> float:
    """The raw holistic score whose z-normalised value is r_h."""
    return r_h * params.sigma + params.mu


def test_factuality_plus_half_is_shaped_to_0_6225():
    assert shape_aspect_value(0.5, FACTUALITY) == pytest.approx(0.6225, abs=1e-4)
    assert shape_aspect_value(-0.5, FACTUALITY) == pytest.approx(0.3775, abs=1e-4)


def test_completeness_affine_constants_map_raw_scores():
    completeness = AspectParams("completeness", scale=0.3 / 8.30116, shift=0.44678, sigmoid=False)
    assert shape_aspect_value(-0.44678, completeness) == pytest.approx(0.0)
    assert shape_aspect_value(8.30116 - 0.44678, completeness) == pytest.approx(0.3)


def test_below_threshold_only_lambda_times_holistic_remains():
    result = combine_response(RESPONSE, raw_for(0.59), SEGMENTS, QA, [FACTUALITY])
    assert result.holistic_normalized == pytest.approx(0.59)
    assert not result.gate_passed and not result.aspects_applied
    assert result.reward == pytest.approx(5 * 0.59)
    assert [(d.end, d.reward) for d in result.dense] == [(len(RESPONSE), pytest.approx(2.95))]


def test_at_threshold_aspects_are_kept_with_strict_less_than_gate():
    params = HolisticParams(mu=0.0, sigma=1.0, threshold=0.6, weight=5.0)
    result = combine_response(RESPONSE, 0.6, SEGMENTS, params, [FACTUALITY])
    assert result.gate_passed and result.aspects_applied
    expected = sigmoid(0.5) + sigmoid(-0.5) + 5 * 0.6
    assert result.reward == pytest.approx(expected)
    assert [d.end for d in result.dense] == [21, 38]
    assert result.dense[0].reward == pytest.approx(0.6225, abs=1e-4)
    # The last segment ends at len(response): its aspect reward and the holistic term add up.
    assert result.dense[1].reward == pytest.approx(sigmoid(-0.5) + 3.0)


@pytest.mark.parametrize(
    ("params", "raw", "passes"),
    [
        # Raw -2.0 is below eps, but r_h = (-2.0 + 4.8961) / 3.0596 = 0.9466 is above it.
        (QA, -2.0, True),
        # Raw 1.0 is above eps, but r_h = (1.0 - 2.0) / 0.5 = -2.0 is below it.
        (HolisticParams(mu=2.0, sigma=0.5, threshold=0.6, weight=5.0), 1.0, False),
    ],
)
def test_the_gate_compares_the_normalised_holistic_score_not_the_raw_one(params, raw, passes):
    result = combine_response(RESPONSE, raw, SEGMENTS, params, [FACTUALITY])
    r_h = (raw - params.mu) / params.sigma
    assert result.holistic_normalized == pytest.approx(r_h)
    assert result.gate_passed is passes and result.aspects_applied is passes
    aspects = sigmoid(0.5) + sigmoid(-0.5) if passes else 0.0
    assert result.reward == pytest.approx(aspects + params.weight * r_h)


def test_aspects_ending_at_one_position_add_up_there():
    """Two aspects' segments that end at the same character share one dense entry, their
    rewards summed (and the holistic term too at the response's end)."""
    relevance = AspectParams("relevance", weight=2.0)
    segments = {
        "factuality": [SegmentScore(0, 21, 0.5), SegmentScore(22, 38, -0.5)],
        "relevance": [SegmentScore(0, 21, -0.3), SegmentScore(0, 38, 0.3)],
    }
    params = HolisticParams(mu=0.0, sigma=1.0, threshold=0.6, weight=5.0)
    result = combine_response(RESPONSE, 1.0, segments, params, [FACTUALITY, relevance])
    assert [(d.end, d.reward) for d in result.dense] == [
        (21, pytest.approx(sigmoid(0.5) + 2 * sigmoid(-0.3))),
        (38, pytest.approx(sigmoid(-0.5) + 2 * sigmoid(0.3) + 5 * 1.0)),
    ]


def test_dense_rewards_sum_exactly_to_reward():
    result = combine_response(RESPONSE, raw_for(1.3), SEGMENTS, QA, [FACTUALITY])
    assert math.fsum(d.reward for d in result.dense) == pytest.approx(result.reward, abs=1e-12)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (CombineMode.holistic_only, 5 * 0.2),
        (CombineMode.aspect_only, sigmoid(0.5) + sigmoid(-0.5)),
        (CombineMode.weighted_sum, sigmoid(0.5) + sigmoid(-0.5) + 5 * 0.2),
        (CombineMode.hierarchical, 5 * 0.2),
    ],
)
def test_baseline_modes(mode, expected):
    result = combine_response(RESPONSE, raw_for(0.2), SEGMENTS, QA, [FACTUALITY], mode)
    assert result.reward == pytest.approx(expected)


def test_aspect_only_puts_nothing_for_holistic_at_the_end():
    result = combine_response(
        RESPONSE, raw_for(2.0), SEGMENTS, QA, [FACTUALITY], CombineMode.aspect_only
    )
    assert [d.end for d in result.dense] == [21, 38]
    assert result.dense[1].reward == pytest.approx(sigmoid(-0.5))


@pytest.mark.parametrize("response", ["", "   ", "\n"])
def test_degenerate_responses_get_the_floor(response):
    result = combine_response(response, 3.0, {}, QA, [FACTUALITY])
    assert result.degenerate
    assert result.holistic_normalized == -10.0
    assert result.reward == pytest.approx(-50.0)
    assert [d.end for d in result.dense] == [len(response)]


def test_short_responses_below_minimum_are_degenerate():
    params = HolisticParams(min_response_chars=5)
    assert combine_response("abcd", 3.0, {}, params, []).degenerate
    assert not combine_response("abcde", 3.0, {}, params, []).degenerate


@pytest.mark.parametrize("mode", list(CombineMode))
@pytest.mark.parametrize("response", ["", "ok", "  \n"])
def test_degenerate_responses_get_lambda_times_minus_ten_alone_in_every_mode(mode, response):
    """The paper's code: [0] * (T - 1) + [lambda * -10] for a too-short response, whatever
    --reward_type says (QA: 5 * -10 = -50), with no aspect reward, aspect_only included."""
    params = HolisticParams(mu=-4.8961, sigma=3.0596, min_response_chars=3)
    segments = {"factuality": [SegmentScore(0, len(response), 0.5)]}
    result = combine_response(response, 3.0, segments, params, [FACTUALITY], mode)
    assert result.degenerate and result.holistic_normalized == -10.0
    assert [(d.end, d.reward) for d in result.dense] == [(len(response), -50.0)]
    assert result.reward == -50.0
    assert not result.aspects_applied and not result.gate_passed
    # The aspect's own value is still reported, for logging.
    assert result.aspects["factuality"].value == pytest.approx(sigmoid(0.5))


def test_a_floor_above_the_threshold_does_not_open_the_gate():
    params = HolisticParams(threshold=0.6, weight=5.0, degenerate_floor=1.0)
    result = combine_response(
        "", 3.0, {"factuality": [SegmentScore(0, 0, 0.5)]}, params, [FACTUALITY]
    )
    assert result.reward == 5.0 and not result.aspects_applied


@pytest.mark.parametrize("response", ["", " ", "\t\n"])
def test_an_empty_response_is_degenerate_even_with_no_minimum(response):
    result = combine_response(response, 3.0, {}, HolisticParams(min_response_chars=0), [])
    assert result.degenerate and result.holistic_normalized == -10.0
    assert not combine_response("a", 3.0, {}, HolisticParams(min_response_chars=0), []).degenerate


def test_combination_defaults_are_the_papers_qa_settings():
    """docs/method.md section 2: eps 0.6, lambda 5, r_h forced to -10 for degenerate responses."""
    config = CombinationConfig()
    assert config.mode is CombineMode.hierarchical
    assert config.threshold == 0.6
    assert config.holistic_weight == 5.0
    assert config.min_response_chars == 1
    assert config.degenerate_floor == -10.0
    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    params = RewardConfig.model_validate({"holistic": holistic}).holistic_params()
    assert (params.threshold, params.weight, params.min_response_chars) == (0.6, 5.0, 1)
    assert params.degenerate_floor == -10.0
    assert (params.mu, params.sigma) == (0.0, 1.0)  # no normalisation unless configured
    defaults = HolisticParams()
    assert (defaults.threshold, defaults.weight, defaults.degenerate_floor) == (0.6, 5.0, -10.0)


def test_aspects_default_to_the_sigmoid_and_weight_one_as_every_alarm_run():
    params = AspectParams("factuality")
    assert (params.weight, params.scale, params.shift, params.sigmoid) == (1.0, 1.0, 0.0, True)
    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    rule = {"name": "length", "kind": "rule", "mean": 60}
    config = RewardConfig.model_validate({"holistic": holistic, "aspects": [rule]})
    assert config.aspect_params() == (AspectParams("length", 1.0, 1.0, 0.0, True),)


def test_unscored_segments_contribute_nothing_and_are_reported():
    segments = {"factuality": [SegmentScore(0, 21, 0.5), SegmentScore(22, 38, None)]}
    params = HolisticParams(mu=0.0, sigma=1.0, threshold=0.0, weight=1.0)
    result = combine_response(RESPONSE, 1.0, segments, params, [FACTUALITY])
    assert result.aspects["factuality"].segments[1].reward is None
    assert result.aspects["factuality"].value == pytest.approx(sigmoid(0.5))
    assert result.reward == pytest.approx(sigmoid(0.5) + 1.0)


def test_weights_scale_each_aspect():
    heavy = AspectParams("factuality", weight=2.0)
    params = HolisticParams(mu=0.0, sigma=1.0, threshold=0.0, weight=0.0)
    result = combine_response(RESPONSE, 1.0, SEGMENTS, params, [heavy])
    assert result.reward == pytest.approx(2 * (sigmoid(0.5) + sigmoid(-0.5)))


def test_sigmoid_is_stable_for_extreme_values():
    assert sigmoid(-1000.0) == 0.0
    assert sigmoid(1000.0) == 1.0
