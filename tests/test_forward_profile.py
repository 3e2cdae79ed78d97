"""`benchmarks/forward_profile.py`: a forward's time on batches met before and new, by op."""

import torch

from benchmarks.forward_profile import (
    forward_profile,
    set_jit_mode,
    single_item_limits,
    visit_timing,
)
from benchmarks.limit import padded_counter
from benchmarks.workload import load_items
from service.config import RewardConfig
from service.models import EncodingMemo, load_models
from tests.test_models import llama_holistic, load_holistic


def _prepared(model, count: int):
    return [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in load_items(count)]


def test_windows_of_the_workload_are_timed_on_their_first_and_second_visits(tiny_paths, tmp_path):
    model = load_holistic(llama_holistic(tiny_paths), tmp_path)
    prepared = _prepared(model, 20)
    timing = visit_timing(model, prepared, batch_items=4, max_windows=3)
    assert (timing.model, timing.batch_items, timing.windows) == ("h", 4, 3)
    padded = sorted(padded_counter(model)(prepared[i : i + 4]) for i in (0, 4, 8))
    assert timing.padded_tokens == padded[1]  # the median of the three windows
    assert timing.first_visit_ms > 0 and timing.second_visit_ms > 0
    # Fewer items than a window: one window of all of them.
    short = visit_timing(model, prepared[:3], batch_items=4, max_windows=3)
    assert (short.batch_items, short.windows) == (3, 1)


def test_a_profiled_forward_names_its_ops_by_host_time_and_launches_no_kernel_on_a_cpu(
    tiny_paths, tmp_path
):
    model = load_holistic(llama_holistic(tiny_paths), tmp_path)
    profile = forward_profile(model, _prepared(model, 6))
    assert (profile.model, profile.batch_items) == ("h", 6)
    assert profile.device_events == 0 and profile.device_ms == 0 and profile.top_device_ops == []
    host_ms = [op.self_ms for op in profile.top_host_ops]
    assert host_ms and host_ms == sorted(host_ms, reverse=True) and min(host_ms) > 0
    # A transformer's forward spends its time in matrix products.
    assert any(op.name in {"aten::addmm", "aten::mm", "aten::bmm"} for op in profile.top_host_ops)
    # The ops ran inside the timed forward, one after another on the calling thread.
    assert 0.5 * sum(host_ms) <= profile.wall_ms and sum(host_ms) <= 1.05 * profile.wall_ms


def test_jit_modes_turn_off_the_fuser_or_every_optimisation():
    try:
        set_jit_mode("default")
        assert torch._C._jit_texpr_fuser_enabled() and torch._C._get_graph_executor_optimize()
        set_jit_mode("no-fuser")
        assert not torch._C._jit_texpr_fuser_enabled()
        set_jit_mode("no-optimize")
        assert not torch._C._get_graph_executor_optimize()
    finally:
        torch._C._jit_set_texpr_fuser_enabled(True)
        torch._C._set_graph_executor_optimize(True)


def test_the_limits_single_items_are_timed_one_per_window_and_all_at_once(tiny_paths, tmp_path):
    config = RewardConfig.model_validate({"holistic": llama_holistic(tiny_paths)})
    models = load_models(config, tmp_path)
    figures = single_item_limits(models, config, load_items(8))
    apart, together = figures["one_item_per_window_ms"], figures["all_items_at_once_ms"]
    # The same eight single-item forwards either way: on a CPU, about the same time.
    assert apart > 0 and together > 0 and 0.2 < apart / together < 5
