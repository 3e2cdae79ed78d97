"""Packed rows against length-sorted forwards, on each of the benchmark's models alone.

    python -m benchmarks.row_packing [--models relevance,holistic] [--dtype bfloat16]
        [--sizes 1,8,64] [--rounds 3] [--holistic minilm]

Each model (the relevance aspect: all-MiniLM-L6-v2, `max_length` 128, a prompt row and
one row per sentence; the holistic RM: one prompt + response row) is loaded twice through
the real loader from the benchmark's config: as configured (`pack_rows: true`, rows end to
end in one forward) and with `pack_rows: false` (rows sorted by length and cut into
forwards by the device's call cost, as the server does). Batches of k consecutive workload
items run on both, through the server's own batch formation, the order alternating batch
by batch, so that both see the same spells of the machine. Per model and batch size:
items/s of each (all rounds' batches), the ratio packed / sorted (median of the rounds'
ratios) and each one's real / padded tokens.
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

from benchmarks.gpu_utilisation import gpu_name
from benchmarks.limit import padded_counter, server_batches
from benchmarks.models import HOLISTIC_SIZES, write_config
from benchmarks.workload import load_items
from service.batch_forming import BatchLimits
from service.config import RewardConfig, load_reward_config
from service.engine import batch_limits
from service.models import EncodingMemo, Prepared, RewardModel, load_models


@dataclass(frozen=True)
class PackingFigures:
    model: str
    batch_items: int
    packed_items_per_s: float
    sorted_items_per_s: float
    packed_over_sorted: float  # median of the rounds' ratios
    packed_padding_efficiency: float
    sorted_padding_efficiency: float


@dataclass(frozen=True)
class Served:
    """A model loaded one way, and the batch limits the server gives it."""

    model: RewardModel
    limits: BatchLimits

    def forwards(self, batch: list[Prepared]) -> list[list[Prepared]]:
        """The forwards the server runs for `batch`: sorted and cut by call cost unless the
        model lays out its own rows (then in arrival order, cut by the token budget)."""
        return server_batches(batch, self.limits, self.model)


def model_pair(config: RewardConfig, name: str, cache_dir: Path) -> tuple[Served, Served]:
    """Model `name` (the holistic RM or an aspect) as configured and with `pack_rows: false`,
    each loaded alone."""
    if name == config.holistic.name:
        holistic = config.holistic
        configs = [
            config.model_copy(update={"holistic": h, "aspects": []})
            for h in (holistic, holistic.model_copy(update={"pack_rows": False}))
        ]
        packed_model, sorted_model = (load_models(c, cache_dir)[0] for c in configs)
    else:
        (aspect,) = [a for a in config.aspects if a.name == name]
        unpacked = aspect.model_copy(update={"pack_rows": False})
        configs = [config.model_copy(update={"aspects": [a]}) for a in (aspect, unpacked)]
        packed_model, sorted_model = (load_models(c, cache_dir)[1] for c in configs)
    if not getattr(packed_model, "packs_rows", False):
        raise SystemExit(f"{name} does not pack its rows on this model: nothing to compare")
    return (
        Served(packed_model, batch_limits(config, packed_model)),
        Served(sorted_model, batch_limits(config, sorted_model)),
    )


def _seconds(served: Served, batch: list[Prepared]) -> float:
    started = time.perf_counter()
    for forward in served.forwards(batch):
        served.model.run(forward)  # returns Python floats: the device has finished
    return time.perf_counter() - started


def _efficiency(served: Served, batches: Sequence[list[Prepared]]) -> float:
    real = sum(p.tokens for batch in batches for p in batch)
    count = padded_counter(served.model)
    return real / sum(count(f) for batch in batches for f in served.forwards(batch))


def compare(
    packed: Served,
    unpacked: Served,
    prepared: Sequence[Prepared],
    size: int,
    rounds: int,
) -> PackingFigures:
    batches = [list(prepared[i : i + size]) for i in range(0, len(prepared) - size + 1, size)]
    for served in (packed, unpacked):
        _seconds(served, batches[0])  # warm-up: first calls allocate and pick kernels
    totals = {"packed": 0.0, "sorted": 0.0}
    ratios = []
    for round_index in range(rounds):
        spent = {"packed": 0.0, "sorted": 0.0}
        for index, batch in enumerate(batches):
            order = [("packed", packed), ("sorted", unpacked)]
            for name, served in order if (index + round_index) % 2 == 0 else order[::-1]:
                spent[name] += _seconds(served, batch)
        ratios.append(spent["sorted"] / spent["packed"])
        for name in totals:
            totals[name] += spent[name]
    items = rounds * len(batches) * size
    return PackingFigures(
        model=packed.model.name,
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
    parser.add_argument("--models", default="relevance,holistic", help="comma-separated")
    parser.add_argument("--holistic", choices=["minilm", *HOLISTIC_SIZES], default="minilm")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--sizes", default="1,8,64", help="items per batch, comma-separated")
    parser.add_argument("--items", type=int, default=256, help="workload items per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.yaml"
        write_config(args.cache_dir, config_path, holistic=args.holistic, dtype=args.dtype)
        config = load_reward_config(config_path)
    items = load_items(args.items)
    label = gpu_name()
    figures = []
    for name in args.models.split(","):
        packed, unpacked = model_pair(config, name, args.cache_dir)
        memo = EncodingMemo()
        prepared = [packed.model.prepare(i["prompt"], i["response"], memo) for i in items]
        for size in (int(s) for s in args.sizes.split(",")):
            f = compare(packed, unpacked, prepared, size, args.rounds)
            figures.append(f)
            print(
                f"{name} on {packed.model.device}{label}, batches of {size}: packed "
                f"{f.packed_items_per_s:.1f} items/s (real / padded "
                f"{f.packed_padding_efficiency:.3f}), length-sorted forwards "
                f"{f.sorted_items_per_s:.1f} ({f.sorted_padding_efficiency:.3f}): "
                f"{f.packed_over_sorted:.2f}x",
                flush=True,
            )
        del packed, unpacked
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "holistic": args.holistic,
                    "figures": [asdict(f) for f in figures],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
