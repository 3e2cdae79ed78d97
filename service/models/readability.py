"""Readability: the Flesch reading ease of a whole response, z-normalised with static stats.

Syllables are pyphen's hyphenation points + 1 from its bundled en_US dictionary (what
textstat did before it began downloading a pronouncing dictionary): offline and
deterministic, if a little low on words hyphenation never splits ("about", "area").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

from service.combine import SegmentScore
from service.model_specs import ReadabilityAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo
from service.models.loading import fingerprint
from service.segmentation import SplitUnit, split_spans

HYPHENATION_LANGUAGE = "en_US"  # the Flesch constants are for English
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")  # letters or digits, inner apostrophes kept


def flesch_reading_ease(text: str, hyphenator: Any) -> float | None:
    """206.835 - 1.015 words/sentence - 84.6 syllables/word; None when there are no words."""
    words = _WORD.findall(text)
    if not words:
        return None
    sentences = max(1, len(split_spans(text, SplitUnit.sentence)))
    syllables = sum(len(hyphenator.positions(word)) + 1 for word in words)
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * syllables / len(words)


class ReadabilityModel:
    kind = "readability"
    role: Role = "aspect"
    device = "host"  # no tensors: scored in a tokenizer thread, never behind a forward

    def __init__(self, spec: ReadabilityAspect) -> None:
        import pyphen

        self.name = spec.name
        self._spec = spec
        self._hyphenator = pyphen.Pyphen(lang=HYPHENATION_LANGUAGE)
        self._syllables = f"pyphen=={version('pyphen')} {HYPHENATION_LANGUAGE}"
        self.fingerprint = fingerprint(self._syllables, spec.model_dump())

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        # Counting is the whole computation; it runs here, off the event loop.
        flesch = flesch_reading_ease(response, self._hyphenator)
        raw = None if flesch is None else (flesch - self._spec.mu) / self._spec.sigma
        return Prepared(rows=((),), truncated=False, meta=SegmentScore(0, len(response), raw))

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [AspectScore((p.meta,), False) for p in batch]

    def describe(self) -> dict[str, Any]:
        return {
            "formula": "flesch_reading_ease",
            "syllables": self._syllables,
            "mu": self._spec.mu,
            "sigma": self._spec.sigma,
        }
