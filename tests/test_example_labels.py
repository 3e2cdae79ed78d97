"""The example configs read the Fine-Grained RLHF classifiers' labels as the paper's code does.

long-form-QA/my_reward.py (ALaRM, after Fine-Grained RLHF): factuality takes the argmax over
labels [0, 2] (0 = factual error, 2 = no error), relevance over [1, 2] (2 = no error).
"""

from pathlib import Path

import pytest

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
