"""Token encodings shared: each distinct (tokenizer, text) is encoded once per memo.

A PPO request carries several responses to one prompt, and aspect models fine-tuned from
one base (Fine-Grained RLHF's relevance, factuality and completeness RMs) share a
tokenizer and a template: without the memo every item and every model would encode the
same prompt, or the same whole text, again. Tokenizers are matched by what they do (their
serialised pipeline), not by path, so two copies of one tokenizer share their encodings.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.models.text_encoders import Encoding, TextEncoder, WrapperEncoder, pipeline_encoder


def tokenizer_key(tokenizer: Any) -> str:
    """Equal for tokenizers that encode every text alike: a fast tokenizer's class, its
    serialised pipeline (normaliser, pre-tokeniser, vocabulary, special-token template) and
    `split_special_tokens`, the one encoding setting kept outside it. A slow tokenizer is
    matched only with itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"object:{id(tokenizer)}"
    cls = type(tokenizer)
    split_specials = getattr(tokenizer, "split_special_tokens", False)
    state = f"{cls.__module__}.{cls.__qualname__}\n{split_specials}\n{backend.to_str()}"
    return "sha256:" + hashlib.sha256(state.encode()).hexdigest()


class SharedTokenizer:
    """A model's tokenizer with the key its encodings are shared under. Wrap it after its
    last change (pad token, added tokens): the key and the encoder are chosen here, once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.key = tokenizer_key(tokenizer)
        self.encoder: TextEncoder = pipeline_encoder(tokenizer) or WrapperEncoder(tokenizer)

    def encode(
        self, texts: Sequence[str], add_special_tokens: bool, offsets: bool
    ) -> list[Encoding]:
        """One batched call for all `texts`."""
        if not texts:
            return []
        return self.encoder(texts, add_special_tokens, offsets)


@dataclass
class _TokenizerShelf:
    """One tokenizer's encodings within a memo; its lock makes each text encoded once even
    when two threads ask for it at the same moment (the engine gives each thread call a
    memo of its own; the lock keeps a memo safe wherever else it is used)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    encodings: dict[tuple[bool, bool, str], Encoding] = field(default_factory=dict)
    asked: set[tuple[bool, bool, str]] = field(default_factory=set)  # read by an `encode`
    encoded: int = 0
    reused: int = 0


class EncodingMemo:
    """Encodings for one request, or for the requests tokenised together in one thread
    call (`prepare_together`); safe to use from several tokenizer threads at once.
    Models with different tokenizers never wait for each other."""

    def __init__(self) -> None:
        self._shelves: dict[str, _TokenizerShelf] = {}
        self._shelves_lock = threading.Lock()

    def encode(
        self,
        tokenizer: SharedTokenizer,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        offsets: bool = False,
    ) -> list[Encoding]:
        """`texts` encoded, in order; only those this memo has not encoded yet (with this
        tokenizer and these switches) reach the tokenizer, in one call. The first ask
        for a text counts as encoded, later ones as reused (`encode_ahead` counts nothing)."""
        shelf = self._shelf(tokenizer)
        keys = [(add_special_tokens, offsets, text) for text in texts]
        with shelf.lock:
            self._fill(shelf, tokenizer, keys, add_special_tokens, offsets)
            first_asks = set(keys) - shelf.asked
            shelf.asked |= first_asks
            shelf.encoded += len(first_asks)
            shelf.reused += len(keys) - len(first_asks)
            return [shelf.encodings[key] for key in keys]

    def encode_ahead(
        self,
        tokenizer: SharedTokenizer,
        texts: Sequence[str],
        add_special_tokens: bool = True,
        offsets: bool = False,
    ) -> None:
        """Encode in one call the `texts` that later `encode` calls will ask for one or a
        few at a time: one batched call costs far less than one call per item."""
        shelf = self._shelf(tokenizer)
        keys = [(add_special_tokens, offsets, text) for text in texts]
        with shelf.lock:
            self._fill(shelf, tokenizer, keys, add_special_tokens, offsets)

    def _shelf(self, tokenizer: SharedTokenizer) -> _TokenizerShelf:
        with self._shelves_lock:
            return self._shelves.setdefault(tokenizer.key, _TokenizerShelf())

    @staticmethod
    def _fill(
        shelf: _TokenizerShelf,
        tokenizer: SharedTokenizer,
        keys: list[tuple[bool, bool, str]],
        add_special_tokens: bool,
        offsets: bool,
    ) -> None:
        """Encode the keys the shelf lacks, each once, in one call (under the shelf's lock);
        every key was made with these switches."""
        missing = list(dict.fromkeys(key for key in keys if key not in shelf.encodings))
        if missing:
            fresh = tokenizer.encode([text for _, _, text in missing], add_special_tokens, offsets)
            shelf.encodings.update(zip(missing, fresh, strict=True))

    @property
    def encoded(self) -> int:
        """Distinct texts asked for (each reached a tokenizer once, ahead or when asked)."""
        return sum(shelf.encoded for shelf in self._shelf_list())

    @property
    def reused(self) -> int:
        """Texts answered from an earlier encoding in this memo."""
        return sum(shelf.reused for shelf in self._shelf_list())

    def _shelf_list(self) -> list[_TokenizerShelf]:
        with self._shelves_lock:
            return list(self._shelves.values())
