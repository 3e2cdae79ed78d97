"""The example configs carry the paper's settings (docs/method.md section 2) and read the
Fine-Grained RLHF classifiers' labels as the paper's code does.

long-form-QA/my_reward.py (ALaRM, after Fine-Grained RLHF): factuality takes the argmax over
labels [0, 2] (0 = factual error, 2 = no error), relevance over [1, 2] (2 = no error).
"""

from pathlib import Path

import pytest

from service.combine import CombineMode
from service.config import load_reward_config
from service.segmentation import SplitUnit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _aspects(name):
    return {a.name: a for a in load_reward_config(EXAMPLES / name).aspects}


@pytest.mark.parametrize("name", ["qa_alarm.yaml", "qa_all_aspects.yaml"])
def test_factuality_reads_labels_0_and_2_per_sentence(name):
    factuality = _aspects(name)["factuality"]
    assert factuality.label_values == {0: -0.5, 2: 0.5}
    assert factuality.split is SplitUnit.sentence


def test_relevance_reads_labels_1_and_2_per_subsentence():
    relevance = _aspects("qa_all_aspects.yaml")["relevance"]
    assert relevance.label_values == {1: -0.3, 2: 0.3}
    assert relevance.split is SplitUnit.subsentence
    assert relevance.prefix_template == "question: {prompt} answer:"


@pytest.mark.parametrize(
    ("path", "threshold", "holistic_weight", "mu", "sigma", "kept"),
    [
        (EXAMPLES / "qa_alarm.yaml", 0.6, 5.0, -4.8961, 3.0596, "factuality"),
        (EXAMPLES / "mt_alarm.yaml", 0.5, 3.0, -2.3442, 2.9463, "grammar"),
    ],
)
def test_the_alarm_examples_are_the_papers_settings(
    path, threshold, holistic_weight, mu, sigma, kept
):
    config = load_reward_config(path)
    combination = config.combination
    assert combination.mode is CombineMode.hierarchical
    assert (combination.threshold, combination.holistic_weight) == (threshold, holistic_weight)
    assert combination.degenerate_floor == -10.0
    assert (config.holistic.mu, config.holistic.sigma) == (mu, sigma)
    (aspect,) = config.aspects
    assert (aspect.name, aspect.weight, aspect.scale, aspect.shift) == (kept, 1.0, 1.0, 0.0)
    assert aspect.sigmoid  # every ALaRM run shaped its aspect with the sigmoid


def test_completeness_is_the_papers_transform():
    completeness = _aspects("qa_all_aspects.yaml")["completeness"]
    assert completeness.scale == pytest.approx(0.3 / 8.30116, rel=1e-9)
    assert completeness.shift == 0.44678
    assert completeness.sigmoid


def test_the_default_config_gates_as_the_papers_qa_setting():
    """The embedded default's combination is the QA setting's (its holistic statistics are
    its own, measured as the README says)."""
    combination = load_reward_config(None).combination
    assert combination.mode is CombineMode.hierarchical
    assert (combination.threshold, combination.holistic_weight) == (0.6, 5.0)
    assert (combination.min_response_chars, combination.degenerate_floor) == (1, -10.0)
