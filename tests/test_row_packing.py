"""Rows packed end to end: layouts that hold every row once, and encoders whose packed rows
embed as they do alone (or that are left unpacked)."""

import random
import types

import pytest
import torch

from benchmarks.workload import load_items
from service.config import RewardConfig, load_reward_config
from service.engine import batch_limits
from service.models import EncodingMemo, Prepared, load_models
from service.models.packaged import MINILM, PACKAGED_PREFIX
from service.models.row_packing import (
    PackedLayout,
    mean_pooled,
    narrower_sliding_window,
    pack,
    pack_to_width,
    packed_batch,
    packed_forwards,
    packing_position_offset,
    row_start_cells,
)
from tests import tiny_models
from tests.test_models import llama_holistic, load_aspect


def cost(layout: PackedLayout, span: int) -> float:
    return layout.padded_tokens * (1 + layout.width / span)


@pytest.mark.parametrize("seed", range(30))
def test_every_row_lands_in_one_bin_that_holds_it(seed):
    rng = random.Random(seed)
    lengths = tuple(rng.randint(1, 130) for _ in range(rng.randint(1, 300)))
    span, max_width = rng.choice([50, 1000, 10**6]), rng.choice([64, 512])
    layout = pack(lengths, span, max_width)
    placed = sorted(index for members in layout.bins for index in members)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= layout.width for members in layout.bins)
    assert max(lengths) <= layout.width <= max(max(lengths), max_width)
    # Never costlier than bins as wide as the longest row, which are never wider than the
    # rectangle the rows would be padded to unpacked.
    narrowest = pack_to_width(lengths, max(lengths))
    assert cost(layout, span) <= cost(narrowest, span)
    assert narrowest.padded_tokens <= len(lengths) * max(lengths)


def test_one_items_rows_share_one_bin_when_attention_is_cheap():
    layout = pack((20, 12, 9, 7), span=1000, max_width=512)
    assert layout == PackedLayout(48, ((0, 1, 2, 3),))


def test_bins_stay_as_narrow_as_the_longest_row_when_attention_is_dear():
    layout = pack((20, 12, 9, 7), span=1, max_width=512)
    assert layout.width == 20
    assert sorted(map(sorted, layout.bins)) == [[0], [1, 3], [2]]


def test_bins_are_no_wider_than_the_positions_table_allows():
    assert pack((5, 5, 4), span=10**6, max_width=14) == PackedLayout(14, ((0, 1, 2),))
    assert pack((5, 5, 4), span=10**6, max_width=10).width == 5  # 15 tokens, not 14
    assert pack((30, 5), span=10**6, max_width=10).width == 30  # one row longer: its width


def test_mixed_lengths_pack_into_one_forward():
    lengths = (30, 4, 12, 25, 7, 18, 3, 9)
    ((rows, layout),) = packed_forwards(lengths, span=1152, max_width=512, overhead_tokens=64)
    assert rows == tuple(range(8)) and layout == pack(lengths, 1152, 512)


def test_like_lengths_are_cut_where_one_width_would_pad_them_all():
    """64 rows of 49 to 58 tokens: one width pads each to 58 (0.89 real / padded); cut
    shortest first, each forward pads to its own longest."""
    lengths = tuple(49 + (i * 7) % 10 for i in range(64))
    forwards = packed_forwards(lengths, span=1152, max_width=512, overhead_tokens=64)
    assert len(forwards) > 1
    assert sorted(i for rows, _ in forwards for i in rows) == list(range(64))
    for rows, layout in forwards:
        assert layout == pack(tuple(lengths[i] for i in rows), 1152, 512)
    whole = pack(lengths, 1152, 512)
    padded = sum(layout.padded_tokens for _, layout in forwards)
    assert padded < whole.padded_tokens
    assert sum(lengths) / padded > 0.95 > sum(lengths) / whole.padded_tokens


def test_packed_batch_lays_rows_end_to_end_with_restarting_positions():
    rows = [(11, 12, 13), (14,), (15, 16)]
    layout = PackedLayout(5, ((0, 2), (1,)))
    batch = packed_batch(
        rows, layout, pad_id=0, position_offset=2, dtype=torch.float32, device="cpu"
    )
    assert batch.input_ids.tolist() == [[11, 12, 13, 15, 16], [14, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[2, 3, 4, 2, 3], [2, 0, 0, 0, 0]]
    assert batch.row_of_token.tolist() == [0, 0, 0, 2, 2, 1, 3, 3, 3, 3]  # 3: padding
    assert batch.row_cells.tolist() == [0, 5, 3]  # each row's first cell, in row order
    assert row_start_cells([3, 1, 2], layout).tolist() == [0, 5, 3]  # the same, on the host
    allowed = (batch.attention_mask == 0).squeeze(1).int().tolist()  # (B, W, W)
    assert allowed[0] == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
    ]
    assert allowed[1][0] == [1, 0, 0, 0, 0] and allowed[1][1] == [0, 1, 1, 1, 1]
    assert batch.attention_mask.min() == torch.finfo(torch.float32).min


def test_only_a_sliding_window_narrower_than_a_row_may_be_keeps_rows_unpacked():
    def config(**fields):
        return types.SimpleNamespace(**fields)

    assert narrower_sliding_window(config(sliding_window=64), max_length=128)
    assert not narrower_sliding_window(config(sliding_window=256), max_length=128)
    assert not narrower_sliding_window(config(sliding_window=None), max_length=128)
    assert not narrower_sliding_window(config(), max_length=128)  # no window at all
    # Qwen2-style configs name a window they do not use.
    assert not narrower_sliding_window(
        config(sliding_window=64, use_sliding_window=False), max_length=128
    )


def test_a_causal_packed_batch_lets_each_token_see_its_own_rows_earlier_tokens():
    rows = [(11, 12), (13, 14, 15)]
    layout = PackedLayout(6, ((0, 1),))
    batch = packed_batch(rows, layout, 0, 0, torch.bool, "cpu", causal=True)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.row_cells.tolist() == [0, 2]
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees itself only: no row of -inf
    ]


def test_mean_pooled_averages_each_rows_own_tokens():
    rows = [(1, 1, 1), (1,), (1, 1)]
    batch = packed_batch(rows, PackedLayout(5, ((0, 2), (1,))), 0, 0, torch.float32, "cpu")
    hidden = torch.tensor([[1.0, 2, 3, 10, 20], [7, 100, 100, 100, 100]])[..., None]  # (B, W, 1)
    assert mean_pooled(hidden, batch).squeeze(-1).tolist() == [2.0, 7.0, 15.0]


def test_no_offset_when_the_encoder_refuses_packed_inputs_or_never_matches():
    rows = [(1, 2), (3,)]

    def alone(probe):
        return torch.zeros(len(probe), 4)

    def refuses(probe, layout, offset):
        raise TypeError("forward() got an unexpected keyword argument 'position_ids'")

    def matches_at_two(probe, layout, offset):
        return torch.zeros(len(probe), 4) + (offset != 2)

    def closest_at_two(probe, layout, offset):
        return torch.zeros(len(probe), 4) + 0.01 * (offset != 2)

    assert packing_position_offset(refuses, alone, rows, (0, 2), 1e-4, 512) is None
    assert packing_position_offset(matches_at_two, alone, rows, (0, 1), 1e-4, 512) is None
    assert packing_position_offset(matches_at_two, alone, rows, (0, 2), 1e-4, 512) == 2
    assert packing_position_offset(matches_at_two, alone, rows, (0, 2), 1e-4, 3) is None
    # Not the first offset within a loose tolerance: the closest one.
    assert packing_position_offset(closest_at_two, alone, rows, (0, 2), 0.1, 512) == 2


def _relevance(path: str, tiny_paths, tmp_path, **extra):
    spec = {"name": "relevance", "kind": "embedding_similarity", "path": path, "device": "cpu"}
    return load_aspect({**spec, "max_length": 128, **extra}, tiny_paths, tmp_path)


def _cosines(model, prepared) -> list[float]:
    return [s.raw for score in model.run(prepared) for s in score.segments]


def test_minilm_rows_cut_into_several_forwards_score_as_unpacked(tiny_paths, tmp_path):
    """Forward calls priced at nothing cut the rows into several packed forwards: an
    item's rows may run apart, so the cosines are taken after the forwards, not in them."""
    spec = {"name": "relevance", "kind": "embedding_similarity", "device": "cpu"}
    spec |= {"path": PACKAGED_PREFIX + MINILM, "max_length": 128}
    config = RewardConfig.model_validate(
        {
            "holistic": llama_holistic(tiny_paths),
            "aspects": [spec],
            "batching": {"forward_overhead_tokens": 0},
        }
    )
    cut = load_models(config, tmp_path)[1]
    unpacked = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path, pack_rows=False)
    items = load_items(12)
    prepared = [cut.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
    assert len(cut._packer.forwards([len(row) for p in prepared for row in p.rows])) > 1
    assert _cosines(cut, prepared) == pytest.approx(_cosines(unpacked, prepared), abs=1e-4)


def test_minilm_packs_its_rows_and_scores_as_unpacked_on_qa_feedback(tiny_paths, tmp_path):
    packed = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path)
    unpacked = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path, pack_rows=False)
    assert packed.describe()["packs_rows"] and not unpacked.describe()["packs_rows"]
    assert packed.fingerprint == unpacked.fingerprint  # how it runs, not what it scores
    items = load_items(24)
    prepared = [packed.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
    forward_counts = set()
    for size in (1, 8, 24):
        for start in range(0, 24, size):
            batch = prepared[start : start + size]
            assert _cosines(packed, batch) == pytest.approx(_cosines(unpacked, batch), abs=1e-4)
            lengths = [len(row) for p in batch for row in p.rows]
            forward_counts.add(min(len(packed._packer.forwards(lengths)), 2))
    assert forward_counts == {1}  # each batch in one forward: cosines from its graph
    rows = [len(row) for p in prepared for row in p.rows]
    padded = packed.padded_tokens(prepared)
    assert sum(rows) <= padded < unpacked.padded_tokens(prepared)


def test_an_encoder_counting_positions_from_the_pad_id_packs_at_that_offset(tiny_paths, tmp_path):
    path = str(tiny_models.build_roberta_encoder(tmp_path / "roberta"))
    packed = _relevance(path, tiny_paths, tmp_path)
    unpacked = _relevance(path, tiny_paths, tmp_path, pack_rows=False)
    assert packed._packer.position_offset == packed._pad_id + 1 == 2
    memo = EncodingMemo()
    prepared = [packed.prepare(i["prompt"], i["response"], memo) for i in load_items(8)]
    assert _cosines(packed, prepared) == pytest.approx(_cosines(unpacked, prepared), abs=1e-4)


def test_only_a_model_that_packs_its_rows_batches_in_arrival_order(tiny_paths, tmp_path):
    config = load_reward_config(None)
    packed = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path)
    unpacked = _relevance(PACKAGED_PREFIX + MINILM, tiny_paths, tmp_path, pack_rows=False)
    assert batch_limits(config, packed).arrival_order
    assert not batch_limits(config, unpacked).arrival_order  # length-sorted, as before


def test_a_batch_that_runs_unpacked_is_counted_as_it_runs(tiny_paths, tmp_path):
    """A RoBERTa-like encoder runs a batch holding its pad id unpacked (sorted chunks): the
    batcher's budget must count those, not the packed layout it will not use."""
    path = str(tiny_models.build_roberta_encoder(tmp_path / "roberta"))
    packed = _relevance(path, tiny_paths, tmp_path)
    unpacked = _relevance(path, tiny_paths, tmp_path, pack_rows=False)
    prepared = [packed.prepare(i["prompt"], i["response"], EncodingMemo()) for i in load_items(8)]
    assert packed.padded_tokens(prepared) < unpacked.padded_tokens(prepared)
    first = prepared[0]
    with_pad = Prepared(
        rows=((first.rows[0][0], packed._pad_id, *first.rows[0][1:]), *first.rows[1:]),
        truncated=False,
        meta=first.meta,
    )
    batch = [with_pad, *prepared[1:]]
    assert packed.padded_tokens(batch) == unpacked.padded_tokens(batch)


@pytest.mark.parametrize("name", ["relevance", "holistic"])
def test_the_packing_benchmark_compares_both_ways_on_the_same_batches(name, tmp_path):
    from benchmarks.models import write_config
    from benchmarks.row_packing import compare, model_pair
    from service.config import load_reward_config

    config_path = tmp_path / "config.yaml"
    write_config(tmp_path / "cache", config_path)
    packed, unpacked = model_pair(load_reward_config(config_path), name, tmp_path / "cache")
    assert packed.model.name == name and packed.model.packs_rows
    assert not unpacked.model.packs_rows
    memo = EncodingMemo()
    prepared = [packed.model.prepare(i["prompt"], i["response"], memo) for i in load_items(8)]
    figures = compare(packed, unpacked, prepared, size=4, rounds=1)
    assert (figures.model, figures.batch_items) == (name, 4)
    assert figures.packed_items_per_s > 0 and figures.sorted_items_per_s > 0
    assert figures.packed_over_sorted > 0
    assert figures.sorted_padding_efficiency < figures.packed_padding_efficiency <= 1


def test_a_compiled_encoder_packs_its_rows_and_scores_like_the_eager_one(tiny_paths, tmp_path):
    """The load-time check runs through the compiled module, so the packed call's graph
    (4-D mask, position ids) is compiled at load, not in a trainer's request."""
    path = str(tiny_models.build_roberta_encoder(tmp_path / "roberta"))
    fast = _relevance(path, tiny_paths, tmp_path, compile=True)
    eager = _relevance(path, tiny_paths, tmp_path)
    assert fast.packs_rows and fast.describe()["compiled"]
    prepared = [fast.prepare(i["prompt"], i["response"], EncodingMemo()) for i in load_items(8)]
    assert _cosines(fast, prepared) == pytest.approx(_cosines(eager, prepared), abs=1e-4)
