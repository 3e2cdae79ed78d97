"""What a busy event loop costs a forward: each model's forward alone and beside a thread
running Python, and how many ops it calls from Python.

    python -m benchmarks.gil_contention --holistic deberta-large --dtype bfloat16

On a GPU the server's forwards ran 1.7 times as long as the same batches in process
(session 25) while its event loop was busy about half the time. Each op a forward calls
from Python lets go of the GIL and takes it back, and beside a thread running Python it
waits up to the switch interval (Python's default 5 ms) to get it. Here a thread spins
in Python for the whole measurement: the worst case of one busy event loop, so
`beside_ms` bounds what sharing the GIL with one such thread can cost a `run` of each
batch size. `--switch-interval-ms` sets the interval while the spinning thread runs, as
`batching.gil_switch_interval_ms` does in the server. On a CPU give `--threads 1` (each
of the server's CPU slots runs one torch thread): else the forward's own threads compete
with the spinning one for cores, and the loss mixes that with the GIL's waits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.gpu_utilisation import gpu_name
from benchmarks.models import HOLISTIC_SIZES, load_benchmark_models
from benchmarks.workload import load_items
from service.engine import HOST_DEVICE
from service.memory import share_one_heap
from service.models import EncodingMemo, Prepared, RewardModel


@dataclass(frozen=True)
class GilContention:
    model: str
    device: str
    items: int  # per `run` (the packer may cut it into several forwards)
    ops_from_python: int  # top-level profiler events of one `run`: GIL hand-overs
    alone_ms: float  # median, the mean of the medians before and after `beside_ms`
    beside_ms: float  # median, beside a thread spinning in Python
    ratio: float  # beside_ms / alone_ms


def ops_from_python(model: RewardModel, batch: Sequence[Prepared]) -> int:
    """The ops `model.run(batch)` calls from Python: the profiler's top-level events (a
    traced graph is one, whatever it runs inside)."""
    from torch.profiler import ProfilerActivity, profile

    model.run(batch)  # layouts cached, as the batcher leaves them
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model.run(batch)
    return sum(1 for event in profiler.events() if event.cpu_parent is None)


@contextmanager
def python_spinning(switch_interval_s: float | None) -> Iterator[None]:
    """A thread running Python for as long as the block runs, with the switch interval
    set, if given, for as long."""
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            count += 1

    interval = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    spinner = threading.Thread(target=spin, name="python_spinning")
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)


def _median_ms(model: RewardModel, batch: Sequence[Prepared], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.run(batch)  # returns Python floats: the device has finished
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure_contention(
    model: RewardModel,
    items: Sequence[dict[str, str]],
    sizes: Sequence[int],
    repeats: int,
    switch_interval_s: float | None = None,
) -> list[GilContention]:
    """For each batch size: consecutive workload items, run alone, beside a spinning
    thread, then alone again (the VM's speed drifts: the two alone figures average it)."""
    prepared = [model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items]
    figures = []
    for size in sizes:
        batch = prepared[:size]
        ops = ops_from_python(model, batch)  # also the warm-up
        before = _median_ms(model, batch, repeats)
        with python_spinning(switch_interval_s):
            beside = _median_ms(model, batch, repeats)
        after = _median_ms(model, batch, repeats)
        alone = (before + after) / 2
        figures.append(
            GilContention(model.name, model.device, len(batch), ops, alone, beside, beside / alone)
        )
    return figures


def main() -> int:
    share_one_heap()  # the server's heap policy (service.memory)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--holistic", choices=["minilm", *HOLISTIC_SIZES], default="minilm")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--sizes", default="1,8,64", help="items per run, comma-separated")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--switch-interval-ms", type=float, help="Python's own (5 ms) if unset")
    parser.add_argument("--threads", type=int, help="torch threads (1: as each CPU slot runs)")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    _, models = load_benchmark_models(args.cache_dir, holistic=args.holistic, dtype=args.dtype)
    items = load_items(256)
    sizes = [int(size) for size in args.sizes.split(",")]
    interval_s = None if args.switch_interval_ms is None else args.switch_interval_ms / 1e3
    figures = [
        figure
        for model in models
        if model.device != HOST_DEVICE
        for figure in measure_contention(model, items, sizes, args.repeats, interval_s)
    ]
    label = gpu_name()
    for f in figures:
        print(
            f"{f.model} on {f.device}{label}, {f.items} items: {f.ops_from_python} ops from "
            f"Python; {f.alone_ms:.2f} ms alone, {f.beside_ms:.2f} ms beside a thread running "
            f"Python ({f.ratio:.2f}x)",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "holistic": args.holistic,
                    "dtype": args.dtype,
                    "switch_interval_ms": args.switch_interval_ms,
                    "threads": args.threads,
                    "models": [asdict(f) for f in figures],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
