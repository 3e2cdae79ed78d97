"""How lm_likelihood cuts an item longer than max_length: the prompt first, from its left,
keeping its leading BOS; a response too long alone at `truncation_side`."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.config import RewardConfig
from service.models import EncodingMemo, load_models

LIMIT = 40


def lm(tiny_paths, tmp_path: Path, **extra):
    spec = {
        "name": "lm",
        "kind": "lm_likelihood",
        "path": str(tiny_paths["causal_lm"]),
        "device": "cpu",
        "max_length": LIMIT,
        **extra,
    }
    return load_models(RewardConfig.model_validate({"holistic": spec}), tmp_path)[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_long_prompt_keeps_its_bos_and_its_end_before_the_response(tiny_paths, tmp_path, side):
    model = lm(tiny_paths, tmp_path, truncation_side=side)
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["causal_lm"])
    item = model.prepare("x" * 200 + " the question?", "Short answer.", EncodingMemo())
    row = list(item.rows[0])
    response = tokenizer("Short answer.", add_special_tokens=False)["input_ids"]
    # The chat template ends the prompt with "</s>\n<s>assistant\n": kept before the response.
    header = tokenizer("question?</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]
    assert item.truncated and len(row) == LIMIT
    assert row[0] == tokenizer.bos_token_id
    assert row[-len(response) - len(header) :] == header + response
    assert item.meta == LIMIT - len(response)  # the first scored token: the response's first
    (score,) = model.run([item])
    assert score.raw is not None and score.truncated


@pytest.mark.parametrize(
    ("side", "kept"), [("left", slice(-(LIMIT - 1), None)), ("right", slice(0, LIMIT - 1))]
)
def test_a_response_too_long_alone_is_cut_at_truncation_side(tiny_paths, tmp_path, side, kept):
    model = lm(tiny_paths, tmp_path, truncation_side=side)
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["causal_lm"])
    response = "".join(f"{i} " for i in range(40))
    item = model.prepare("Count.", response, EncodingMemo())
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    # One prompt token conditions the response: the prompt's BOS, kept as ever.
    assert list(item.rows[0]) == [tokenizer.bos_token_id, *response_ids[kept]]
    assert item.meta == 1
