"""The benchmark's in-process limit: the forwards it times are the server's own."""

from dataclasses import dataclass, field

import pytest

from benchmarks.limit import (
    LimitResult,
    _largest_in_halves,
    faster_layout_timing,
    measure,
    pooled,
)
from service.batch_forming import BatchLimits
from service.models import EncodingMemo, Prepared

LIMITS = BatchLimits(max_batch_tokens=4096, max_batch_size=4, max_wait_s=0.0)


@dataclass
class CountingModel:
    """A model whose forwards record which items they ran (one row of `len(response)`)."""

    name: str
    device: str = "cpu"
    batches: list[list[str]] = field(default_factory=list)

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        return Prepared(rows=(tuple(range(len(response))),), truncated=False, meta=response)

    def run(self, batch):
        self.batches.append([p.meta for p in batch])
        return [None] * len(batch)


def items(count: int) -> list[dict[str, str]]:
    return [{"prompt": "q", "response": "x" * (5 + 7 * i % 23) + str(i)} for i in range(count)]


def test_one_worker_runs_each_item_once_per_model():
    models = [CountingModel("a"), CountingModel("b")]
    result = measure(models, items(10), lambda m: LIMITS, window=5, workers=1)
    for model in models:
        ran = [key for batch in model.batches[1:] for key in batch]  # after the warm-up
        assert sorted(ran) == sorted(i["response"] for i in items(10))
        assert all(len(batch) <= LIMITS.max_batch_size for batch in model.batches)
    assert result.items_per_s > 0 and 0 < result.padding_efficiency <= 1
    assert set(result.seconds_by_model) == {"a", "b"}
    # Forward calls as the server counts its batches: every timed one, not the warm-up.
    assert result.items == 10
    assert result.batches_by_model == {m.name: len(m.batches) - 1 for m in models}


def test_with_two_workers_each_window_also_runs_with_its_largest_batch_in_halves():
    model = CountingModel("a")
    measure([model], items(4), lambda m: LIMITS, window=4, workers=2)
    whole, *halves = model.batches[1:]  # after the warm-up: the window whole, then halved
    assert len(whole) == 4 and [len(h) for h in halves] == [2, 2]
    assert sorted(whole) == sorted(halves[0] + halves[1])


def test_only_device_models_batches_are_halved():
    prepared = [CountingModel("a").prepare("q", "x" * n, EncodingMemo()) for n in (3, 5, 8)]
    on_cpu, on_host = CountingModel("a"), CountingModel("r", device="host")
    assert [len(b) for b in _largest_in_halves([prepared[:1], prepared[1:]], on_cpu)] == [1, 1, 1]
    assert _largest_in_halves([prepared], on_host) == [prepared]


def test_the_faster_layout_is_chosen_over_the_whole_workload_not_window_by_window():
    def timed(whole: list[float], halved: list[float]) -> list[dict]:
        return [{"whole": (w, []), "halved": (h, [])} for w, h in zip(whole, halved, strict=True)]

    # Each window's faster timing would add up to 3.5 s, less than either layout took.
    assert faster_layout_timing(timed([1.0, 3.0], [2.0, 2.5]))[:2] == ("whole", 4.0)
    assert faster_layout_timing(timed([1.0, 3.0], [2.0, 1.5]))[:2] == ("halved", 3.5)


def test_with_two_workers_the_windows_alternate_which_layout_runs_first():
    model = CountingModel("a")
    measure([model], items(8), lambda m: LIMITS, window=4, workers=2)
    sizes = [len(batch) for batch in model.batches[1:]]  # after the warm-up
    assert sizes == [4, 2, 2, 2, 2, 4]  # window 1: whole, halves; window 2: halves, whole


def test_runs_of_the_same_measurement_pool_into_all_items_over_all_time():
    fast, slow = (
        LimitResult(
            window=4,
            batch_size=4,
            forward_overhead_cut=False,
            workers=2,
            items_per_s=items_per_s,
            real_tokens_per_s=10 * items_per_s,
            padding_efficiency=efficiency,
            seconds_by_model={"a": seconds},
            items=8,
            batches_by_model={"a": batches},
        )
        for items_per_s, efficiency, seconds, batches in ((40.0, 0.9, 1.0, 2), (10.0, 0.6, 4.0, 3))
    )
    both = pooled([fast, slow])
    assert both.items_per_s == pytest.approx(16.0)  # 2 runs of n items in n/40 + n/10 s
    assert both.real_tokens_per_s == pytest.approx(160.0)
    # The same real tokens r twice over padded r/0.9 + r/0.6: 0.72, not the mean 0.75.
    assert both.padding_efficiency == pytest.approx(0.72)
    assert both.seconds_by_model == {"a": 5.0}
    assert (both.items, both.batches_by_model) == (16, {"a": 5})
    assert pooled([fast]).items_per_s == pytest.approx(fast.items_per_s)


def test_a_window_with_nothing_to_halve_counts_its_one_timing_for_both_layouts():
    whole_a, whole_b, halves_b = [("a", 1.0)], [("a", 2.0)], [("a", 0.5), ("a", 0.4)]
    timed = [
        {"whole": (1.0, whole_a)},  # nothing to halve: timed once
        {"whole": (2.0, whole_b), "halved": (1.5, halves_b)},
    ]
    assert faster_layout_timing(timed) == ("halved", 2.5, whole_a + halves_b)
    slower_halves = [timed[0], {"whole": (2.0, whole_b), "halved": (2.5, halves_b)}]
    assert faster_layout_timing(slower_halves) == ("whole", 3.0, whole_a + whole_b)


@dataclass
class PackingModel(CountingModel):
    """Lays out its own rows: its padded tokens are its rows' real tokens."""

    def padded_tokens(self, batch):
        return sum(len(p.rows[0]) for p in batch)


def test_a_model_that_packs_its_rows_is_timed_on_batches_in_arrival_order():
    """As the server cuts them (`batch_limits`: arrival order for such models, the budget
    counted by the model), so that the limit runs the server's own batches."""
    sorted_model, packing_model = CountingModel("a"), PackingModel("b")
    # Responses of 6, 13, 20, 27 | 11, 18, 25, 9 tokens: 66 and 63 as the model counts
    # them, under the budget; as rectangles (4 x 27) the first four would not fit.
    arrival = BatchLimits(70, max_batch_size=4, max_wait_s=0.0, arrival_order=True)
    limits = {"a": LIMITS, "b": arrival}
    measure([sorted_model, packing_model], items(8), lambda m: limits[m.name], workers=1)
    responses = [i["response"] for i in items(8)]
    by_length = sorted(responses, key=len)
    # After each model's warm-up forward; the largest forwards run first.
    assert sorted(packing_model.batches[1:]) == sorted([responses[:4], responses[4:]])
    assert sorted(sorted_model.batches[1:]) == sorted([by_length[:4], by_length[4:]])


def test_the_limit_runs_its_forwards_under_the_servers_heap_policy(monkeypatch):
    import benchmarks.limit as limit_module

    model = CountingModel("m")
    forwards_before: list[int] = []
    monkeypatch.setattr(
        limit_module,
        "keep_freed_memory",
        lambda: forwards_before.append(len(model.batches)) or True,
    )
    measure([model], items(4), lambda m: LIMITS, window=4, workers=1)
    assert forwards_before == [0] and model.batches  # set once, before any forward
