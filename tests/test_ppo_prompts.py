"""What the PPO policy sees of a long prompt: cut in its content, never in its template."""

import pytest

from tests.tiny_models import CHAT_TEMPLATE, build_byte_tokenizer
from trainer_client.ppo.prompts import fit_prompt, templated, templated_ids

PASSAGE = "question: Who wrote Hamlet? context: " + "Hamlet is a tragedy. " * 40


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_a_long_prompt_is_cut_in_its_content_and_keeps_the_assistant_header(chat_tokenizer):
    limit = 64
    assert len(templated_ids(chat_tokenizer, PASSAGE)) > 4 * limit
    fitted = fit_prompt(chat_tokenizer, PASSAGE, limit)
    ids = templated_ids(chat_tokenizer, fitted)
    assert len(ids) <= limit
    assert len(ids) >= limit - 2  # cut no more than it must
    assert PASSAGE.startswith(fitted)  # the question is kept, the passage's end goes
    header = templated(chat_tokenizer, "").split("\n", 1)[1]  # what follows the empty turn
    assert templated(chat_tokenizer, fitted).endswith(header)


def test_a_prompt_that_fits_is_left_alone(chat_tokenizer):
    assert fit_prompt(chat_tokenizer, "Say hi.", 64) == "Say hi."


def test_a_limit_the_template_alone_meets_leaves_an_empty_prompt(chat_tokenizer):
    template_only = len(templated_ids(chat_tokenizer, ""))
    assert fit_prompt(chat_tokenizer, PASSAGE, template_only) == ""


def test_a_limit_the_template_alone_exceeds_is_refused(chat_tokenizer):
    template_only = len(templated_ids(chat_tokenizer, ""))
    with pytest.raises(ValueError, match=f"template alone takes {template_only} tokens"):
        fit_prompt(chat_tokenizer, PASSAGE, template_only - 1)


def test_without_a_template_the_prompt_itself_is_cut_at_its_end():
    tokenizer = build_byte_tokenizer()
    assert not tokenizer.chat_template
    fitted = fit_prompt(tokenizer, PASSAGE, 50)
    assert len(templated_ids(tokenizer, fitted)) <= 50
    assert PASSAGE.startswith(fitted)
