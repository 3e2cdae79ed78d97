"""Grammar, readability and language-confidence aspects on real text, and through the API."""

import re

import pytest

from service.config import RewardConfig
from service.errors import ConfigError
from service.model_specs import GrammarAspect
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
EASY_FLESCH = 206.835 - 1.015 * 12 / 2 - 84.6 * 12 / 12


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


def test_grammar_errors_get_minus_one_on_exactly_their_characters():
    text = "Irregardless, " + PLAIN_ANSWER.replace("played the", "played the the")
    first, repeated = span_of(text, "Irregardless"), span_of(text, "the the")
    assert scored(grammar(), text) == [
        (0, first[1], -1.0),
        (first[1], repeated[0], 0.0),
        (repeated[0], repeated[1], -1.0),
        (repeated[1], len(text), 0.0),
    ]


def test_a_clean_answer_is_one_zero_span_and_the_sequence_value_counts_errors():
    model = grammar()
    assert scored(model, PLAIN_ANSWER) == [(0, len(PLAIN_ANSWER), 0.0)]
    text = "It was the the end. They met in july, irregardless of the rain."
    raws = [raw for _, _, raw in scored(model, text)]
    assert sequence_value(raws, model._spec.aggregate) == -3.0


def test_grammar_offsets_are_characters_even_after_non_ascii_text():
    text = "“Naïve” résumé writers — it was the the end."
    assert [(s, e) for s, e, raw in scored(grammar(), text) if raw == -1.0] == [
        span_of(text, "the the")
    ]


def test_error_segments_merge_overlaps_keep_neighbours_and_cover_the_text():
    segments = error_segments(10, [(6, 8), (1, 3), (2, 4), (4, 5)])
    assert [(s.start, s.end, s.raw) for s in segments] == [
        (0, 1, 0.0),
        (1, 4, -1.0),
        (4, 5, -1.0),
        (5, 6, 0.0),
        (6, 8, -1.0),
        (8, 10, 0.0),
    ]
    assert [(s.start, s.end, s.raw) for s in error_segments(0, [])] == [(0, 0, 0.0)]
    with pytest.raises(ValueError, match="outside the text"):
        error_segments(5, [(3, 6)])


def test_a_plugged_in_checker_spans_come_back_exactly():
    model = grammar(checker="tests.test_text_aspects:flag_teh")
    text = "teh cat sat on teh mat."
    assert scored(model, text) == [(0, 3, -1.0), (3, 15, 0.0), (15, 18, -1.0), (18, 23, 0.0)]
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


def test_grammar_defaults_count_errors_without_a_sigmoid():
    spec = aspect({"name": "g", "kind": "grammar"})
    assert isinstance(spec, GrammarAspect)
    assert (spec.granularity, spec.direction, spec.aggregate, spec.sigmoid) == (
        "span",
        "higher",
        "sum",
        False,
    )


def readability(mu: float = 60.0, sigma: float = 20.0) -> ReadabilityModel:
    spec = aspect({"name": "readability", "kind": "readability", "mu": mu, "sigma": sigma})
    return ReadabilityModel(spec)


def test_readability_is_a_z_normalised_flesch_score():
    # 2 words, 1 sentence; read-abil-i-ty + mat-ters = 6 syllables.
    hand = 206.835 - 1.015 * 2 / 1 - 84.6 * 6 / 2
    assert scored(readability(), "Readability matters.") == [
        (0, 20, pytest.approx((hand - 60) / 20))
    ]
    assert scored(readability(10, 5), EASY) == [
        (0, len(EASY), pytest.approx((EASY_FLESCH - 10) / 5))
    ]


def test_an_easy_text_reads_better_than_a_dense_one():
    model = readability(0, 1)
    ((_, _, easy),) = scored(model, EASY)
    ((_, _, plain),) = scored(model, PLAIN_ANSWER)
    ((_, _, dense),) = scored(model, DENSE_ANSWER)
    assert easy > plain > dense
    assert easy - dense > 40  # Flesch points: a grade-school text against an academic one


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
        {"name": "readability", "kind": "readability", "mu": 63.0, "sigma": 14.0},
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

    repeated = span_of(EASY, "the the")
    grammar_result = result["aspects"]["grammar"]
    assert [(s["start"], s["end"], s["raw"], s["reward"]) for s in grammar_result["segments"]] == [
        (0, repeated[0], 0.0, 0.0),
        (*repeated, -1.0, -1.0),
        (repeated[1], len(EASY), 0.0, 0.0),
    ]
    assert grammar_result["value"] == -1.0
    (readable,) = result["aspects"]["readability"]["segments"]
    assert readable["raw"] == pytest.approx((EASY_FLESCH - 63.0) / 14.0)
    (english,) = result["aspects"]["english"]["segments"]
    assert english["raw"] == pytest.approx(language().confidence(EASY)) and english["raw"] > 0.5
    assert english["reward"] == pytest.approx(english["raw"])
    shown = {m["name"]: (m["kind"], m["device"], m["details"].get("granularity")) for m in models}
    assert shown["grammar"] == ("grammar", "host", "span")
    assert shown["readability"] == ("readability", "host", "sequence")
    assert shown["english"] == ("language_confidence", "host", "sequence")
