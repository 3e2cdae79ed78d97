"""Tiny, fully offline models and tokenizers for the test suite.

There is no model hub in CI, so every model the tests load is built here from a config with a
fixed seed and saved with ``save_pretrained``. Each ``build_*`` call gives bit-identical weights
in every process, and each folder reloads with ``AutoTokenizer`` and the matching
``AutoModelFor*`` class. Building one takes well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

__all__ = [
    "CHAT_TEMPLATE",
    "build_byte_tokenizer",
    "build_causal_lm",
    "build_deberta_scalar_rm",
    "build_encoder_scalar_rm",
    "build_llama_scalar_rm",
    "build_roberta_encoder",
    "build_segment_classifier",
]

SEED = 0
HIDDEN, LAYERS, HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 128, 2048

# `<s>{role}\n{content}</s>\n` per turn, then `<s>assistant\n` as the generation prompt. The
# rendered text already holds `<s>`: tokenise it with add_special_tokens=False to avoid two BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}"
)


def _byte_tokenizer(
    specials: Sequence[str],
    single: str,
    pair: str,
    template_specials: Sequence[str],
    **wrapper_kwargs: str,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is one token, so nothing needs training.

    The ByteLevel pre-tokenizer keeps offsets as character spans into the original string
    (both byte tokens of "é" map to its one character), and TemplateProcessing does not trim
    them, so a space token's span is exactly its space.
    """
    vocab: dict[str, int] = {}
    for token in specials:
        vocab.setdefault(token, len(vocab))
    # alphabet() comes back in a different order in every process: sort it for stable ids.
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    unk = wrapper_kwargs.get("unk_token")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Not normalized, no lstrip/rstrip: the literal text "</s>" is one token whose offsets
    # cover exactly those four characters (the spaces around it stay byte tokens).
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in vocab if t in specials]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in template_specials]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
        **wrapper_kwargs,
    )


def build_byte_tokenizer(extra_specials: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Llama-style byte tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, extras, then 256 bytes.

    add_special_tokens=True prepends <s> only (like Llama); no EOS is appended.
    """
    return _byte_tokenizer(
        ["<pad>", "<s>", "</s>", "<unk>", *extra_specials],
        single="<s> $A",
        pair="<s> $A <s> $B",
        template_specials=["<s>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _roberta_style_tokenizer(specials: Sequence[str]) -> PreTrainedTokenizerFast:
    """<s> A </s> (pair: <s> A </s> </s> B </s>); `specials` in id order: the pad id differs
    between the models built here (RoBERTa's own puts <pad> at 1)."""
    return _byte_tokenizer(
        specials,
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        template_specials=["<s>", "</s>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, folder: Path | str) -> Path:
    """Save model and tokenizer side by side, as a downloaded checkpoint would be."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sizes(tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Shared tiny sizes. Configs are built with from_dict: transformers 5 configs are typed
    dataclasses, and architecture extras (DeBERTa's position_buckets...) are not fields."""
    return {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "pad_token_id": tok.pad_token_id,
    }


def _llama_config(tok: PreTrainedTokenizerFast, **extra: Any) -> LlamaConfig:
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    return LlamaConfig.from_dict({**_sizes(tok), "num_key_value_heads": HEADS, **ids, **extra})


def build_llama_scalar_rm(folder: Path | str, seed: int = SEED) -> Path:
    """Decoder reward model (UltraRM/Skywork style): one scalar read at the last non-pad token."""
    tok = build_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1))
    return _save(model, tok, folder)


def build_deberta_scalar_rm(folder: Path | str, seed: int = SEED) -> Path:
    """Encoder reward model (OpenAssistant DeBERTa style): scalar from the pooled [CLS] token.

    The byte tokenizer with a BERT template: [CLS] A [SEP] (pair: [CLS] A [SEP] B [SEP]).
    The config mirrors deberta-v3 (relative attention, no absolute positions).
    """
    tok = _byte_tokenizer(
        ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        template_specials=["[CLS]", "[SEP]"],
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )
    config = DebertaV2Config.from_dict(
        {
            **_sizes(tok),
            "max_position_embeddings": 512,
            "type_vocab_size": 0,
            "relative_attention": True,
            "position_biased_input": False,
            "pos_att_type": ["p2c", "c2p"],
            "max_relative_positions": -1,
            "position_buckets": 256,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "num_labels": 1,
        }
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(config)
    return _save(model, tok, folder)


def build_segment_classifier(folder: Path | str, seed: int = SEED, num_labels: int = 2) -> Path:
    """Fine-Grained RLHF style token classifier: the text carries a literal "</s>" after each
    segment and the label is read at those positions.

    RoBERTa-like tokenizer (<s> ... </s>, sep_token == "</s>") on a BERT encoder, 2 labels
    unless told (Fine-Grained RLHF's own have 3).
    """
    tok = _roberta_style_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
    config = BertConfig.from_dict({**_sizes(tok), "type_vocab_size": 1, "num_labels": num_labels})
    torch.manual_seed(seed)
    model = BertForTokenClassification(config)
    return _save(model, tok, folder)


def build_roberta_encoder(folder: Path | str, seed: int = SEED) -> Path:
    """Sentence encoder whose positions count from the pad id + 1 (RoBERTa, XLM-R, MPNet
    style), unlike BERT's from 0: packed rows must restart their positions there."""
    tok = _roberta_style_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    config = RobertaConfig.from_dict({**_sizes(tok), "type_vocab_size": 1})
    torch.manual_seed(seed)
    return _save(RobertaModel(config), tok, folder)


def build_encoder_scalar_rm(folder: Path | str, family: str, seed: int = SEED) -> Path:
    """Encoder reward model with the head of `family`: "bert" (its pooler, then a linear
    classifier) or "roberta" (a dense + out_proj head, positions from the pad id + 1)."""
    torch.manual_seed(seed)
    if family == "bert":
        tok = _roberta_style_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<mask>"])
        config = BertConfig.from_dict({**_sizes(tok), "type_vocab_size": 1, "num_labels": 1})
        return _save(BertForSequenceClassification(config), tok, folder)
    tok = _roberta_style_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    config = RobertaConfig.from_dict({**_sizes(tok), "type_vocab_size": 1, "num_labels": 1})
    return _save(RobertaForSequenceClassification(config), tok, folder)


def build_causal_lm(folder: Path | str, seed: int = SEED) -> Path:
    """Tiny policy / generative scorer: LlamaForCausalLM with the byte tokenizer and a chat
    template, so log p(response | templated prompt) can be computed end to end."""
    tok = build_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tok, tie_word_embeddings=False))
    model.generation_config.pad_token_id = tok.pad_token_id
    return _save(model, tok, folder)
