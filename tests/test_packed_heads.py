"""Scalar reward models scoring packed rows: each head reads its row's own token, so a
packed batch scores as every row does alone, and a head not listed stays unpacked."""

import dataclasses
import types

import pytest
import torch

from benchmarks.workload import load_items
from service.models import EncodingMemo
from service.models.packed_heads import packed_scalar_head
from service.models.row_packing import PackedLayout, pack_to_width, packed_batch
from tests.test_models import load_holistic

REL, ABS = 1e-5, 1e-6  # packed against alone; the rounding seen is ~1e-8


def _holistic(path: str, tmp_path, **extra):
    spec = {"name": "h", "kind": "sequence_scalar", "path": path, "device": "cpu"}
    return load_holistic({**spec, "max_length": 256, **extra}, tmp_path)


def _short_items(count: int) -> list[tuple[str, str]]:
    """qa-feedback pairs cut to mixed lengths of at most ~200 bytes: short enough for the
    tiny models' byte tokens to share bins."""
    items = load_items(count)
    return [(i["prompt"][:60], i["response"][: 10 + 13 * (k % 11)]) for k, i in enumerate(items)]


def _raw(model, prepared) -> list[float]:
    return [score.raw for score in model.run(prepared)]


@pytest.mark.parametrize("family", ["llama", "deberta", "bert", "roberta"])
def test_a_packed_batch_scores_as_each_row_alone_unpacked(family, scalar_rms, tmp_path):
    packed = _holistic(scalar_rms[family], tmp_path)
    unpacked = _holistic(scalar_rms[family], tmp_path, pack_rows=False)
    assert packed.describe()["packs_rows"] and not unpacked.describe()["packs_rows"]
    assert packed.fingerprint == unpacked.fingerprint  # how it runs, not what it scores
    assert unpacked.padded_tokens is None  # the batcher cuts its batches, as before packing
    memo = EncodingMemo()
    prepared = [packed.prepare(p, r, memo) for p, r in _short_items(24)]
    alone = [_raw(unpacked, [p])[0] for p in prepared]
    for size in (1, 5, 24):
        together = [v for s in range(0, 24, size) for v in _raw(packed, prepared[s : s + size])]
        assert together == pytest.approx(alone, rel=REL, abs=ABS)
    lengths = [len(p.rows[0]) for p in prepared]
    assert len(packed._packer.forwards(lengths)) > 1  # cut: `run` scatters each cut back
    assert sum(lengths) <= packed.padded_tokens(prepared) < len(lengths) * max(lengths)
    # The tiny models' attention is dear beside their 64-wide layers, so their own layouts
    # keep rows apart: all 24 rows in one bin, end to end, score as alone too.
    rows = [p.rows[0] for p in prepared]
    one_bin = pack_to_width([len(row) for row in rows], sum(map(len, rows)))
    with torch.inference_mode():
        in_one_bin = packed._scores_packed(rows, one_bin, packed._packer.position_offset).tolist()
    assert in_one_bin == pytest.approx(alone, rel=REL, abs=ABS)


@pytest.mark.parametrize("family", ["llama", "deberta", "bert", "roberta"])
def test_the_comparison_would_see_rows_attending_to_each_other(family, scalar_rms, tmp_path):
    """The tolerance above is far below what one row's tokens change in another's score:
    the same packed forward with rows left to see each other scores differently (the tiny
    DeBERTa's scores barely vary, so the margin is relative to the tolerance)."""
    model = _holistic(scalar_rms[family], tmp_path)
    memo = EncodingMemo()
    rows = [model.prepare(p, r, memo).rows[0] for p, r in _short_items(6)]
    layout = PackedLayout(sum(map(len, rows)), (tuple(range(6)),))
    head = model._head
    dtype = torch.bool if head.boolean_mask else torch.float32
    batch = packed_batch(rows, layout, model._pad_id, model._packer.position_offset, dtype, "cpu")
    offsets = torch.tensor(head.read_offsets(rows, model._pad_id))
    batch = dataclasses.replace(batch, row_cells=batch.row_cells + offsets)  # where it reads
    seen = torch.ones(layout.width, layout.width, dtype=torch.bool)  # every row, every row
    if head.causal:
        seen = seen.tril()
    leaking = seen if head.boolean_mask else torch.zeros(seen.shape).masked_fill(~seen, -1e30)
    with torch.inference_mode():
        apart = head.scores(batch)
        mixed = head.scores(dataclasses.replace(batch, attention_mask=leaking[None, None]))
    tolerance = ABS + REL * apart.abs()
    assert ((apart - mixed).abs() > 10 * tolerance).any()


def test_a_decoder_reads_its_last_token_that_is_not_padding(scalar_rms, tmp_path):
    """transformers reads a decoder row at its rightmost non-pad token: a row that ends in
    pad ids (a template closing with the pad token) is read before them, packed or not."""
    template = "Human: {prompt}\nAssistant: {response}<pad><pad>"
    packed = _holistic(scalar_rms["llama"], tmp_path, template=template)
    unpacked = _holistic(scalar_rms["llama"], tmp_path, template=template, pack_rows=False)
    memo = EncodingMemo()
    prepared = [packed.prepare(p, r, memo) for p, r in _short_items(8)]
    assert all(p.rows[0][-2:] == (packed._pad_id,) * 2 for p in prepared)
    assert packed._head.read_offsets([p.rows[0] for p in prepared], packed._pad_id) == [
        len(p.rows[0]) - 3 for p in prepared
    ]
    assert packed.packs_rows
    assert _raw(packed, prepared) == pytest.approx(
        [_raw(unpacked, [p])[0] for p in prepared], rel=REL, abs=ABS
    )


def test_read_offsets_follow_transformers_rule():
    decoder = packed_scalar_head(
        types.SimpleNamespace(base_model=object(), score=torch.nn.Linear(2, 1)), 512
    )
    assert decoder is not None and decoder.causal
    assert decoder.read_offsets([(5, 6, 0), (5,), (0, 0), (7, 0, 8)], pad_id=0) == [1, 0, 0, 2]


def test_a_head_not_listed_is_not_packed():
    assert packed_scalar_head(types.SimpleNamespace(score=torch.nn.Linear(2, 1)), 512) is None
    unlisted = types.SimpleNamespace(base_model=object(), classifier=torch.nn.Sequential())
    assert packed_scalar_head(unlisted, 512) is None


def test_a_decoder_whose_window_a_row_may_pass_is_not_packed():
    """A custom 4-D mask replaces a sliding window (Mistral, Gemma): rows longer than the
    window would score differently packed, and the load check's rows are short."""

    def decoder(**config):
        return types.SimpleNamespace(
            base_model=object(), score=torch.nn.Linear(2, 1), config=types.SimpleNamespace(**config)
        )

    assert packed_scalar_head(decoder(sliding_window=256), 1024) is None
    assert packed_scalar_head(decoder(sliding_window=4096), 1024) is not None
    assert packed_scalar_head(decoder(sliding_window=256, use_sliding_window=False), 1024)
    assert packed_scalar_head(decoder(sliding_window=None), 1024) is not None


def test_a_batch_holding_the_pad_token_runs_unpacked_where_positions_skip_it(scalar_rms, tmp_path):
    """RoBERTa-like models number positions over non-pad tokens only: a response holding a
    literal pad token scores as alone, through the padded path."""
    packed = _holistic(scalar_rms["roberta"], tmp_path)
    unpacked = _holistic(scalar_rms["roberta"], tmp_path, pack_rows=False)
    assert packed._packer.position_offset == packed._pad_id + 1
    pairs = [*_short_items(4), ("What is it?", "A <pad> token, in the middle.")]
    prepared = [packed.prepare(p, r, EncodingMemo()) for p, r in pairs]
    assert packed._pad_id in prepared[-1].rows[0]
    alone = [_raw(unpacked, [p])[0] for p in prepared]
    assert _raw(packed, prepared) == pytest.approx(alone, rel=REL, abs=ABS)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_an_additive_mask_scores_as_the_boolean_one(family, scalar_rms, tmp_path):
    """Eager attention takes the packed mask as additive floats; SDPA takes either."""
    model = _holistic(scalar_rms[family], tmp_path)
    prepared = [model.prepare(p, r, EncodingMemo()) for p, r in _short_items(12)]
    assert model._head.boolean_mask  # SDPA
    boolean = _raw(model, prepared)
    model._head = dataclasses.replace(model._head, boolean_mask=False)
    assert _raw(model, prepared) == pytest.approx(boolean, rel=REL, abs=ABS)


def test_a_compiled_model_runs_unpacked(scalar_rms, tmp_path):
    """The packed path calls the backbone apart from the compiled module: not combined."""
    fast = _holistic(scalar_rms["bert"], tmp_path, compile=True)
    assert fast.describe()["compiled"] and not fast.packs_rows
