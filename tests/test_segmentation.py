"""Sentence and sub-sentence spans map exactly back into the response."""

import itertools

import pytest

from service.segmentation import SplitUnit, split_spans


def texts(text, unit=SplitUnit.sentence):
    return [text[s:e] for s, e in split_spans(text, unit)]


def test_sentences_split_on_terminal_punctuation():
    assert texts("Paris is big. Is it old? Yes!  It is.") == [
        "Paris is big.",
        "Is it old?",
        "Yes!",
        "It is.",
    ]


def test_abbreviations_and_initials_do_not_end_sentences():
    assert texts("Dr. Smith met J. Doe in the U.S. in 1990. Then he left.") == [
        "Dr. Smith met J. Doe in the U.S. in 1990.",
        "Then he left.",
    ]


def test_decimals_and_trailing_text_without_punctuation():
    assert texts("It costs 3.5 dollars. And more") == ["It costs 3.5 dollars.", "And more"]


def test_subsentences_split_on_clause_punctuation():
    assert texts("First, we go; then, we stop.", SplitUnit.subsentence) == [
        "First,",
        "we go;",
        "then,",
        "we stop.",
    ]


@pytest.mark.parametrize("text", ["", "   ", "\n\n"])
def test_blank_text_has_no_spans(text):
    assert split_spans(text) == []


def test_spans_are_ordered_disjoint_and_cover_all_non_blank_text():
    text = ' "Quoted." (Bracketed.) Next line\nwith a break. Last'
    spans = split_spans(text)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    covered = "".join(text[s:e] for s, e in spans)
    assert "".join(covered.split()) == "".join(text.split())
