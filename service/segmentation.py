"""Split a response into sentence or sub-sentence spans (character offsets into the text).

A small rule-based splitter so the service needs no NLTK data download; spans are what the
rewards are keyed to, so they must map exactly back into the original string.

Sub-sentences follow Fine-Grained RLHF's rule (its reward_utils.split_text_to_subsentences,
the split its relevance reward model was trained and run on): within each sentence, the
whitespace-separated words may break after a word whose last character is one of ",;!?",
but only where at least 6 words remain after the break; a piece of fewer than 5 words
joins the one after it when it is the sentence's first piece, the one before it otherwise.
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
_WORD = re.compile(r"\S+")
# Fine-Grained RLHF's sub-sentence rule: a word ending in one of these may end a piece...
_SUBSENTENCE_END_CHARS = frozenset(",;!?")
# ...whose words number at least this many, with more than this many words left after it.
_MIN_SUBSENTENCE_WORDS = 5


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


def _subsentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The sentence text[start:end] cut into sub-sentences as Fine-Grained RLHF cuts it
    (get_sub_sentence_starts over the sentence's whitespace-separated words), one pass."""
    words = [match.span() for match in _WORD.finditer(text, start, end)]
    if not words:
        return []
    first_words = [0]  # index of each piece's first word
    for i in range(1, len(words)):
        ends_piece = text[words[i - 1][1] - 1] in _SUBSENTENCE_END_CHARS
        if not ends_piece or i + _MIN_SUBSENTENCE_WORDS >= len(words):
            continue  # no punctuation, or fewer than 6 words would follow the break
        if i - first_words[-1] >= _MIN_SUBSENTENCE_WORDS:
            first_words.append(i)
        elif first_words[-1] > 0:
            first_words[-1] = i  # the short piece joins the one before it
        # else the short first piece joins the one after it
    ends = [words[i - 1][1] for i in first_words[1:]] + [words[-1][1]]
    return [(words[i][0], e) for i, e in zip(first_words, ends, strict=True)]


def split_spans(text: str, unit: SplitUnit = SplitUnit.sentence) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) spans covering every non-blank part of `text`, in order."""
    spans = _cut(text, 0, len(text), _SENTENCE_END)
    if unit is SplitUnit.subsentence:
        spans = [piece for s, e in spans for piece in _subsentences(text, s, e)]
    return spans
