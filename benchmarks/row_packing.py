"""Packed rows against length-sorted forwards, on the benchmark's relevance aspect alone.

    python -m benchmarks.row_packing [--dtype bfloat16] [--sizes 1,8,64] [--rounds 3]

The relevance aspect (all-MiniLM-L6-v2, `max_length` 128) is loaded twice through the real
loader from the benchmark's config: as configured (`pack_rows: true`, rows end to end in
one forward) and with `pack_rows: false` (rows sorted by length and cut into forwards by
the device's call cost, as before). Batches of k consecutive workload items run on both, the
order alternating batch by batch, so that both see the same spells of the machine. Per
batch size: items/s of each (all rounds' batches), the ratio packed / sorted (median of the
rounds' ratios) and each one's real / padded tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.bench import gpu_name
from benchmarks.models import write_config
from benchmarks.workload import load_items
from service.config import RewardConfig, load_reward_config
from service.models import EncodingMemo, Prepared, RewardModel, load_models

ASPECT = "relevance"


@dataclass(frozen=True)
class PackingFigures:
    batch_items: int
    packed_items_per_s: float
    sorted_items_per_s: float
    packed_over_sorted: float  # median of the rounds' ratios
    packed_padding_efficiency: float
    sorted_padding_efficiency: float


def relevance_models(config: RewardConfig, cache_dir: Path) -> tuple[RewardModel, RewardModel]:
    """The relevance aspect as configured (packing) and with `pack_rows: false`."""
    (spec,) = [a for a in config.aspects if a.name == ASPECT]
    unpacked = spec.model_copy(update={"pack_rows": False})
    configs = [config.model_copy(update={"aspects": [a]}) for a in (spec, unpacked)]
    packed_model, sorted_model = (load_models(c, cache_dir)[1] for c in configs)
    if not getattr(packed_model, "packs_rows", False):
        raise SystemExit(f"{ASPECT} does not pack its rows on this encoder: nothing to compare")
    return packed_model, sorted_model


def _seconds(model: RewardModel, batch: list[Prepared]) -> float:
    started = time.perf_counter()
    model.run(batch)  # returns Python floats: the device has finished
    return time.perf_counter() - started


def _efficiency(model: RewardModel, batches: Sequence[list[Prepared]]) -> float:
    real = sum(p.tokens for batch in batches for p in batch)
    return real / sum(model.padded_tokens(batch) for batch in batches)  # type: ignore[attr-defined]


def compare(
    packed: RewardModel,
    unpacked: RewardModel,
    prepared: Sequence[Prepared],
    size: int,
    rounds: int,
) -> PackingFigures:
    batches = [list(prepared[i : i + size]) for i in range(0, len(prepared) - size + 1, size)]
    for model in (packed, unpacked):
        model.run(batches[0])  # warm-up: first calls allocate and pick kernels
    totals = {"packed": 0.0, "sorted": 0.0}
    ratios = []
    for round_index in range(rounds):
        spent = {"packed": 0.0, "sorted": 0.0}
        for index, batch in enumerate(batches):
            order = [("packed", packed), ("sorted", unpacked)]
            for name, model in order if (index + round_index) % 2 == 0 else order[::-1]:
                spent[name] += _seconds(model, batch)
        ratios.append(spent["sorted"] / spent["packed"])
        for name in totals:
            totals[name] += spent[name]
    items = rounds * len(batches) * size
    return PackingFigures(
        batch_items=size,
        packed_items_per_s=items / totals["packed"],
        sorted_items_per_s=items / totals["sorted"],
        packed_over_sorted=statistics.median(ratios),
        packed_padding_efficiency=_efficiency(packed, batches),
        sorted_padding_efficiency=_efficiency(unpacked, batches),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--sizes", default="1,8,64", help="items per batch, comma-separated")
    parser.add_argument("--items", type=int, default=128, help="workload items per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.yaml"
        write_config(args.cache_dir, config_path, dtype=args.dtype)
        packed, unpacked = relevance_models(load_reward_config(config_path), args.cache_dir)
    memo = EncodingMemo()
    prepared = [packed.prepare(i["prompt"], i["response"], memo) for i in load_items(args.items)]
    label = gpu_name()
    figures = []
    for size in (int(s) for s in args.sizes.split(",")):
        f = compare(packed, unpacked, prepared, size, args.rounds)
        figures.append(f)
        print(
            f"{ASPECT} on {packed.device}{label}, batches of {size}: packed "
            f"{f.packed_items_per_s:.1f} items/s (real / padded {f.packed_padding_efficiency:.3f}),"
            f" length-sorted forwards {f.sorted_items_per_s:.1f} "
            f"({f.sorted_padding_efficiency:.3f}): {f.packed_over_sorted:.2f}x",
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps({"dtype": args.dtype, "figures": [asdict(f) for f in figures]}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
