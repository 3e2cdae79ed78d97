"""Each distinct (tokenizer, text) is encoded once per request, by any number of items and
models, and every model still gets exactly its own text's encoding."""

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import RewardConfig
from service.models import Prepared, load_models, prepare_items, prepare_together
from service.models.encoding_memo import EncodingMemo, SharedTokenizer
from service.models.loading import load_tokenizer
from tests import tiny_models
from tests.conftest import asgi_client, tiny_config_dict, wait_ready

PROMPT = "Who wrote Hamlet?"
RESPONSES = ["Shakespeare.", "William Shakespeare did.", "Marlowe.", "Nobody knows."]


class CountingEncoder:
    """Delegates to a tokenizer's encoder, counting the texts it is given; `delay_s` holds
    each call open so that a second thread asking for the same texts arrives during it."""

    def __init__(self, encoder, delay_s: float = 0.0) -> None:
        self._encoder = encoder
        self._delay_s = delay_s
        self.texts: list[str] = []
        self.calls = 0

    def __call__(self, texts, add_special_tokens, offsets):
        self.calls += 1
        self.texts += texts
        time.sleep(self._delay_s)
        return self._encoder(texts, add_special_tokens, offsets)


def counted(tokenizer, delay_s: float = 0.0) -> tuple[SharedTokenizer, CountingEncoder]:
    shared = SharedTokenizer(tokenizer)
    counter = CountingEncoder(shared.encoder, delay_s)
    shared.encoder = counter
    return shared, counter


@pytest.fixture(scope="module")
def segment_tokenizer_paths(tmp_path_factory) -> list:
    """Two token classifiers with different weights and one tokenizer, as Fine-Grained
    RLHF's aspect RMs are."""
    root = tmp_path_factory.mktemp("shared-tokenizer")
    return [tiny_models.build_segment_classifier(root / f"seed{s}", seed=s) for s in (1, 2)]


def test_every_text_is_encoded_once_and_each_caller_gets_its_own_texts_encoding(tiny_paths):
    tokenizer = load_tokenizer(str(tiny_paths["llama_rm"]))
    shared, counter = counted(tokenizer)
    memo = EncodingMemo()
    first = memo.encode(shared, [PROMPT, RESPONSES[0], PROMPT])
    second = memo.encode(shared, [RESPONSES[1], PROMPT, RESPONSES[0]])
    assert counter.texts == [PROMPT, RESPONSES[0], RESPONSES[1]]
    assert (memo.encoded, memo.reused) == (3, 3)
    asked = [PROMPT, RESPONSES[0], PROMPT, RESPONSES[1], PROMPT, RESPONSES[0]]
    for text, encoding in zip(asked, first + second, strict=True):
        assert list(encoding.ids) == tokenizer(text)["input_ids"]
    assert memo.encode(shared, []) == []
    # Special tokens and offsets change the encoding: each variant is its own entry.
    bare = memo.encode(shared, [PROMPT], add_special_tokens=False)[0]
    assert list(bare.ids) == tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert bare.ids != first[0].ids and bare.offsets is None
    spans = memo.encode(shared, [PROMPT], offsets=True)[0]
    direct = tokenizer(PROMPT, return_offsets_mapping=True)
    assert list(spans.offsets) == [tuple(s) for s in direct["offset_mapping"]]
    assert counter.texts[3:] == [PROMPT, PROMPT]


def test_copies_of_one_tokenizer_share_encodings_and_other_tokenizers_do_not(
    segment_tokenizer_paths, tiny_paths
):
    first, first_count = counted(load_tokenizer(str(segment_tokenizer_paths[0])))
    second, second_count = counted(load_tokenizer(str(segment_tokenizer_paths[1])))
    other, other_count = counted(load_tokenizer(str(tiny_paths["llama_rm"])))
    memo = EncodingMemo()
    from_first = memo.encode(first, RESPONSES)
    from_second = memo.encode(second, RESPONSES)
    from_other = memo.encode(other, RESPONSES)
    assert first.key == second.key != other.key
    assert (first_count.texts, second_count.texts) == (RESPONSES, [])
    assert other_count.texts == RESPONSES
    assert from_second == from_first != from_other


def test_a_tokenizer_that_splits_special_tokens_is_not_shared_with_one_that_does_not(
    segment_tokenizer_paths,
):
    path = str(segment_tokenizer_paths[0])
    whole = SharedTokenizer(load_tokenizer(path))
    split = SharedTokenizer(load_tokenizer(path, split_special_tokens=True))
    memo = EncodingMemo()
    text = "Paris. </s> Rome."
    (kept,) = memo.encode(whole, [text])
    (cut,) = memo.encode(split, [text])
    assert whole.key != split.key and kept.ids != cut.ids
    assert list(cut.ids) == split.tokenizer(text)["input_ids"]


def test_two_threads_asking_for_one_text_at_once_encode_it_once(segment_tokenizer_paths):
    tokenizer = load_tokenizer(str(segment_tokenizer_paths[0]))
    shared, counter = counted(tokenizer, delay_s=0.2)
    memo = EncodingMemo()
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(memo.encode(shared, RESPONSES)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.texts == RESPONSES
    assert results[0] == results[1] and (memo.encoded, memo.reused) == (4, 4)


def test_encoding_ahead_fills_the_memo_in_one_call_and_counts_as_encode_alone_would(
    tiny_paths,
):
    shared, counter = counted(load_tokenizer(str(tiny_paths["llama_rm"])))
    ahead, alone = EncodingMemo(), EncodingMemo()
    ahead.encode_ahead(shared, [PROMPT, *RESPONSES, PROMPT])
    assert counter.calls == 1 and counter.texts == [PROMPT, *RESPONSES]
    assert (ahead.encoded, ahead.reused) == (0, 0)  # nothing has been asked for yet
    for memo in (ahead, alone):
        for response in RESPONSES:
            memo.encode(shared, [PROMPT, response])
    assert counter.calls == 1 + len(RESPONSES)  # `alone` reached the tokenizer per item
    assert (ahead.encoded, ahead.reused) == (alone.encoded, alone.reused) == (5, 3)
    # Other switches are other encodings: encoded ahead only when asked for with them.
    bare = ahead.encode(shared, [PROMPT], add_special_tokens=False)[0]
    assert counter.calls == 6 and bare.ids != ahead.encode(shared, [PROMPT])[0].ids


def test_a_requests_items_reach_each_tokenizer_in_one_call_and_prepare_as_alone(
    tiny_paths, segment_tokenizer_paths, tmp_path
):
    """Every adapter that tokenises: the same inputs as item by item, one call per tokenizer
    (two for the LM: prompts and responses are encoded with different switches)."""
    aspects = [
        {"name": "relevance", "kind": "embedding_similarity", "path": str(tiny_paths["llama_rm"])},
        {"name": "factuality", "kind": "segment_classifier", "path": str(tiny_paths["segment"])},
        {"name": "completeness", "kind": "sequence_scalar", "path": str(tiny_paths["deberta_rm"])},
        {
            "name": "tokens",
            "kind": "rule",
            "unit": "tokens",
            "mean": 20,
            "tokenizer_path": str(tiny_paths["causal_lm"]),
        },
    ]
    holistic = {"name": "lm", "kind": "lm_likelihood", "path": str(tiny_paths["causal_lm"])}
    config = RewardConfig.model_validate({"holistic": holistic, "aspects": aspects})
    pairs = [(PROMPT, response) for response in RESPONSES] + [("Why?", "Because. It is so.")]
    for model in load_models(config, tmp_path):
        alone = [model.prepare(prompt, response, EncodingMemo()) for prompt, response in pairs]
        shared, counter = counted(model._shared_tokenizer.tokenizer)
        model._shared_tokenizer = shared
        memo = EncodingMemo()
        assert prepare_items(model, pairs, memo) == alone, model.kind
        assert counter.calls == (2 if model.kind == "lm_likelihood" else 1), model.kind
        # Each distinct text once: the LM's prompt and the relevance rows' prompt repeat.
        assert len(counter.texts) == len(set(counter.texts)) == memo.encoded, model.kind
        # Two requests that arrived together: still one call per tokenizer for both.
        counter.calls, counter.texts, memo = 0, [], EncodingMemo()
        outcomes = prepare_together([(model, pairs[:2]), (model, pairs[2:])], memo)
        assert outcomes == [(True, alone[:2]), (True, alone[2:])], model.kind
        assert counter.calls == (2 if model.kind == "lm_likelihood" else 1), model.kind
        assert len(counter.texts) == len(set(counter.texts)) == memo.encoded, model.kind


class PickyModel:
    """Rejects one response in `encode_ahead` and in `prepare` alike, as a tokenizer that
    raises on a text would; counts the pairs handed to each `encode_ahead` call."""

    name, role, kind, device, fingerprint = "picky", "aspect", "picky", "cpu", "picky"

    def __init__(self) -> None:
        self.ahead: list[int] = []

    def encode_ahead(self, pairs, memo) -> None:
        self.ahead.append(len(pairs))
        if any(response == "bad" for _, response in pairs):
            raise ValueError("bad text")

    def prepare(self, prompt, response, memo) -> Prepared:
        if response == "bad":
            raise ValueError("bad text")
        return Prepared(rows=((len(prompt), len(response)),), truncated=False)

    def run(self, batch):
        raise NotImplementedError  # never run here

    def describe(self):
        return {}


def test_a_text_that_fails_fails_only_the_request_that_sent_it_among_requests_prepared_together():
    model = PickyModel()
    outcomes = prepare_together(
        [(model, [("q", "good"), ("q", "fine")]), (model, [("q", "bad")]), (model, [("q", "ok")])],
        EncodingMemo(),
    )
    assert model.ahead == [4]  # all three requests' pairs in one call, which failed
    assert outcomes[0] == (True, [Prepared(((1, 4),), False), Prepared(((1, 4),), False)])
    assert outcomes[1][0] is False and isinstance(outcomes[1][1], ValueError)
    assert outcomes[2] == (True, [Prepared(((1, 2),), False)])


def encoded_texts(metrics_text: str) -> dict[str, float]:
    family = next(
        f for f in text_string_to_metric_families(metrics_text) if f.name == "alarm_encoded_texts"
    )
    return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}


async def test_a_request_encodes_each_distinct_text_once_across_items_and_models(
    tiny_paths, segment_tokenizer_paths, tmp_path
):
    """Four responses to one prompt; a relevance encoder and two segment classifiers that
    share one tokenizer. Without sharing, the aspects alone would encode 16 texts."""
    factuality, completeness = (
        {
            "name": name,
            "kind": "segment_classifier",
            "path": str(path),
            "device": "cpu",
            "max_length": 256,
            "label_values": {0: -0.5, 1: 0.5},
        }
        for name, path in zip(("factuality", "completeness"), segment_tokenizer_paths, strict=True)
    )
    relevance = {
        "name": "relevance",
        "kind": "embedding_similarity",
        "path": str(segment_tokenizer_paths[0]),
        "device": "cpu",
        "max_length": 256,
    }
    config = RewardConfig.model_validate(
        tiny_config_dict(
            tiny_paths, aspects=[relevance, factuality, completeness], cache={"max_items": 0}
        )
    )
    items = [{"prompt": PROMPT, "response": response} for response in RESPONSES]
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        alone = [
            (await client.post("/v1/rewards", json={"items": [item]})).json()["results"][0]
            for item in items
        ]
        before = encoded_texts((await client.get("/metrics")).text)
        together = await client.post("/v1/rewards", json={"items": items})
        after = encoded_texts((await client.get("/metrics")).text)
    assert together.status_code == 200, together.text
    # Holistic: 4 templated texts (its own tokenizer). Relevance: the prompt once (3 reuses)
    # and 4 responses. The two classifiers' 4 texts: encoded by one, reused by the other.
    assert after["encoded"] - before["encoded"] == 4 + 5 + 4
    assert after["reused"] - before["reused"] == 3 + 4
    for shared, own in zip(together.json()["results"], alone, strict=True):
        assert shared["reward"] == pytest.approx(own["reward"], abs=1e-5)
        for name in ("relevance", "factuality", "completeness"):
            assert shared["aspects"][name]["value"] == pytest.approx(
                own["aspects"][name]["value"], abs=1e-5
            )
