"""Readability: the Flesch-Kincaid grade level of a whole response, z-normalised.

What the paper's MT code computes (textstat.flesch_kincaid_grade, then (grade - mu) /
sigma with mu 11.19907, sigma 6.04406, added with a positive weight: a higher grade level
is a higher reward), computed here without textstat. Syllables are pyphen's hyphenation
points + 1 from its bundled en_US dictionary (what textstat did before it began
downloading a pronouncing dictionary): offline and deterministic, if a little low on words
hyphenation never splits ("about", "area"). Departures from textstat: sentences come from
the service's splitter, and the grade is not rounded to one decimal.
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

HYPHENATION_LANGUAGE = "en_US"  # the Flesch-Kincaid constants are for English
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")  # letters or digits, inner apostrophes kept


def flesch_kincaid_grade(text: str, hyphenator: Any) -> float | None:
    """0.39 words/sentence + 11.8 syllables/word - 15.59; None when there are no words."""
    words = _WORD.findall(text)
    if not words:
        return None
    sentences = max(1, len(split_spans(text, SplitUnit.sentence)))
    syllables = sum(len(hyphenator.positions(word)) + 1 for word in words)
    return 0.39 * len(words) / sentences + 11.8 * syllables / len(words) - 15.59


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
        grade = flesch_kincaid_grade(response, self._hyphenator)
        raw = None if grade is None else (grade - self._spec.mu) / self._spec.sigma
        return Prepared(rows=((),), truncated=False, meta=SegmentScore(0, len(response), raw))

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [AspectScore((p.meta,), False) for p in batch]

    def describe(self) -> dict[str, Any]:
        return {
            "formula": "flesch_kincaid_grade",
            "syllables": self._syllables,
            "mu": self._spec.mu,
            "sigma": self._spec.sigma,
        }
