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
model's maximum); a tokenizer whose class overrides a step of transformers' call path
(or switches language modes per call) keeps its call.
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
    """`texts` in one batched call, in order; offsets only when asked."""

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

    name = type(tokenizer).__name__
    try:  # a pipeline that cannot be copied or probed loses only the direct path
        pipeline = Tokenizer.from_str(backend.to_str())
        pipeline.no_truncation()
        pipeline.no_padding()
        pipeline.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        direct, wrapped = PipelineEncoder(pipeline), WrapperEncoder(tokenizer)
        texts = probe_texts(tokenizer)
        same = all(
            direct(texts, add_special_tokens, True) == wrapped(texts, add_special_tokens, True)
            for add_special_tokens in (True, False)
        )
    except Exception as exc:
        log.info("%s encodes through its own call: its pipeline failed a probe (%r)", name, exc)
        return None
    if not same:
        log.info("%s encodes through its own call: its pipeline encodes otherwise", name)
        return None
    return direct


def _calls_the_pipeline_as_is(tokenizer: Any) -> bool:
    """True for a fast tokenizer whose class keeps transformers' own steps from the call to
    the pipeline and back, and has no per-call language mode (MBart, NLLB: the call
    rebuilds the post-processor each time, which a copy would not follow)."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    own_steps = [
        (PreTrainedTokenizerBase, "__call__"),
        (PreTrainedTokenizerBase, "_get_padding_truncation_strategies"),
        (TokenizersBackend, "_encode_plus"),
        (TokenizersBackend, "set_truncation_and_padding"),
        (TokenizersBackend, "_convert_encoding"),
    ]
    return (
        isinstance(tokenizer, TokenizersBackend)
        and not hasattr(tokenizer, "_switch_to_input_mode")
        and all(getattr(cls, step) is getattr(base, step) for base, step in own_steps)
    )


def probe_texts(tokenizer: Any) -> list[str]:
    """Texts on which the two paths must agree: plain, blank, Unicode, every special
    token written in the text, and one longer than the tokenizer's maximum length up to
    8,192 words (520 where it sets none), where a call that truncated by default would
    differ."""
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
