"""Model adapters on tiny models built offline, through the real from_pretrained path."""

import re
from pathlib import Path

import pytest
import torch

from service.config import RewardConfig
from service.errors import ConfigError
from service.models import AspectScore, EncodingMemo, HolisticScore, load_models, prepare_items
from service.models.packaged import MINILM, PACKAGED_PREFIX
from tests.conftest import tiny_config_dict

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
RESPONSES = [
    "Shakespeare wrote it.",
    "William Shakespeare wrote Hamlet around 1600. It is one of his tragedies. It is long.",
    "",
    "No.",
]


def llama_holistic(paths) -> dict:
    return {"name": "h", "kind": "sequence_scalar", "path": str(paths["llama_rm"]), "device": "cpu"}


def load_holistic(spec: dict, tmp_path: Path):
    """Load one holistic model through the config and the real loader."""
    (model,) = load_models(RewardConfig.model_validate({"holistic": spec}), tmp_path)
    return model


def load_aspect(spec: dict, paths, tmp_path: Path):
    config = RewardConfig.model_validate({"holistic": llama_holistic(paths), "aspects": [spec]})
    return load_models(config, tmp_path)[1]


def assert_batch_invariant(model, prompt: str, responses: list[str]) -> None:
    """Each item scores the same alone as inside a padded, mixed-length batch."""
    prepared = [model.prepare(prompt, r, EncodingMemo()) for r in responses]
    together = model.run(prepared)
    for item, in_batch in zip(prepared, together, strict=True):
        (alone,) = model.run([item])
        if isinstance(alone, HolisticScore):
            if alone.raw is None:
                assert in_batch.raw is None
            else:
                assert in_batch.raw == pytest.approx(alone.raw, abs=1e-4)
        else:
            assert [s.raw for s in in_batch.segments] == pytest.approx(
                [s.raw for s in alone.segments], abs=1e-4
            )


@pytest.mark.parametrize("which", ["llama_rm", "deberta_rm"])
def test_sequence_scalar_is_batch_invariant_for_decoder_and_encoder(which, tiny_paths, tmp_path):
    spec = {"name": "h", "kind": "sequence_scalar", "path": str(tiny_paths[which]), "device": "cpu"}
    model = load_holistic(spec, tmp_path)
    assert model.role == "holistic"
    assert_batch_invariant(model, PROMPT, RESPONSES)


def test_decoder_scalar_reads_the_last_real_token_not_padding(tiny_paths, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = {
        "name": "h",
        "kind": "sequence_scalar",
        "path": str(tiny_paths["llama_rm"]),
        "device": "cpu",
    }
    model = load_holistic(spec, tmp_path)
    text = f"Human: {PROMPT}\nAssistant: {RESPONSES[0]}"
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["llama_rm"])
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_paths["llama_rm"])
    with torch.inference_mode():
        expected = reference(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()
    scored = model.run(
        [
            model.prepare(PROMPT, RESPONSES[0], EncodingMemo()),
            model.prepare(PROMPT, RESPONSES[1], EncodingMemo()),
        ]
    )
    assert scored[0].raw == pytest.approx(expected, abs=1e-4)


def test_sequence_scalar_truncation_is_reported(tiny_paths, tmp_path):
    spec = {
        "name": "h",
        "kind": "sequence_scalar",
        "path": str(tiny_paths["deberta_rm"]),
        "device": "cpu",
        "max_length": 16,
    }
    model = load_holistic(spec, tmp_path)
    item = model.prepare(PROMPT, RESPONSES[1], EncodingMemo())
    assert item.truncated and item.length == 16
    (score,) = model.run([item])
    assert score.truncated and score.raw is not None


def test_sequence_scalar_aspect_covers_the_whole_response(tiny_paths, tmp_path):
    aspect = {
        "name": "completeness",
        "kind": "sequence_scalar",
        "path": str(tiny_paths["deberta_rm"]),
        "device": "cpu",
    }
    model = load_aspect(aspect, tiny_paths, tmp_path)
    (score,) = model.run([model.prepare(PROMPT, RESPONSES[1], EncodingMemo())])
    assert isinstance(score, AspectScore)
    assert [(s.start, s.end) for s in score.segments] == [(0, len(RESPONSES[1]))]


def lm_spec(paths, **extra):
    return {
        "name": "lm",
        "kind": "lm_likelihood",
        "path": str(paths["causal_lm"]),
        "device": "cpu",
        **extra,
    }


@pytest.mark.parametrize("pack_rows", [True, False])
def test_lm_likelihood_equals_mean_log_prob_of_the_response(tiny_paths, tmp_path, pack_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_holistic(lm_spec(tiny_paths, pack_rows=pack_rows), tmp_path)
    assert model.describe()["packs_rows"] is pack_rows
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["causal_lm"])
    reference = AutoModelForCausalLM.from_pretrained(tiny_paths["causal_lm"])
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(RESPONSES[1], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.inference_mode():
        logp = torch.log_softmax(reference(ids).logits[0, :-1], -1)
    targets = ids[0, 1:]
    per_token = logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
    (score,) = model.run([model.prepare(PROMPT, RESPONSES[1], EncodingMemo())])
    assert score.raw == pytest.approx(per_token.mean().item(), abs=1e-4)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_lm_likelihood_is_batch_invariant_and_empty_response_is_unscored(
    tiny_paths, tmp_path, pack_rows
):
    model = load_holistic(lm_spec(tiny_paths, pack_rows=pack_rows), tmp_path)
    assert_batch_invariant(model, PROMPT, RESPONSES)
    (empty,) = model.run([model.prepare(PROMPT, "", EncodingMemo())])
    assert empty.raw is None
    # Unscored items beside scored ones, and a batch with no response token at all.
    memo = EncodingMemo()
    mixed = model.run([model.prepare(PROMPT, r, memo) for r in ("", RESPONSES[0], "")])
    (alone,) = model.run([model.prepare(PROMPT, RESPONSES[0], memo)])
    assert [m.raw is None for m in mixed] == [True, False, True]
    assert mixed[1].raw == pytest.approx(alone.raw, abs=1e-5)
    both = model.run([model.prepare(PROMPT, "", memo), model.prepare("Q?", "", memo)])
    assert [b.raw for b in both] == [None, None]


@pytest.mark.parametrize("forward_overhead_tokens", [100_000, 0])
def test_lm_likelihood_rows_packed_and_traced_score_as_right_padded_rows(
    tiny_paths, tmp_path, forward_overhead_tokens
):
    """Mixed lengths, an empty response (RESPONSES[2]) and a cut prompt, packed in one
    forward (a call costing more than any padding) or cut into several (a call costing
    nothing) whose outputs are gathered back in order."""
    batching = {"forward_overhead_tokens": forward_overhead_tokens}
    packed, padded = (
        load_models(
            RewardConfig.model_validate(
                {
                    "holistic": lm_spec(tiny_paths, max_length=96, pack_rows=pack),
                    "batching": batching,
                }
            ),
            tmp_path,
        )[0]
        for pack in (True, False)
    )
    assert (packed.describe()["packs_rows"], packed.describe()["traced"]) == (True, True)
    assert not padded.describe()["packs_rows"]
    # Its batches are cut by the batcher, packed or not (they then run on every CPU slot).
    assert not hasattr(packed, "padded_tokens") and not hasattr(padded, "padded_tokens")
    pairs = [(PROMPT, r) for r in RESPONSES]
    pairs += [(PROMPT * 5, "Short answer."), ("Q?", "No."), ("Why?", "Because it is so. " * 4)]
    items = prepare_items(packed, pairs, EncodingMemo())
    assert items == prepare_items(padded, pairs, EncodingMemo())
    forwards = packed._packer.forwards([item.length for item in items])
    assert (len(forwards) == 1) if forward_overhead_tokens else (len(forwards) > 1)
    for got, want in zip(packed.run(items), padded.run(items), strict=True):
        assert (got.raw is None) == (want.raw is None) and got.truncated == want.truncated
        if want.raw is not None:
            assert got.raw == pytest.approx(want.raw, abs=1e-4)
    assert [item.raw is None for item in packed.run(items)].count(True) == 1


def test_lm_likelihood_keeps_the_response_when_the_prompt_is_too_long(tiny_paths, tmp_path):
    model = load_holistic(lm_spec(tiny_paths, max_length=40), tmp_path)
    item = model.prepare(PROMPT * 5, "Short answer.", EncodingMemo())
    assert item.truncated and item.length == 40
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_paths["causal_lm"])
    response_ids = tokenizer("Short answer.", add_special_tokens=False)["input_ids"]
    assert list(item.rows[0][-len(response_ids) :]) == response_ids
    (score,) = model.run([item])
    assert score.raw is not None and score.truncated


def segment_spec(paths, **extra):
    return {
        "name": "factuality",
        "kind": "segment_classifier",
        "path": str(paths["segment"]),
        "device": "cpu",
        **extra,
    }


def load_segment(tiny_paths, tmp_path, **extra):
    return load_aspect(segment_spec(tiny_paths, **extra), tiny_paths, tmp_path)


def test_segment_classifier_scores_each_sentence_with_a_label_value(tiny_paths, tmp_path):
    model = load_segment(tiny_paths, tmp_path)
    response = RESPONSES[1]
    (score,) = model.run([model.prepare(PROMPT, response, EncodingMemo())])
    assert [response[s.start : s.end] for s in score.segments] == [
        "William Shakespeare wrote Hamlet around 1600.",
        "It is one of his tragedies.",
        "It is long.",
    ]
    assert all(s.raw in (-0.5, 0.5) for s in score.segments)


def test_segment_classifier_is_batch_invariant(tiny_paths, tmp_path):
    model = load_segment(tiny_paths, tmp_path)
    assert_batch_invariant(model, PROMPT, RESPONSES)


def test_separator_text_inside_the_prompt_does_not_shift_segments(tiny_paths, tmp_path):
    model = load_segment(tiny_paths, tmp_path)
    clean = model.prepare("Who? answer", RESPONSES[1], EncodingMemo())
    tricky = model.prepare("Who </s> wrote </s> it? answer", RESPONSES[1], EncodingMemo())
    _, clean_positions = clean.meta
    _, tricky_positions = tricky.meta
    assert len(clean_positions) == len(tricky_positions) == 3
    shift = len(tricky.rows[0]) - len(clean.rows[0])
    assert [p + shift for p in clean_positions] == list(tricky_positions)


def test_segments_lost_to_truncation_are_unscored_not_misaligned(tiny_paths, tmp_path):
    full = load_segment(tiny_paths, tmp_path)
    response = "First sentence here. Second one is here. Third is the last one."
    (reference,) = full.run([full.prepare("Q?", response, EncodingMemo())])
    prepared = full.prepare("Q?", response, EncodingMemo())
    _, positions = prepared.meta
    # Cut right after the second separator's segment starts: the third separator is lost.
    cut = load_segment(tiny_paths, tmp_path / "cut", max_length=positions[2])
    (truncated,) = cut.run([cut.prepare("Q?", response, EncodingMemo())])
    assert truncated.truncated
    assert [s.raw is None for s in truncated.segments] == [False, False, True]
    assert [s.raw for s in truncated.segments[:2]] == [s.raw for s in reference.segments[:2]]


def test_left_truncation_drops_the_prompt_first(tiny_paths, tmp_path):
    model = load_segment(tiny_paths, tmp_path, max_length=64, truncation_side="left")
    (score,) = model.run([model.prepare(PROMPT * 10, "One. Two.", EncodingMemo())])
    assert score.truncated
    assert all(s.raw is not None for s in score.segments)


def test_embedding_similarity_with_packaged_minilm_prefers_relevant_sentences(tiny_paths, tmp_path):
    spec = {
        "name": "relevance",
        "kind": "embedding_similarity",
        "path": PACKAGED_PREFIX + MINILM,
        "device": "cpu",
        "max_length": 128,
    }
    model = load_aspect(spec, tiny_paths, tmp_path)
    response = "Click 'Forgot password' on the login page to reset it. Bananas are yellow."
    (score,) = model.run([model.prepare("How do I reset my password?", response, EncodingMemo())])
    relevant, unrelated = (s.raw for s in score.segments)
    assert relevant > 0.5 > 0.2 > unrelated
    assert_batch_invariant(model, "How do I reset my password?", [response, "Yes.", ""])


def test_each_rows_cosine_is_with_its_own_items_prompt_row():
    from service.models.embedding_similarity import EmbeddingSimilarityModel

    embeddings = torch.nn.functional.normalize(torch.randn(7, 5), dim=-1)
    rows_per_item = [3, 1, 3]  # prompt + 2 segments, a prompt alone (no segments), prompt + 2
    got = EmbeddingSimilarityModel._cosines_with_prompts(embeddings, rows_per_item)
    expected, first = [], 0
    for rows in rows_per_item:  # the per-item formula it replaced
        item = embeddings[first : first + rows]
        expected.extend([1.0, *(item[1:] @ item[0]).tolist()])
        first += rows
    assert got == pytest.approx(expected, abs=1e-6)
    assert EmbeddingSimilarityModel._cosines_with_prompts(embeddings[:0], []) == []


def test_embedding_similarity_calls_as_many_ops_from_python_for_many_items_as_for_few(
    tiny_paths, tmp_path
):
    """Each op a forward calls from Python lets go of the GIL and takes it back: a step per
    item would multiply those hand-overs (and on a GPU copy every embedding back)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.workload import load_items

    spec = {"name": "relevance", "kind": "embedding_similarity", "path": PACKAGED_PREFIX + MINILM}
    model = load_aspect({**spec, "device": "cpu", "max_length": 128}, tiny_paths, tmp_path)
    items = load_items(32)

    def ops_from_python(count: int) -> int:
        batch = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items[:count]]
        model.run(batch)  # layouts cached, as the batcher leaves them
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            model.run(batch)
        return sum(1 for event in profiler.events() if event.cpu_parent is None)

    # Both batches run in one packed forward; a batch cut into several calls more.
    assert ops_from_python(32) == ops_from_python(4)


# On the CPU: a copy of a host array to the device is `lift_fresh` then `to`; a result read
# back into a list, `resolve_conj` then `resolve_neg`.
COPY_IN = ["aten::lift_fresh", "aten::to"]
READ_BACK = ["aten::resolve_conj", "aten::resolve_neg"]


def _called_from_python(model, batch) -> list[str]:
    """The ops `model.run(batch)` calls from Python, in order: a traced graph shows as one
    `forward`, whatever it runs inside."""
    from torch.profiler import ProfilerActivity, profile

    model.run(batch)  # layouts cached, as the batcher leaves them
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model.run(batch)
    return [event.name for event in profiler.events() if event.cpu_parent is None]


@pytest.mark.parametrize("family", ["llama", "deberta", "bert", "roberta"])
def test_a_traced_scalar_rm_builds_its_mask_and_runs_its_head_inside_the_graph(
    family, scalar_rms, tmp_path
):
    """Every op called from Python hands the GIL over and may wait up to the switch
    interval for it beside a busy event loop: the mask, the read of each row's token and
    the head run in the one traced call (34 ops from Python before, 8 now)."""
    from tests.test_packed_heads import _holistic, _short_items

    model = _holistic(scalar_rms[family], tmp_path)
    assert model.describe()["traced"]
    memo = EncodingMemo()
    batch = [model.prepare(p, r, memo) for p, r in _short_items(6)]
    # Rows the packer runs in one forward (the tiny models' dear attention cuts some).
    while len(model._packer.forwards([len(p.rows[0]) for p in batch])) > 1:
        batch = batch[:-1]
    assert len(batch) >= 2
    # Tokens and each row's read cell in, the graph, the scores to the host and to a list.
    assert _called_from_python(model, batch) == [
        *COPY_IN,
        *COPY_IN,
        "forward",
        "aten::to",
        *READ_BACK,
    ]


def test_traced_embeddings_pool_and_take_cosines_inside_the_graph(tiny_paths, tmp_path):
    """The mask, the pooling and each row's cosine with its item's prompt row run in the
    traced call when all rows run in one forward (37 ops from Python before, 8 now)."""
    from benchmarks.workload import load_items

    spec = {"name": "relevance", "kind": "embedding_similarity", "path": PACKAGED_PREFIX + MINILM}
    model = load_aspect({**spec, "device": "cpu", "max_length": 128}, tiny_paths, tmp_path)
    assert model.describe()["traced"]
    batch = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in load_items(4)]
    assert len(model._packer.forwards([len(row) for p in batch for row in p.rows])) == 1
    # Tokens and (row, prompt row) pairs in, the graph, the cosines to a list.
    assert _called_from_python(model, batch) == [*COPY_IN, *COPY_IN, "forward", *READ_BACK]


@pytest.mark.parametrize(("unit", "expected"), [("chars", 11 / 10), ("words", 2 / 10)])
def test_length_rule_counts_over_the_mean(unit, expected, tiny_paths, tmp_path):
    spec = {"name": "length", "kind": "rule", "unit": unit, "mean": 10}
    model = load_aspect(spec, tiny_paths, tmp_path)
    (score,) = model.run([model.prepare("q", "hello world", EncodingMemo())])
    assert score.segments[0].raw == pytest.approx(expected)
    assert score.segments[0].end == len("hello world")


def test_length_rule_in_tokens_uses_the_tokenizer(tiny_paths, tmp_path):
    spec = {
        "name": "length",
        "kind": "rule",
        "unit": "tokens",
        "mean": 1,
        "tokenizer_path": str(tiny_paths["causal_lm"]),
    }
    model = load_aspect(spec, tiny_paths, tmp_path)
    (score,) = model.run([model.prepare("q", "héllo", EncodingMemo())])
    assert score.segments[0].raw == len("héllo".encode())  # a byte-level tokenizer


def test_full_tiny_config_loads_every_adapter(tiny_paths, tmp_path):
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths))
    models = load_models(config, tmp_path)
    assert [(m.name, m.role, m.kind) for m in models] == [
        ("holistic", "holistic", "sequence_scalar"),
        ("factuality", "aspect", "segment_classifier"),
        ("completeness", "aspect", "sequence_scalar"),
        ("length", "aspect", "rule"),
    ]
    assert all(m.fingerprint.startswith("sha256:") for m in models)


def test_regex_rule_counts_matches(tiny_paths, tmp_path):
    spec = {"name": "citations", "kind": "rule", "rule": "regex", "pattern": r"\[\d+\]", "mean": 2}
    model = load_aspect(spec, tiny_paths, tmp_path)
    (score,) = model.run([model.prepare("q", "Paris [1] is big [2] and old [3].", EncodingMemo())])
    assert score.segments[0].raw == pytest.approx(1.5)


def test_embedding_similarity_truncates_long_rows_and_keeps_special_tokens(tiny_paths, tmp_path):
    spec = {
        "name": "relevance",
        "kind": "embedding_similarity",
        "path": PACKAGED_PREFIX + MINILM,
        "device": "cpu",
        "max_length": 16,
    }
    model = load_aspect(spec, tiny_paths, tmp_path)
    item = model.prepare(
        "How do I reset my password? " * 10, "Use the reset link. Done.", EncodingMemo()
    )
    assert item.truncated
    prompt_row = item.rows[0]
    assert len(prompt_row) == 16
    from transformers import AutoTokenizer

    from service.models.packaged import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec["path"], tmp_path))
    assert prompt_row[0] == tokenizer.cls_token_id and prompt_row[-1] == tokenizer.sep_token_id
    (score,) = model.run([item])
    assert len(score.segments) == 2 and score.truncated


@pytest.mark.parametrize("written", ["{here}/weights", "./weights", "../here/weights"])
def test_a_local_model_path_must_name_a_folder(written, tmp_path, monkeypatch):
    from service.models.packaged import resolve_model_path

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    path = written.format(here=here)
    with pytest.raises(ConfigError, match=rf"model path '{re.escape(path)}' is not a folder"):
        resolve_model_path(path, tmp_path)
    (here / "weights").mkdir()
    assert resolve_model_path(path, tmp_path) == path


def test_a_hub_id_is_left_for_transformers_to_resolve(tmp_path, monkeypatch):
    from service.models.packaged import resolve_model_path

    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("owner/name", tmp_path) == "owner/name"


def test_a_rule_fingerprint_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from service.models.loading import fingerprint

    monkeypatch.chdir(tmp_path)
    empty = fingerprint("", {"rule": "length"})
    (tmp_path / "weights.bin").write_bytes(b"x" * 10)
    assert fingerprint("", {"rule": "length"}) == empty


def test_rows_are_cut_into_length_sorted_chunks_when_padding_costs_more_than_a_forward():
    from service.models.loading import chunked_padded_tokens, length_sorted_chunks

    lengths = [30, 5, 31, 6, 120, 5, 29]
    chunks = length_sorted_chunks(lengths, overhead_tokens=40)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    # Padding 5, 5, 6 up to 29 would cost 3 x 23 tokens > 40: 29 starts a chunk; 120 too.
    assert [[lengths[i] for i in c] for c in chunks] == [[5, 5, 6], [29, 30, 31], [120]]
    assert chunked_padded_tokens(lengths, 40) == 3 * 6 + 3 * 31 + 120
    assert chunked_padded_tokens(lengths, 40) < len(lengths) * max(lengths)
    # When a forward costs more than any padding, everything is one rectangle.
    assert length_sorted_chunks(lengths, overhead_tokens=10_000) == [[1, 5, 3, 6, 0, 2, 4]]
    assert length_sorted_chunks([], 40) == []


def test_a_compiled_model_scores_like_the_eager_one_and_keeps_its_definition(tiny_paths, tmp_path):
    """torch.compile (dynamic shapes, compiled at load for one row and for several) on the
    decoder RM, whose head reads the pad token the compiled graph must see."""
    eager = load_holistic(llama_holistic(tiny_paths), tmp_path)
    fast = load_holistic({**llama_holistic(tiny_paths), "compile": True}, tmp_path)
    prepared = [eager.prepare(PROMPT, r, EncodingMemo()) for r in RESPONSES]
    for ours, reference in zip(fast.run(prepared), eager.run(prepared), strict=True):
        assert ours.raw == pytest.approx(reference.raw, abs=1e-4)
    assert_batch_invariant(fast, PROMPT, RESPONSES)
    assert fast.fingerprint == eager.fingerprint  # compiling does not change the reward
    assert fast.describe()["compiled"] and not eager.describe()["compiled"]


def test_rows_are_right_padded_with_a_mask_of_the_real_tokens():
    from service.models.loading import pad_right

    ids, mask = pad_right([(5, 6, 7), (8,), (9, 10)], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize(("overhead", "padded"), [(0, "none"), (100_000, "one rectangle")])
def test_the_relevance_aspect_cuts_its_rows_by_the_configured_call_cost(
    tiny_paths, tmp_path, overhead, padded
):
    spec = {
        "name": "relevance",
        "kind": "embedding_similarity",
        "path": PACKAGED_PREFIX + MINILM,
        "pack_rows": False,  # packed rows are one forward whatever the call cost
    }
    config = RewardConfig.model_validate(
        {
            "holistic": llama_holistic(tiny_paths),
            "aspects": [{**spec, "device": "cpu"}],
            "batching": {"forward_overhead_tokens": overhead},
        }
    )
    model = load_models(config, tmp_path)[1]
    item = model.prepare(
        "Why?", "Short. A much longer second sentence than the first one.", EncodingMemo()
    )
    rows = [len(row) for row in item.rows]
    expected = sum(rows) if padded == "none" else len(rows) * max(rows)
    assert len(set(rows)) > 1 and model.padded_tokens([item]) == expected
