"""Measure the holistic reward's raw scores on real QA data, to set its `mu` and `sigma`.

For each item, scores (a) its reference answer and (b) a mismatched answer (the reference
answer of the next item), then prints JSON statistics and a suggested `mu` / `sigma`
(the pooled mean and standard deviation of the raw scores).

    python scripts/calibrate_holistic.py --limit 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from service.config import load_reward_config
from service.models import EncodingMemo, HolisticScore, load_models


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="YAML (default: embedded)")
    parser.add_argument("--data", type=Path, default=Path("data/qa_feedback_sample.jsonl"))
    parser.add_argument("--limit", type=int, default=40, help="items to score")
    parser.add_argument("--batch-size", type=int, default=4, help="items per .run call")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    args = parser.parse_args(argv)

    items = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if len(items) < 2:
        parser.error("need at least two items (the mismatched answer is another item's)")
    n = min(args.limit, len(items))
    config = load_reward_config(args.config)
    holistic = load_models(config, args.cache_dir)[0]

    pairs = [
        (items[i]["prompt"], items[i]["answer"], items[(i + 1) % len(items)]["answer"])
        for i in range(n)
    ]
    refs: list[float | None] = []
    mismatched: list[float | None] = []
    truncated = 0
    started = time.perf_counter()
    for start in range(0, n, args.batch_size):
        chunk = pairs[start : start + args.batch_size]
        prepared = [holistic.prepare(p, r, EncodingMemo()) for p, r, _ in chunk]
        prepared += [holistic.prepare(p, m, EncodingMemo()) for p, _, m in chunk]
        truncated += sum(p.truncated for p in prepared)
        scores = holistic.run(prepared)
        raws = [s.raw if isinstance(s, HolisticScore) else None for s in scores]
        refs += raws[: len(chunk)]
        mismatched += raws[len(chunk) :]
    elapsed = time.perf_counter() - started

    both = [
        (r, m) for r, m in zip(refs, mismatched, strict=True) if r is not None and m is not None
    ]
    if not both:
        raise SystemExit("no item gave both a reference and a mismatched score")
    ref_ok = [r for r, _ in both]
    mis_ok = [m for _, m in both]
    pooled = _stats(ref_ok + mis_ok)
    report = {
        "model": config.holistic.name,
        "current": {"mu": config.holistic.mu, "sigma": config.holistic.sigma},
        "items": n,
        "scored_pairs": len(both),
        "truncated_inputs": truncated,
        "reference": _stats(ref_ok),
        "mismatched": _stats(mis_ok),
        "pooled": pooled,
        "reference_beats_mismatched": round(sum(r > m for r, m in both) / len(both), 4),
        "suggested": {"mu": pooled["mean"], "sigma": pooled["std"]},
        "scoring_seconds": round(elapsed, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
