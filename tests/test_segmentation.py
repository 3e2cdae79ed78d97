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


# Sub-sentences as Fine-Grained RLHF cuts them (reward_utils.split_text_to_subsentences, the
# split its relevance RM was trained and run on). The expected pieces below were worked out
# by hand from that rule: words are whitespace-separated; a break may follow a word ending
# in , ; ! or ? (not :) only if at least 6 words follow it; a piece under 5 words joins the
# next one if it is the sentence's first, else the one before it.
SUBSENTENCE_CASES = [
    # 8 words: no break leaves 6 words after it. (The old splitter gave 4 pieces.)
    ("Yes, it is red: bright red, and blue.", ["Yes, it is red: bright red, and blue."]),
    ("First, we go; then, we stop.", ["First, we go; then, we stop."]),
    # 22 words, breaks after word 6 ("1889,") and word 14 ("world,").
    (
        "The tower was built in 1889, it was the tallest structure in the world, and it is"
        " still a popular attraction today.",
        [
            "The tower was built in 1889,",
            "it was the tallest structure in the world,",
            "and it is still a popular attraction today.",
        ],
    ),
    # "however," is a 1-word middle piece: it joins the piece before it.
    (
        "The committee met on Monday morning, however, the vote was delayed until the"
        " following week.",
        [
            "The committee met on Monday morning, however,",
            "the vote was delayed until the following week.",
        ],
    ),
    # "Yes," is a short first piece: it joins the piece after it.
    (
        "Yes, the capital of France is Paris, which lies on the river Seine in the north.",
        ["Yes, the capital of France is Paris,", "which lies on the river Seine in the north."],
    ),
    # No break at the colon; "sugar and eggs;" (3 words) joins the piece before it.
    (
        "The recipe needs three things: flour, sugar and eggs; bake it for an hour at low heat.",
        [
            "The recipe needs three things: flour, sugar and eggs;",
            "bake it for an hour at low heat.",
        ],
    ),
    # Only 4 words after "year,": no break.
    (
        "The museum opened in the spring of that year, and closed soon after.",
        ["The museum opened in the spring of that year, and closed soon after."],
    ),
    # The limits: a first piece of exactly 5 words and a last piece of exactly 6 words.
    (
        "Alpha beta gamma delta epsilon, zeta eta theta iota kappa lambda.",
        ["Alpha beta gamma delta epsilon,", "zeta eta theta iota kappa lambda."],
    ),
    (
        "Alpha beta gamma delta, epsilon zeta eta theta iota kappa.",
        ["Alpha beta gamma delta, epsilon zeta eta theta iota kappa."],
    ),
    (
        "Alpha beta gamma delta epsilon, zeta eta theta iota kappa.",
        ["Alpha beta gamma delta epsilon, zeta eta theta iota kappa."],
    ),
    # The word's last character decides: "apples,pears" and "(red,)" end no piece.
    (
        "We bought apples,pears and plums (red,) and then we walked home slowly together.",
        ["We bought apples,pears and plums (red,) and then we walked home slowly together."],
    ),
    # Each sentence is cut on its own; any whitespace separates words.
    (
        "Short one.  \n A longer sentence follows here,\n\tand it keeps going for a few more"
        " words.",
        [
            "Short one.",
            "A longer sentence follows here,",
            "and it keeps going for a few more words.",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), SUBSENTENCE_CASES, ids=range(len(SUBSENTENCE_CASES)))
def test_subsentences_follow_fine_grained_rlhf(text, expected):
    assert texts(text, SplitUnit.subsentence) == expected


def test_subsentence_spans_are_character_offsets_into_the_response():
    text = "  Yes, the capital of France is Paris, which lies on the river Seine in the north. Ok"
    # Hand-counted: "Yes" starts at 2, "Paris," ends at 38 (30 characters, 6 spaces), "which"
    # starts at 39 and "north." ends at 82 (35 + 8 spaces), "Ok" is 83..85.
    assert split_spans(text, SplitUnit.subsentence) == [(2, 38), (39, 82), (83, 85)]


def fine_grained_rlhf_subsentence_starts(tokens, min_subsent_words=5):
    """Fine-Grained RLHF's get_sub_sentence_starts, transcribed as the reference."""
    is_subsent_starts = [True]
    prev_tok = tokens[0]
    prev_subsent_start_idx = 0
    for i, tok in enumerate(tokens[1:]):
        tok_id = i + 1
        if re.match("[,;!?]", prev_tok[-1]) and tok_id + min_subsent_words < len(tokens):
            if tok_id - prev_subsent_start_idx < min_subsent_words:
                if prev_subsent_start_idx > 0:
                    is_subsent_starts += [True]
                    is_subsent_starts[prev_subsent_start_idx] = False
                    prev_subsent_start_idx = tok_id
                else:
                    is_subsent_starts += [False]
            else:
                is_subsent_starts += [True]
                prev_subsent_start_idx = tok_id
        else:
            is_subsent_starts += [False]
        prev_tok = tok
    return is_subsent_starts


def reference_subsentences(text):
    """Fine-Grained RLHF's per-sentence cut (words found by str.split and str.find, as it
    does), over this service's sentences, as stripped text pieces."""
    pieces = []
    for start, end in split_spans(text):
        sentence = text[start:end]
        tokens, at, cursor = sentence.split(), [], 0
        for token in tokens:
            cursor = sentence.find(token, cursor)
            at.append(cursor)
            cursor += len(token)
        keeps = fine_grained_rlhf_subsentence_starts(tokens)
        starts = [a for a, keep in zip(at, keeps, strict=True) if keep]
        bounds = [*starts, len(sentence)]
        pieces += [sentence[a:b].strip() for a, b in itertools.pairwise(bounds)]
    return pieces


def test_subsentences_match_the_transcribed_fine_grained_rlhf_rule():
    rng = random.Random(1)
    words = ["a", "bb", "c,", "d;", "e!", "f?", "g:", "h.", "(i,)", "j,k", "Dr."]
    gaps = [" ", " ", " ", "  ", "\n", "\t"]
    for _ in range(5000):
        n = rng.randint(1, 40)
        text = "".join(rng.choice(words) + rng.choice(gaps) for _ in range(n))
        assert texts(text, SplitUnit.subsentence) == reference_subsentences(text), text


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


@pytest.mark.timeout(30)  # a guard against a hang, not a speed check
@pytest.mark.parametrize("word", ["a, ", "a,\t", "yes, it is so; ", "no "])
def test_a_long_sentence_is_cut_into_subsentences_in_one_pass(word):
    """One 100,000+ character sentence with a break candidate after (nearly) every word."""
    text = word * (100_000 // len(word))
    spans = split_spans(text, SplitUnit.subsentence)
    assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
