"""Where a forward's time goes on a device: batches met before against new ones, and by op.

    python -m benchmarks.forward_profile --holistic deberta-large --dtype bfloat16

Session 21's H200 left three questions (RESULTS): one item took 82 ms in process but 33 ms
per request in the servers; the 6-layer relevance encoder took twice the 24-layer RM's time
per batch; and the GPU was idle 70 to 90 % of the time. For each tensor model of the
benchmark's config, at each batch size, this times windows of the workload twice: on
their first visit (shapes the device, the allocator and TorchScript's executor may not
have met) and on their second (the same batches again). Then it profiles one batch of
the largest size, met before: the kernels and copies it ran on the device, their time
against the forward's wall time (how busy one forward keeps a GPU), and the ops that took most.
Last, the in-process limit's own single-item figure both ways it is taken: one item per
window (the in-flight limit at one item in flight: 82 ms an item on the H200) and every
item at once in batches of one (the full limit's batch size 1: 31 to 38 ms an item).

`--jit no-fuser` and `--jit no-optimize` turn off TorchScript's fuser or all of its
executor's optimisations before the models load and are traced: whether re-specialising
a traced graph for each new shape is what costs (on CUDA the fuser is on by default, on
a CPU it is not). `--eager` leaves the packed forwards untraced. `--cudnn-attention` puts
SDPA back on cuDNN's attention, which the server turns off on a GPU (session 25: a plan
built for every new shape): the figures from before, for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_utilisation import gpu_name
from benchmarks.limit import measure, padded_counter
from benchmarks.models import HOLISTIC_SIZES, load_benchmark_models
from benchmarks.workload import load_items
from service.batch_forming import BatchLimits
from service.config import RewardConfig
from service.engine import HOST_DEVICE, batch_limits
from service.memory import keep_freed_memory, share_one_heap
from service.models import EncodingMemo, Prepared, RewardModel

JIT_MODES = ("default", "no-fuser", "no-optimize")
TOP_OPS = 12


@dataclass(frozen=True)
class VisitTiming:
    """One batch size's windows of the workload, each run twice in turn."""

    model: str
    batch_items: int
    windows: int
    padded_tokens: float  # median per window
    first_visit_ms: float  # median over the windows' first runs
    second_visit_ms: float  # median over the same windows run again


@dataclass(frozen=True)
class OpTime:
    name: str
    calls: int
    self_ms: float


@dataclass(frozen=True)
class ForwardProfile:
    model: str
    batch_items: int
    wall_ms: float  # the profiled forward, profiler's own cost included
    device_events: int  # kernels, copies and fills on the device (0 on a CPU)
    device_ms: float  # their summed time: how long the device was busy
    top_host_ops: list[OpTime]  # by self time on the host
    top_device_ops: list[OpTime]  # kernels and copies by their time (none on a CPU)


def set_jit_mode(mode: str) -> None:
    """Before the models are traced: TorchScript's executor compiles its plans at first run."""
    if mode == "no-fuser":
        torch._C._jit_set_texpr_fuser_enabled(False)
    elif mode == "no-optimize":
        torch._C._set_graph_executor_optimize(False)


def _timed_ms(model: RewardModel, batch: Sequence[Prepared]) -> float:
    started = time.perf_counter()
    model.run(batch)  # returns Python floats: the device has finished
    return (time.perf_counter() - started) * 1e3


def visit_timing(
    model: RewardModel, prepared: Sequence[Prepared], batch_items: int, max_windows: int
) -> VisitTiming:
    """First and second visits of up to `max_windows` consecutive windows of `prepared`."""
    count = max(1, min(max_windows, len(prepared) // batch_items))
    windows = [prepared[i * batch_items : (i + 1) * batch_items] for i in range(count)]
    # Counted first, as the batcher counts a batch before its forward: the layouts are
    # then cached, and a first visit times the device's side of a new shape only.
    padded = [padded_counter(model)(list(window)) for window in windows]
    first = [_timed_ms(model, window) for window in windows]
    second = [_timed_ms(model, window) for window in windows]
    return VisitTiming(
        model=model.name,
        batch_items=len(windows[0]),
        windows=count,
        padded_tokens=statistics.median(padded),
        first_visit_ms=statistics.median(first),
        second_visit_ms=statistics.median(second),
    )


def forward_profile(model: RewardModel, batch: Sequence[Prepared]) -> ForwardProfile:
    """One forward of `batch` under torch.profiler, after an unprofiled run of it."""
    on_gpu = model.device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    model.run(batch)
    with profile(activities=activities) as profiler:
        wall_ms = _timed_ms(model, batch)
    on_device = [e for e in profiler.events() if e.device_type == DeviceType.CUDA]
    averages = profiler.key_averages()
    # An op that launched a kernel shows the kernel's time as its own too: the device's
    # table lists the kernels (and copies) only, the host's the ops only.
    host_ops = [e for e in averages if e.device_type != DeviceType.CUDA]
    device_ops = [e for e in averages if e.device_type == DeviceType.CUDA]

    def top(events: list[Any], self_us: Callable[[Any], float]) -> list[OpTime]:
        ranked = sorted(events, key=self_us, reverse=True)[:TOP_OPS]
        return [OpTime(e.key, e.count, self_us(e) / 1e3) for e in ranked if self_us(e) > 0]

    return ForwardProfile(
        model=model.name,
        batch_items=len(batch),
        wall_ms=wall_ms,
        device_events=len(on_device),
        device_ms=sum(e.device_time for e in on_device) / 1e3,
        top_host_ops=top(host_ops, lambda e: e.self_cpu_time_total),
        top_device_ops=top(device_ops, lambda e: e.self_device_time_total),
    )


def single_item_limits(
    models: list[RewardModel], config: RewardConfig, items: list[dict[str, str]]
) -> dict[str, float]:
    """Ms per item of the in-process limit's single-item forwards, one item per window
    (the in-flight limit at one item in flight) and all items at once in batches of one
    (the full limit at batch size 1): the same forwards, submitted apart or together."""

    def one_per_batch(model: RewardModel) -> BatchLimits:
        return replace(batch_limits(config, model), max_batch_size=1)

    apart = measure(models, items, one_per_batch, window=1)
    together = measure(models, items, one_per_batch)
    return {
        "one_item_per_window_ms": 1e3 / apart.items_per_s,
        "all_items_at_once_ms": 1e3 / together.items_per_s,
    }


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes are positive integers, e.g. 1,8,64")
    return sizes


def main() -> int:
    share_one_heap()  # the server's heap policy (service.memory)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--holistic", choices=["minilm", *HOLISTIC_SIZES], default="minilm")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--jit", choices=JIT_MODES, default="default")
    parser.add_argument("--eager", action="store_true", help="leave packed forwards untraced")
    parser.add_argument(
        "--cudnn-attention",
        action="store_true",
        help="let SDPA use cuDNN's attention, as before session 25 (GPU only)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--batch-sizes", type=_sizes, default=[1, 8, 64])
    parser.add_argument("--windows", type=int, default=16, help="at most, per batch size")
    parser.add_argument(
        "--limit-items", type=int, default=64, help="items in the single-item limit figures"
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    set_jit_mode(args.jit)
    keep_freed_memory()  # the server's heap policy, for every figure below
    config, models = load_benchmark_models(
        args.cache_dir, holistic=args.holistic, dtype=args.dtype, trace_packed=not args.eager
    )
    if args.cudnn_attention:  # after the load, which turns it off on a GPU
        torch.backends.cuda.enable_cudnn_sdp(True)
    items = load_items(256)
    label = gpu_name()
    visits: list[VisitTiming] = []
    profiles: list[ForwardProfile] = []
    for model in (m for m in models if m.device != HOST_DEVICE):
        prepared = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
        for size in args.batch_sizes:
            v = visit_timing(model, prepared, size, args.windows)
            visits.append(v)
            print(
                f"{v.model} on {model.device}{label}, {v.batch_items} items "
                f"({v.padded_tokens:.0f} padded tokens, {v.windows} windows): "
                f"first visit {v.first_visit_ms:.2f} ms, second {v.second_visit_ms:.2f} ms",
                flush=True,
            )
        p = forward_profile(model, prepared[: max(args.batch_sizes)])
        profiles.append(p)
        print(
            f"{p.model}, {p.batch_items} items profiled: {p.wall_ms:.2f} ms wall, "
            f"{p.device_events} kernels and copies taking {p.device_ms:.2f} ms on the device",
            flush=True,
        )
        for where, ops in (("host", p.top_host_ops), ("device", p.top_device_ops)):
            for op in ops:
                print(f"  {where:6s} {op.self_ms:9.3f} ms {op.calls:6d}x  {op.name}", flush=True)
    single = single_item_limits(models, config, items[: args.limit_items])
    print(
        f"the limit's single items, {args.limit_items} of them: "
        f"{single['one_item_per_window_ms']:.2f} ms an item one per window, "
        f"{single['all_items_at_once_ms']:.2f} ms all at once",
        flush=True,
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "holistic": args.holistic,
                    "dtype": args.dtype,
                    "jit": args.jit,
                    "eager": args.eager,
                    "cudnn_attention": args.cudnn_attention,
                    "traced": {m.name: m.describe().get("traced") for m in models},
                    "visits": [asdict(v) for v in visits],
                    "profiles": [asdict(p) for p in profiles],
                    "single_item_limits": single,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
