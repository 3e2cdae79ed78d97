"""Sentence and sub-sentence spans map exactly back into the response."""

import itertools
import random
import re

import pytest

from service import segmentation
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


# The sentence-end pattern before it was made linear: the reference for what ends a sentence.
BACKTRACKING_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def test_sentence_ends_are_where_the_backtracking_pattern_put_them():
    """The linear pattern must cut exactly where the old one did, abbreviations included."""
    rng = random.Random(0)
    alphabet = ".!?\"')] \nae"
    samples = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(20000)
    ]
    samples += ['Dr. Smith met J. Doe!! Then... they left?" (Yes.) e.g. it is 3.5 m. End']
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segmentation, "_SENTENCE_END", BACKTRACKING_SENTENCE_END)
        expected = [split_spans(text) for text in samples]
    assert [split_spans(text) for text in samples] == expected


@pytest.mark.timeout(30)  # a guard against a hang, not a speed check: it takes milliseconds
@pytest.mark.parametrize("mark", [".", "!", "?"])
def test_a_long_run_of_terminal_marks_is_split_in_one_pass(mark):
    """A policy's "!!!!...a" of 100,000 characters took minutes with the GIL held (the
    pattern retried the run from each of its marks), stalling every request of the server."""
    text = mark * 100_000 + "a"
    assert split_spans(text) == [(0, len(text))]
    assert split_spans(text + " b") == [(0, len(text) + 2)]
    assert split_spans(text + mark + " b") == [(0, len(text) + 1), (len(text) + 2, len(text) + 3)]


@pytest.mark.timeout(30)  # a guard against a hang, not a speed check
def test_sentences_with_no_space_between_them_are_split_in_one_pass():
    """Each dot looked back for its word as far as the last space: with tabs between the
    sentences that was the whole text before it, for each of its dots."""
    text = "yes.\t" * 200_000  # 1M characters; before, 125k took 1.2 s and 1M far longer
    spans = split_spans(text)
    assert len(spans) == 200_000
    assert spans[0] == (0, 4) and spans[-1] == (len(text) - 5, len(text) - 1)
    assert split_spans("Dr. Who\tsaw e.g. this. Then") == [(0, 22), (23, 27)]
