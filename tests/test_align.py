"""Dense rewards land on the policy's own tokens, for several tokenizers and padded batches."""

import itertools

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import build_byte_tokenizer
from trainer_client import align_rewards, align_rewards_batch, align_to_offsets

CORPUS = [
    "William Shakespeare wrote Hamlet around 1600.",
    "It is one of his tragedies, and it is long.",
    "Paris is the capital of France. Berlin is not.",
]


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[PAD]"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


TOKENIZERS = {
    "byte_level": build_byte_tokenizer,
    "wordpiece": wordpiece_tokenizer,
    "word_level": word_level_tokenizer,
}


def service_style_dense(response: str) -> list[dict]:
    """A segment reward at the end of each sentence plus the holistic term at len(response)."""
    ends = [i + 1 for i, ch in enumerate(response) if ch == "."]
    dense = [{"end": end, "reward": 0.1 * (k + 1)} for k, end in enumerate(ends)]
    dense.append({"end": len(response), "reward": 5.0})
    return dense


@pytest.mark.parametrize("name", TOKENIZERS)
def test_each_reward_sits_on_the_token_holding_its_last_character(name):
    tokenizer = TOKENIZERS[name]()
    response = "Paris is the capital of France. Berlin is not."
    rewards = align_rewards(service_style_dense(response), response, tokenizer)
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert len(rewards) == len(offsets)
    first_period = response.index(".")
    holder = max(i for i, (s, _) in enumerate(offsets) if s <= first_period)
    assert rewards[holder] == pytest.approx(0.1)
    assert rewards[-1] == pytest.approx(0.2 + 5.0)  # last sentence ends at len(response)
    assert sum(rewards) == pytest.approx(5.3)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_right_padded_batch_of_unequal_lengths_keeps_each_row_on_its_own_tokens(name):
    tokenizer = TOKENIZERS[name]()
    responses = ["Paris.", "William Shakespeare wrote Hamlet. It is long.", "Berlin is not."]
    dense = [service_style_dense(r) for r in responses]
    batch = align_rewards_batch(dense, responses, tokenizer)  # (B, L)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    assert batch.shape == (3, max(lengths))
    for row, (response, length) in enumerate(zip(responses, lengths, strict=True)):
        alone = torch.tensor(align_rewards(dense[row], response, tokenizer))
        assert torch.equal(batch[row, :length], alone)
        assert torch.all(batch[row, length:] == 0)  # nothing on padding
        assert batch[row, length - 1] >= 5.0  # the holistic term on the last real token
        assert batch[row].sum().item() == pytest.approx(sum(d["reward"] for d in dense[row]))


def test_multibyte_characters_map_to_the_last_byte_token():
    tokenizer = build_byte_tokenizer()
    response = "Café é."
    rewards = align_rewards([{"end": 4, "reward": 1.0}], response, tokenizer)
    offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    assert offsets[3] == offsets[4] == (3, 4)  # "é" is two byte tokens
    assert rewards[4] == 1.0 and sum(rewards) == 1.0


def test_an_empty_response_refuses_rather_than_dropping_the_reward():
    with pytest.raises(ValueError, match="no tokens"):
        align_to_offsets([{"end": 0, "reward": -50.0}], [])


def test_a_row_longer_than_the_width_is_an_error():
    with pytest.raises(ValueError, match="width"):
        align_rewards_batch([[{"end": 3, "reward": 1.0}]], ["abc"], build_byte_tokenizer(), 2)


def test_generated_token_offsets_keep_every_reward_on_the_generated_tokens():
    from trainer_client.align import generated_token_offsets

    tokenizer = build_byte_tokenizer()
    text = "Caf\u00e9 ok. Fin."
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    offsets = generated_token_offsets(tokens, tokenizer)
    assert offsets[-1] == (len(text), len(text))  # EOS decodes to nothing
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))  # contiguous spans
    rewards = align_to_offsets(service_style_dense(text), offsets)
    assert sum(rewards) == pytest.approx(0.1 + 0.2 + 5.0)
    assert rewards[-1] == 0.0 and rewards[-2] == pytest.approx(0.2 + 5.0)


@pytest.mark.parametrize("text", ["Caf\u00e9 \u00e9", "\u65e5\u672c\u8a9e\u3067\u3059\u3002"])
def test_generated_token_offsets_give_a_split_character_to_the_token_that_completes_it(text):
    """The audit: a prefix ending inside a multi-byte character decoded it as U+FFFD, one
    character long, so the character's first byte token took its reward (the holistic term
    too, for a response that ends on one), two tokens early for a CJK character."""
    from trainer_client.align import generated_token_offsets

    tokenizer = build_byte_tokenizer()
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > len(text)  # some characters take several byte tokens
    offsets = generated_token_offsets(tokens, tokenizer)
    for end in range(1, len(text) + 1):
        rewards = align_to_offsets([{"end": end, "reward": 1.0}], offsets)
        holder = rewards.index(1.0)
        prefix = tokenizer.decode(tokens[: holder + 1])
        assert prefix == text[:end], (end, prefix)  # its token completes character end - 1
