"""Texts to token ids: straight through a fast tokenizer's Rust pipeline where that is
exactly what the tokenizer's own call gives.

A transformers call wraps the Rust `encode_batch` in Python: argument checks, truncation
and padding state set on the shared backend, the result converted into a `BatchEncoding`.
On the 2-CPU VM that wrapper took 0.02 ms of a 0.1 ms encode when warm and 0.1 to 0.2 ms
more after 20 ms asleep (a request's tokenising after a forward; `benchmarks/HISTORY.md`,
session 32), all of it holding the GIL the event loop needs. The direct path encodes
with a private copy of the pipeline, so no other caller's truncation or padding can reach
it, and it is used only where it gives the same ids and offsets as the tokenizer's own
call on probe texts (special tokens written in the text, Unicode, a text longer than the
model's maximum); any tokenizer whose class changes how a call encodes keeps its call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoding:
    """Immutable: one encoding is handed to every model that asks for its text."""

    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...] | None  # each token's character span, if asked


class TextEncoder(Protocol):
    def __call__(
        self, texts: Sequence[str], add_special_tokens: bool, offsets: bool
    ) -> list[Encoding]: ...


class WrapperEncoder:
    """The tokenizer's own call. Always given a list, even of one text, so that no
    tokenizer applies a single-string special case (CodeLlama's `<FILL_ME>` infilling) to a
    trainer's text; not verbose: the models cut their inputs themselves, so the warning
    about a text longer than the tokenizer's maximum says nothing."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self, texts: Sequence[str], add_special_tokens: bool, offsets: bool
    ) -> list[Encoding]:
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=offsets,
            verbose=False,
        )
        spans = encoded["offset_mapping"] if offsets else [None] * len(texts)
        return [
            Encoding(tuple(ids), None if span is None else tuple(map(tuple, span)))
            for ids, span in zip(encoded["input_ids"], spans, strict=True)
        ]


class PipelineEncoder:
    """A private copy of a fast tokenizer's Rust pipeline, without truncation or padding;
    never changed after it is built, so tokenizer threads may share it."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(
        self, texts: Sequence[str], add_special_tokens: bool, offsets: bool
    ) -> list[Encoding]:
        encoded = self.pipeline.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [Encoding(tuple(e.ids), tuple(e.offsets) if offsets else None) for e in encoded]


def pipeline_encoder(tokenizer: Any) -> PipelineEncoder | None:
    """The direct path for `tokenizer`, or None where it would not encode exactly as the
    tokenizer's own call does (a slow tokenizer, a class with its own call, a probe text
    encoded differently)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not _calls_the_pipeline_as_is(tokenizer):
        return None
    from tokenizers import Tokenizer

    pipeline = Tokenizer.from_str(backend.to_str())
    pipeline.no_truncation()
    pipeline.no_padding()
    pipeline.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    direct, wrapped = PipelineEncoder(pipeline), WrapperEncoder(tokenizer)
    texts = probe_texts(tokenizer)
    for add_special_tokens in (True, False):
        if direct(texts, add_special_tokens, True) != wrapped(texts, add_special_tokens, True):
            log.info("%s encodes through its own call", type(tokenizer).__name__)
            return None
    return direct


def _calls_the_pipeline_as_is(tokenizer: Any) -> bool:
    """True for a fast tokenizer whose class keeps transformers' own `__call__` and
    `_encode_plus`, which hand the texts to the pipeline unchanged."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and cls._encode_plus is TokenizersBackend._encode_plus
    )


def probe_texts(tokenizer: Any) -> list[str]:
    """Texts on which the two paths must agree: plain, blank, Unicode, every special
    token written in the text, and one longer than the tokenizer's maximum length (a call
    that truncated by default would differ there)."""
    specials = " ".join(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    longest = getattr(tokenizer, "model_max_length", 512)
    words = min(int(longest), 8192) + 8 if longest and longest < 10**6 else 520
    return [
        "What is the capital of France? Paris.",
        "",
        "  spaced\tout\n\nlines  ",
        "naïve café, Ünïcödé, 東京, emoji 😀, Ελληνικά, عربى",
        f"text {specials} between specials",
        " ".join(["word"] * words),
    ]
