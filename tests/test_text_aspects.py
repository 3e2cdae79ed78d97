"""Grammar, readability and language-confidence aspects on real text, and through the API."""

import re

import pytest

from service.combine import AspectParams, combine_response, shape_aspect_value, sigmoid
from service.config import RewardConfig
from service.errors import ConfigError
from service.model_specs import GrammarAspect, ReadabilityAspect
from service.models import EncodingMemo
from service.models.grammar import GrammarModel, error_segments
from service.models.language_confidence import LanguageConfidenceModel
from service.models.readability import ReadabilityModel
from service.selection import sequence_value
from tests.conftest import asgi_client, tiny_config_dict, wait_ready

# Reference answers from data/qa_feedback_sample.jsonl.
PLAIN_ANSWER = (
    "In her final screen appearance, actress Peggy Wood played the Mother Abbess in the "
    "1965 movie The Sound of Music."
)
DENSE_ANSWER = (
    "Although the chronological limits of this period are open to debate, the period of "
    "Enlightenment in Europe is said to have lasted between the 17th and 18th centuries. The "
    "period of time before that is described as the middle ages. The Petrine Era (Russia, "
    "1689\u20131725) would fall under this time period."
)
FRENCH = "Le chat dort sur la table de la cuisine depuis ce matin, car il fait froid dehors."
GERMAN = "Der Hund schläft im Garten, weil die Sonne heute den ganzen Tag scheint."
# Every word has one syllable: 12 words, 2 sentences, 12 syllables.
EASY = "The cat sat on the the mat. It was a good day."
# Flesch-Kincaid grade level, as textstat.flesch_kincaid_grade in the paper's MT code.
EASY_GRADE = 0.39 * 12 / 2 + 11.8 * 12 / 12 - 15.59
# The paper's MT readability statistics (docs/method.md section 2).
MT_MU, MT_SIGMA = 11.19907, 6.04406


def flag_teh(text: str) -> list[tuple[int, int]]:
    """A plugged-in checker: every 'teh' is an error."""
    return [(m.start(), m.end()) for m in re.finditer(r"\bteh\b", text)]


def out_of_range(text: str) -> list[tuple[int, int]]:
    return [(0, len(text) + 5)]


def aspect(spec: dict):
    """An aspect spec validated through the full config, as at start-up."""
    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x"}
    return RewardConfig.model_validate({"holistic": holistic, "aspects": [spec]}).aspects[0]


def grammar(**fields) -> GrammarModel:
    return GrammarModel(aspect({"name": "grammar", "kind": "grammar", **fields}))


def scored(model, response: str) -> list[tuple[int, int, float | None]]:
    (score,) = model.run([model.prepare("a question", response, EncodingMemo())])
    return [(s.start, s.end, s.raw) for s in score.segments]


def span_of(text: str, needle: str) -> tuple[int, int]:
    start = text.index(needle)
    return start, start + len(needle)


def words_in_error(segments: list[tuple[int, int, float | None]], text: str) -> list[str]:
    return [text[start:end].strip() for start, end, raw in segments if raw == -1.0]


def test_grammar_gives_minus_one_to_each_word_of_an_error_and_zero_to_every_other():
    """Spec: -1 inside a grammar-error span per token, 0 elsewhere; words stand in for tokens."""
    text = "Irregardless, " + PLAIN_ANSWER.replace("played the", "played the the")
    segments = scored(grammar(), text)
    assert words_in_error(segments, text) == ["Irregardless", "the", "the"]
    repeated = span_of(text, "the the")
    assert [end for _, end, raw in segments if raw == -1.0] == [
        len("Irregardless"),
        repeated[0] + len("the"),
        repeated[1],
    ]
    # One segment per word or punctuation run, covering the text in order.
    assert [e for _, e, _ in segments[:3]] == [12, 13, 16]  # "Irregardless", ",", " In"
    assert [s for s, _, _ in segments] == [0] + [e for _, e, _ in segments[:-1]]
    assert segments[-1][1] == len(text)


def test_the_sequence_value_is_minus_the_words_in_error():
    model = grammar()
    assert {raw for _, _, raw in scored(model, PLAIN_ANSWER)} == {0.0}
    text = "It was the the end. They met in july, irregardless of the rain."
    raws = [raw for _, _, raw in scored(model, text)]
    # "the the" (2 words), "july", "irregardless": 4 words, -1 each.
    assert sequence_value(raws, model._spec.aggregate) == -4.0


def test_grammar_offsets_are_characters_even_after_non_ascii_text():
    text = "“Naïve” résumé writers — it was the the end."
    start, end = span_of(text, "the the")
    assert [(s, e) for s, e, raw in scored(grammar(), text) if raw == -1.0] == [
        (start - 1, start + 3),
        (start + 3, end),
    ]


def test_error_segments_mark_every_word_an_error_touches_and_cover_the_text():
    text = "ab cd ef, gh"
    segments = error_segments(text, [(4, 7), (0, 1), (3, 4), (2, 3), (9, 9)])
    assert [(s.start, s.end, s.raw) for s in segments] == [
        (0, 2, -1.0),  # "ab": touched by (0, 1)
        (2, 5, -1.0),  # " cd": (3, 4) and (4, 7); (2, 3) is its leading space
        (5, 8, -1.0),  # " ef": (4, 7)
        (8, 9, 0.0),  # ","
        (9, 12, 0.0),  # " gh": the empty span flags nothing
    ]
    assert [(s.start, s.end, s.raw) for s in error_segments("", [])] == [(0, 0, 0.0)]
    assert [(s.start, s.end, s.raw) for s in error_segments("  ", [(0, 1)])] == [(0, 2, -1.0)]
    with pytest.raises(ValueError, match="outside the text"):
        error_segments("abcde", [(3, 6)])


@pytest.mark.timeout(10)  # a hang guard: this takes milliseconds
def test_many_long_overlapping_error_spans_cost_no_walk_over_their_words():
    # A plugged-in checker may return thousands of spans over the whole text; each span is
    # two binary searches (before: a walk over its words, 10,000 x 20,000 steps here).
    text = "word " * 20_000
    segments = error_segments(text, [(0, len(text))] * 10_000)
    assert len(segments) == 20_000 and all(s.raw == -1.0 for s in segments)


SAME_TEXT = "He go to the school yesterday and it rain all day long."


@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize(("scale", "shift", "weight"), [(1.0, 0.0, 1.0), (3.0, 2.0, 0.5)])
def test_more_or_longer_errors_never_raise_the_grammar_reward(sigmoid, scale, shift, weight):
    """The audit: one value per clean stretch made each extra error add s(0) = 0.5."""
    params = AspectParams("grammar", weight, scale, shift, sigmoid)

    def reward(*spans: tuple[int, int]) -> float:
        segments = error_segments(SAME_TEXT, spans)
        return sum(shape_aspect_value(s.raw, params) for s in segments if s.raw is not None)

    go, rain = span_of(SAME_TEXT, "go"), span_of(SAME_TEXT, "rain")
    long_error = span_of(SAME_TEXT, "it rain all")
    assert reward() > reward(go) > reward(go, rain)
    assert reward(rain) > reward(long_error)


def test_a_three_word_error_counts_three_without_the_sigmoid():
    text = "He have went to the school yesterday."
    raws = [s.raw for s in error_segments(text, [span_of(text, "have went to")])]
    assert sequence_value(raws, "sum") == -3.0


@pytest.mark.parametrize(("field", "value"), [("scale", 0), ("scale", -1.0), ("weight", -0.5)])
def test_grammar_shaping_that_would_pay_for_errors_fails_at_start_up(field, value):
    with pytest.raises(ValueError, match="errors must never pay"):
        aspect({"name": "g", "kind": "grammar", field: value})


def test_a_plugged_in_checker_spans_come_back_exactly():
    model = grammar(checker="tests.test_text_aspects:flag_teh")
    text = "teh cat sat on teh mat."
    assert scored(model, text) == [
        (0, 3, -1.0),
        (3, 7, 0.0),
        (7, 11, 0.0),
        (11, 14, 0.0),
        (14, 18, -1.0),
        (18, 22, 0.0),
        (22, 23, 0.0),
    ]
    assert model.describe()["checker"] == "tests.test_text_aspects:flag_teh"
    assert model.describe()["proselint_checks"] is None
    with pytest.raises(ValueError, match="outside the text"):
        grammar(checker="tests.test_text_aspects:out_of_range").prepare("q", "abc", EncodingMemo())


@pytest.mark.parametrize(
    ("fields", "error", "needle"),
    [
        ({"checker": "tests.test_text_aspects:nowhere"}, ConfigError, "checker: cannot import"),
        ({"checker": "no_such_package.mod:check"}, ConfigError, "checker: cannot import"),
        ({"checker": "tests.test_text_aspects:EASY"}, ConfigError, "not callable"),
        ({"checker": "not a reference"}, ValueError, "checker"),
        ({"proselint_checks": ["no_such_check"]}, ConfigError, "no_such_check"),
        (
            {"checker": "tests.test_text_aspects:flag_teh", "proselint_checks": ["nonwords"]},
            ValueError,
            "only without a checker",
        ),
    ],
)
def test_bad_grammar_settings_fail_at_start_up_naming_the_key(fields, error, needle):
    with pytest.raises(error, match=needle):
        grammar(**fields)


def test_grammar_defaults_to_the_papers_sigmoid_and_sums_for_selection():
    spec = aspect({"name": "g", "kind": "grammar"})
    assert isinstance(spec, GrammarAspect)
    assert (spec.granularity, spec.selection_direction, spec.aggregate, spec.sigmoid) == (
        "span",
        "higher",
        "sum",
        True,
    )


@pytest.mark.parametrize("errors", [(), ("go",), ("go", "rain")])
def test_with_grammar_defaults_passing_the_gate_never_lowers_the_reward(errors):
    """The audit: with grammar's old default (no sigmoid) a response with errors lost reward
    as its holistic score crossed the threshold (the MT setting: eps 0.5, lambda 3)."""
    holistic = {"name": "h", "kind": "sequence_scalar", "path": "x", "mu": -2.3442}
    config = RewardConfig.model_validate(
        {
            "holistic": {**holistic, "sigma": 2.9463},
            "aspects": [{"name": "grammar", "kind": "grammar"}],
            "combination": {"threshold": 0.5, "holistic_weight": 3.0},
        }
    )
    mt, params = config.holistic_params(), config.aspect_params()
    segments = {"grammar": error_segments(SAME_TEXT, [span_of(SAME_TEXT, e) for e in errors])}

    def reward(r_h: float) -> float:
        raw = r_h * mt.sigma + mt.mu
        return combine_response(SAME_TEXT, raw, segments, mt, params).reward

    below, at = reward(0.4999), reward(0.5)
    assert at - below > 0.5  # the aspect rewards come in positive


def readability(mu: float | None = None, sigma: float | None = None) -> ReadabilityModel:
    stats = {"mu": mu, "sigma": sigma}
    given = {key: value for key, value in stats.items() if value is not None}
    return ReadabilityModel(aspect({"name": "readability", "kind": "readability", **given}))


def test_readability_defaults_to_the_papers_mt_statistics():
    spec = aspect({"name": "r", "kind": "readability"})
    assert isinstance(spec, ReadabilityAspect)
    assert (spec.mu, spec.sigma, spec.selection_direction) == (MT_MU, MT_SIGMA, "higher")


def test_readability_is_the_z_normalised_flesch_kincaid_grade():
    # 2 words, 1 sentence; read-abil-i-ty + mat-ters = 6 syllables.
    hand = 0.39 * 2 / 1 + 11.8 * 6 / 2 - 15.59
    assert scored(readability(), "Readability matters.") == [
        (0, 20, pytest.approx((hand - MT_MU) / MT_SIGMA))
    ]
    assert scored(readability(10, 5), EASY) == [
        (0, len(EASY), pytest.approx((EASY_GRADE - 10) / 5))
    ]
    assert readability().describe()["formula"] == "flesch_kincaid_grade"


def test_a_dense_text_has_a_higher_grade_as_in_the_papers_sign():
    """The paper adds (grade - mu) / sigma with a positive weight: harder text, higher raw."""
    model = readability(0, 1)
    ((_, _, easy),) = scored(model, EASY)
    ((_, _, plain),) = scored(model, PLAIN_ANSWER)
    ((_, _, dense),) = scored(model, DENSE_ANSWER)
    assert easy < plain < dense
    assert dense - easy > 10  # grade levels: a grade-school text against an academic one


def test_readability_leaves_a_text_without_words_unscored():
    assert scored(readability(), "") == [(0, 0, None)]
    assert scored(readability(), " ... ") == [(0, 5, None)]
    with pytest.raises(ValueError, match="sigma"):
        aspect({"name": "r", "kind": "readability", "mu": 60, "sigma": 0})


def language(code: str = "en") -> LanguageConfidenceModel:
    spec = aspect({"name": "lang", "kind": "language_confidence", "language": code})
    return LanguageConfidenceModel(spec)


def test_language_confidence_is_high_for_the_target_language_only():
    english, french = language("en"), language("fr")
    assert english.confidence(PLAIN_ANSWER) > 0.9
    assert english.confidence(DENSE_ANSWER) > 0.9
    assert english.confidence(FRENCH) < 0.01
    assert english.confidence(GERMAN) < 0.01
    assert french.confidence(FRENCH) > 0.9
    assert language("de").confidence(GERMAN) > 0.9


def test_language_confidence_is_deterministic_and_sequence_level():
    model = language()
    first = scored(model, PLAIN_ANSWER)
    assert first == scored(language(), PLAIN_ANSWER)
    assert [(s, e) for s, e, _ in first] == [(0, len(PLAIN_ANSWER))]
    assert scored(model, "   ") == [(0, 3, None)]


def test_an_unknown_language_fails_at_start_up():
    with pytest.raises(ConfigError, match="language"):
        language("xx")
    with pytest.raises(ValueError, match="language"):
        aspect({"name": "lang", "kind": "language_confidence", "language": "English"})


async def test_text_aspects_score_through_the_http_api(tiny_paths, tmp_path):
    aspects = [
        {"name": "grammar", "kind": "grammar"},
        {"name": "readability", "kind": "readability"},
        {"name": "english", "kind": "language_confidence", "language": "en", "sigmoid": False},
    ]
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, aspects=aspects))
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        items = [{"prompt": "Describe the cat.", "response": EASY}]
        reply = await client.post("/v1/rewards", json={"items": items})
        assert reply.status_code == 200, reply.text
        (result,) = reply.json()["results"]
        models = (await client.get("/v1/models")).json()["models"]

    grammar_result = result["aspects"]["grammar"]
    segments = [(s["start"], s["end"], s["raw"]) for s in grammar_result["segments"]]
    assert words_in_error(segments, EASY) == ["the", "the"]
    assert len(segments) == 14  # 12 words and 2 full stops
    rewards = [s["reward"] for s in grammar_result["segments"]]
    assert rewards == [pytest.approx(sigmoid(raw)) for _, _, raw in segments]
    assert grammar_result["value"] == pytest.approx(12 * 0.5 + 2 * sigmoid(-1.0))
    (readable,) = result["aspects"]["readability"]["segments"]
    assert readable["raw"] == pytest.approx((EASY_GRADE - MT_MU) / MT_SIGMA)
    (english,) = result["aspects"]["english"]["segments"]
    assert english["raw"] == pytest.approx(language().confidence(EASY)) and english["raw"] > 0.5
    assert english["reward"] == pytest.approx(english["raw"])
    shown = {m["name"]: (m["kind"], m["device"], m["details"].get("granularity")) for m in models}
    assert shown["grammar"] == ("grammar", "host", "span")
    assert shown["readability"] == ("readability", "host", "sequence")
    assert shown["english"] == ("language_confidence", "host", "sequence")
