"""What one forward call costs beyond its tokens, in padded tokens of compute: the figure
behind `batching.forward_overhead_tokens` (`service/models/loading.py`), for one device.

    python -m benchmarks.forward_overhead --holistic deberta-large --dtype bfloat16

The batcher cuts a length-sorted batch where padding would cost more than another
forward; that needs the price of a forward call in tokens. For each tensor model of the
benchmark's config, on the device the config places it on: the median time of a forward
over the shortest workload item alone (a call's fixed cost, plus a few tokens) and the
median time per padded token of full batches (`--batch` items of about the median length,
the marginal cost at saturation). Their ratio is the call's overhead in tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.gpu_utilisation import gpu_name
from benchmarks.limit import padded_counter
from benchmarks.models import HOLISTIC_SIZES, load_benchmark_models
from benchmarks.workload import load_items
from service.engine import HOST_DEVICE
from service.memory import share_one_heap
from service.models import EncodingMemo, Prepared, RewardModel


@dataclass(frozen=True)
class ForwardOverhead:
    model: str
    device: str
    single_item_ms: float  # the shortest item alone
    single_item_tokens: int  # its padded tokens
    batch_items: int
    batch_padded_tokens: int
    per_padded_token_us: float  # in full batches
    overhead_tokens: float  # single_item_ms / per_padded_token_us


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()  # returns Python floats: the device has finished
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_overhead(
    model: RewardModel, items: Sequence[dict[str, str]], batch: int, repeats: int
) -> ForwardOverhead:
    prepared: list[Prepared] = sorted(
        (model.prepare(i["prompt"], i["response"], EncodingMemo()) for i in items),
        key=lambda p: p.length,
    )
    middle = max(0, min(len(prepared) - batch, len(prepared) // 2 - batch // 2))
    full = prepared[middle : middle + batch]
    padded = padded_counter(model)
    single_s = _median_seconds(lambda: model.run(prepared[:1]), repeats)
    per_token_s = _median_seconds(lambda: model.run(full), repeats) / padded(full)
    return ForwardOverhead(
        model=model.name,
        device=model.device,
        single_item_ms=single_s * 1e3,
        single_item_tokens=padded(prepared[:1]),
        batch_items=len(full),
        batch_padded_tokens=padded(full),
        per_padded_token_us=per_token_s * 1e6,
        overhead_tokens=single_s / per_token_s,
    )


def main() -> int:
    share_one_heap()  # the server's heap policy (service.memory)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--holistic", choices=["minilm", *HOLISTIC_SIZES], default="minilm")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--batch", type=int, default=64, help="items in a full batch")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    _, models = load_benchmark_models(
        args.cache_dir, holistic=args.holistic, dtype=args.dtype, compile=args.compile
    )
    items = load_items(256)
    figures = [
        measure_overhead(model, items, args.batch, args.repeats)
        for model in models
        if model.device != HOST_DEVICE
    ]
    label = gpu_name()
    for f in figures:
        print(
            f"{f.model} on {f.device}{label}: one item ({f.single_item_tokens} tokens) "
            f"{f.single_item_ms:.2f} ms; {f.per_padded_token_us:.3f} us per padded token in "
            f"batches of {f.batch_items} ({f.batch_padded_tokens} tokens): a forward call "
            f"costs {f.overhead_tokens:.0f} tokens",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "holistic": args.holistic,
                    "dtype": args.dtype,
                    "compile": args.compile,
                    "models": [asdict(f) for f in figures],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
