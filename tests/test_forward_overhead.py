"""`benchmarks/forward_overhead.py`: the price of a forward call in padded tokens."""

import pytest

from benchmarks.forward_overhead import measure_overhead
from benchmarks.workload import load_items
from service.models import EncodingMemo
from tests.test_models import llama_holistic, load_holistic


def test_a_call_is_priced_as_one_short_item_over_the_per_token_cost_of_a_full_batch(
    tiny_paths, tmp_path
):
    model = load_holistic(llama_holistic(tiny_paths), tmp_path)
    items = load_items(40)
    figures = measure_overhead(model, items, batch=16, repeats=3)
    lengths = sorted(
        model.prepare(i["prompt"], i["response"], EncodingMemo()).length for i in items
    )
    assert figures.model == "h" and figures.device == "cpu"
    assert figures.single_item_tokens == lengths[0]  # the shortest item, alone
    assert figures.batch_items == 16
    # A full batch of about the median length: 16 rows padded to the longest of them.
    assert 16 * lengths[12] <= figures.batch_padded_tokens <= 16 * lengths[27]
    assert figures.overhead_tokens == pytest.approx(
        figures.single_item_ms * 1e3 / figures.per_padded_token_us
    )
    assert figures.single_item_ms > 0 and figures.per_padded_token_us > 0


def test_a_batch_larger_than_the_workload_takes_all_of_it(tiny_paths, tmp_path):
    model = load_holistic(llama_holistic(tiny_paths), tmp_path)
    figures = measure_overhead(model, load_items(5), batch=16, repeats=1)
    assert figures.batch_items == 5
