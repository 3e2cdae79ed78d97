"""A fast tokenizer's texts go straight through a private copy of its Rust pipeline, and
come out exactly as the tokenizer's own call encodes them; tokenizers for which that
cannot be shown keep their own call."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.models.encoding_memo import SharedTokenizer
from service.models.loading import load_tokenizer
from service.models.packaged import MINILM, PACKAGED_PREFIX, resolve_model_path
from service.models.text_encoders import PipelineEncoder, WrapperEncoder, probe_texts
from tests import tiny_models

DATA = Path(__file__).resolve().parents[1] / "data" / "qa_feedback_sample.jsonl"


def qa_feedback_texts(count: int) -> list[str]:
    """Prompts and responses of the project's qa-feedback sample, plus awkward texts."""
    with DATA.open() as lines:
        rows = [json.loads(line) for line, _ in zip(lines, range(count), strict=False)]
    texts = [text for row in rows for text in (row["prompt"], row["answer"])]
    return [*texts, "", " ", "tab\there", "Ünïcödé 東京 😀", "x" * 3000]


@pytest.fixture(scope="module")
def tokenizers_by_family(tiny_paths, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("encoder-tokenizers")
    roberta = tiny_models.build_encoder_scalar_rm(root / "roberta", "roberta")
    return {
        "minilm (WordPiece)": AutoTokenizer.from_pretrained(
            resolve_model_path(PACKAGED_PREFIX + MINILM, root)
        ),
        "llama-style bytes": load_tokenizer(str(tiny_paths["llama_rm"])),
        "roberta-style bytes": load_tokenizer(str(roberta)),
        "deberta": load_tokenizer(str(tiny_paths["deberta_rm"])),
        "segment classifier": load_tokenizer(str(tiny_paths["segment"])),
    }


def test_every_fast_tokenizer_here_goes_through_its_pipeline_and_encodes_as_its_own_call(
    tokenizers_by_family,
):
    texts = qa_feedback_texts(40)
    for family, tokenizer in tokenizers_by_family.items():
        shared = SharedTokenizer(tokenizer)
        assert isinstance(shared.encoder, PipelineEncoder), family
        specials = " ".join(tokenizer.all_special_tokens)
        asked = [*texts, f"A {specials} B", *probe_texts(tokenizer)]
        for add_special_tokens in (True, False):
            own = tokenizer(
                asked, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
            direct = shared.encode(asked, add_special_tokens, offsets=True)
            assert [list(e.ids) for e in direct] == own["input_ids"], family
            assert [list(e.offsets) for e in direct] == [
                [tuple(span) for span in spans] for spans in own["offset_mapping"]
            ], family
            without_offsets = shared.encode(asked, add_special_tokens, offsets=False)
            assert [e.ids for e in without_offsets] == [e.ids for e in direct]
            assert all(e.offsets is None for e in without_offsets)


def test_a_tokenizer_that_splits_special_tokens_keeps_splitting_them_on_the_direct_path(
    tiny_paths,
):
    path = str(tiny_paths["segment"])
    whole = SharedTokenizer(load_tokenizer(path))
    split = SharedTokenizer(load_tokenizer(path, split_special_tokens=True))
    text = "Paris. </s> Rome."
    assert isinstance(split.encoder, PipelineEncoder)
    (kept,) = whole.encode([text], True, False)
    (cut,) = split.encode([text], True, False)
    assert kept.ids != cut.ids
    assert list(cut.ids) == split.tokenizer([text])["input_ids"][0]
    assert list(kept.ids) == whole.tokenizer([text])["input_ids"][0]


def test_truncation_set_on_the_tokenizer_later_does_not_reach_the_private_pipeline(tiny_paths):
    tokenizer = load_tokenizer(str(tiny_paths["llama_rm"]))
    shared = SharedTokenizer(tokenizer)
    text = "A response long enough to be cut by a truncating call."
    (before,) = shared.encode([text], True, False)
    cut = tokenizer([text], truncation=True, max_length=5, padding="max_length")
    assert len(cut["input_ids"][0]) == 5  # the tokenizer's own backend now truncates
    assert tokenizer.backend_tokenizer.truncation is not None
    (after,) = shared.encode([text], True, False)
    assert after == before and len(after.ids) > 5


def test_a_tokenizer_class_with_its_own_call_keeps_its_call(tiny_paths):
    """Its call changes only a word no probe text holds: the class check alone decides."""
    tokenizer = load_tokenizer(str(tiny_paths["llama_rm"]))

    class Shouting(type(tokenizer)):
        def __call__(self, text, *args, **kwargs):
            return super().__call__([t.replace("quiet", "QUIET") for t in text], *args, **kwargs)

    tokenizer.__class__ = Shouting
    shared = SharedTokenizer(tokenizer)
    assert isinstance(shared.encoder, WrapperEncoder)
    (encoding,) = shared.encode(["quiet"], True, False)
    assert list(encoding.ids) == tokenizer(["quiet"])["input_ids"][0]
    plain = SharedTokenizer(load_tokenizer(str(tiny_paths["llama_rm"])))
    assert encoding != plain.encode(["quiet"], True, False)[0]  # the class's call did count


def test_a_tokenizer_with_a_per_call_language_mode_keeps_its_call(tiny_paths):
    """MBart- and NLLB-style classes rebuild their post-processor on each call, which a
    copy made once would not follow, even where today's probes agree."""
    tokenizer = load_tokenizer(str(tiny_paths["llama_rm"]))

    class Multilingual(type(tokenizer)):
        def _switch_to_input_mode(self):
            pass

    tokenizer.__class__ = Multilingual
    assert isinstance(SharedTokenizer(tokenizer).encoder, WrapperEncoder)


def test_a_pipeline_that_cannot_be_probed_leaves_the_tokenizer_its_call(tiny_paths, monkeypatch):
    import service.models.text_encoders as text_encoders

    def broken(tokenizer):
        raise RuntimeError("no probes today")

    monkeypatch.setattr(text_encoders, "probe_texts", broken)
    shared = SharedTokenizer(load_tokenizer(str(tiny_paths["llama_rm"])))
    assert isinstance(shared.encoder, WrapperEncoder)
    assert shared.encode(["Paris."], True, False)[0].ids


def test_a_pipeline_that_encodes_otherwise_than_the_call_is_not_used(tiny_paths):
    """A class that reports one pipeline and calls another: the probe texts tell them
    apart, and the tokenizer keeps its own call."""
    tokenizer = load_tokenizer(str(tiny_paths["llama_rm"]))
    other = load_tokenizer(str(tiny_paths["deberta_rm"])).backend_tokenizer

    class Misreported(type(tokenizer)):
        backend_tokenizer = property(lambda self: other)

    tokenizer.__class__ = Misreported
    shared = SharedTokenizer(tokenizer)
    assert isinstance(shared.encoder, WrapperEncoder)
    (encoding,) = shared.encode(["Paris."], True, True)
    own = tokenizer(["Paris."], return_offsets_mapping=True)
    assert list(encoding.ids) == own["input_ids"][0]


def test_a_tokenizer_without_a_rust_pipeline_keeps_its_call():
    class Plain:
        """A slow tokenizer's surface: a call, no backend."""

        def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False, **_):
            ids = [[len(t), 1 if add_special_tokens else 0] for t in texts]
            out = {"input_ids": ids}
            if return_offsets_mapping:
                out["offset_mapping"] = [[(0, len(t)), (0, 0)] for t in texts]
            return out

    shared = SharedTokenizer(Plain())
    assert isinstance(shared.encoder, WrapperEncoder)
    assert shared.key.startswith("object:")
    (encoding,) = shared.encode(["four"], True, True)
    assert encoding.ids == (4, 1) and encoding.offsets == ((0, 4), (0, 0))
