"""Grammar errors as per-word rewards: -1 on each word an error touches, 0 on every other.

The paper's MT code (MT/train_ppo.py, get_finegrained_reward) gives every policy token a
value, `grammar_incorrect_reward` (-1) inside a LanguageTool match and
`grammar_correct_reward` (0) elsewhere, each through the sigmoid when shaping is on. The
service has no policy tokens, so words stand in for them: each word (or run of
punctuation) with the whitespace before it, as a SentencePiece token carries its leading
space, is one segment ending at the word's last character. Every segment's value depends
on its own characters only, so the number of segments is the text's, not the errors':
an error can only turn a 0 into a -1, and with any increasing shaping (sigmoid, positive
scale and non-negative weight, which GrammarAspect requires) more or longer errors never
raise the reward. Departures: words, not the policy's tokens, are counted (a trainer's
tokens split words further, so per-token sums are larger in the paper), and a word that an
error touches at all counts whole.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

from service.combine import SegmentScore
from service.model_specs import GrammarAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo
from service.models.grammar_checkers import ProselintChecker, Span, import_checker
from service.models.loading import fingerprint

ERROR_VALUE = -1.0
CLEAN_VALUE = 0.0
# A word (letters, digits, inner apostrophes) or a run of punctuation: what a tokenizer
# would at least split apart.
_UNIT = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]+")


def _checked(span: Sequence[int], length: int) -> Span:
    # A plugged-in checker is someone else's code: a bad span fails the item loudly rather
    # than shifting rewards onto the wrong characters.
    if len(span) != 2:
        raise ValueError(f"checker returned {span!r}, not a (start, end) pair")
    start, end = operator.index(span[0]), operator.index(span[1])
    if not 0 <= start <= end <= length:
        raise ValueError(f"checker span {(start, end)} lies outside the text (0..{length})")
    return start, end


def word_units(text: str) -> list[tuple[int, int, int]]:
    """(start, word_start, end) per word: [start, end) covers the text in order, the
    whitespace before a word included; trailing whitespace joins the last word."""
    words = [match.span() for match in _UNIT.finditer(text)]
    if not words:
        return [(0, 0, len(text))]
    units = []
    cursor = 0
    for word_start, word_end in words:
        units.append((cursor, word_start, word_end))
        cursor = word_end
    start, word_start, _ = units[-1]
    units[-1] = (start, word_start, len(text))
    return units


def error_segments(text: str, spans: Iterable[Sequence[int]]) -> tuple[SegmentScore, ...]:
    """One segment per word of `text`, in order: -1 where an error span touches the word,
    else 0. A span over whitespace alone marks the word that the whitespace precedes."""
    units = word_units(text)
    starts = [start for start, _, _ in units]
    word_starts = [word_start for _, word_start, _ in units]
    ends = [end for _, _, end in units]
    # +1 where a run of flagged words begins, -1 past its end: each span costs two binary
    # searches, not a walk over its words (a checker may return many long, overlapping spans).
    runs = [0] * (len(units) + 1)
    for start, end in (_checked(span, len(text)) for span in spans):
        if start == end:
            continue  # flags no character
        first = bisect.bisect_right(ends, start)  # the first word ending after `start`
        past = bisect.bisect_left(word_starts, end)  # the first word starting at `end` or on
        if first >= past:  # whitespace only: the word it belongs to
            first = max(bisect.bisect_right(starts, start) - 1, 0)
            past = first + 1
        runs[first] += 1
        runs[past] -= 1
    flagged = list(itertools.accumulate(runs[:-1]))
    return tuple(
        SegmentScore(start, end, ERROR_VALUE if bad else CLEAN_VALUE)
        for (start, _, end), bad in zip(units, flagged, strict=True)
    )


class GrammarModel:
    kind = "grammar"
    role: Role = "aspect"
    device = "host"  # no tensors: scored in a tokenizer thread, never behind a forward

    def __init__(self, spec: GrammarAspect) -> None:
        self.name = spec.name
        self._spec = spec
        if spec.checker:
            self._check = import_checker(spec.checker)
            self._source = spec.checker
        else:
            proselint = ProselintChecker(spec.proselint_checks)
            self._check = proselint
            self._source = proselint.version
        self.fingerprint = fingerprint(self._source, spec.model_dump())

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        # Checking is the whole computation, so it happens here (run() only packs it).
        segments = error_segments(response, self._check(response))
        return Prepared(rows=((),), truncated=False, meta=segments)

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [AspectScore(p.meta, False) for p in batch]

    def describe(self) -> dict[str, Any]:
        return {
            "checker": self._source,
            "proselint_checks": None if self._spec.checker else list(self._spec.proselint_checks),
        }
