"""Split a response into sentence or sub-sentence spans (character offsets into the text).

A small rule-based splitter so the service needs no NLTK data download; spans are what the
rewards are keyed to, so they must map exactly back into the original string.
"""

from __future__ import annotations

import re
from enum import StrEnum


class SplitUnit(StrEnum):
    sentence = "sentence"
    subsentence = "subsentence"


_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "u.s",
        "u.k",
        "no",
        "fig",
        "al",
        "approx",
        "inc",
        "ltd",
        "co",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
    ]
)
# Terminal punctuation (plus closing quotes/brackets) followed by whitespace or the end.
# Tried only where a run of it begins, and never given back: otherwise a run of n marks
# followed by a letter (a policy's "!!!!...a") is tried from each of its n starts, and
# each try walks to the run's end, n^2 steps with the GIL held.
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++[\"')\]]*+(?=\s|$)")
_CLAUSE_END = re.compile(r"[,;:](?=\s)")


# Far longer than any abbreviation with its quotes: the word before a dot is looked for only
# this far back, so a text of sentences with no space between them (tabs) stays linear.
_WORD_WINDOW = 64


def _is_abbreviation(text: str, dot_at: int) -> bool:
    start = max(0, dot_at - _WORD_WINDOW)
    window = text[start:dot_at]
    cut = max(window.rfind(" "), window.rfind("\n"))
    if cut < 0 and start > 0:
        return False  # the word begins before the window: longer than any abbreviation
    word = window[cut + 1 :].lower().strip("\"'(")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _strip_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _cut(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    piece_start = start
    # A slice, not finditer's pos: a lookbehind would see the text before `start`.
    for match in pattern.finditer(text[start:end]):
        match_start, match_end = start + match.start(), start + match.end()
        if match.group().startswith(".") and _is_abbreviation(text, match_start):
            continue
        span = _strip_span(text, piece_start, match_end)
        if span:
            spans.append(span)
        piece_start = match_end
    tail = _strip_span(text, piece_start, end)
    if tail:
        spans.append(tail)
    return spans


def split_spans(text: str, unit: SplitUnit = SplitUnit.sentence) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) spans covering every non-blank part of `text`, in order."""
    spans = _cut(text, 0, len(text), _SENTENCE_END)
    if unit is SplitUnit.subsentence:
        spans = [piece for s, e in spans for piece in _cut(text, s, e, _CLAUSE_END)]
    return spans
