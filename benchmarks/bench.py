"""One-command throughput benchmark: in-process limit vs alarm-serve vs a naive peer.

    python -m benchmarks.bench --out benchmarks/out            (about 5 minutes on 2 CPUs)

Same models (holistic + 2 aspects), same inputs, same machine, one run. Writes
results.json and throughput.png, and prints the ratios alarm-serve / limit and
alarm-serve / peer for every load point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.limit import best_limit
from benchmarks.load import LoadResult, run_load
from benchmarks.models import write_config
from benchmarks.workload import load_items
from service.config import load_reward_config

GRID = [(1, 1), (8, 1), (64, 1), (256, 1), (1, 16), (8, 16), (64, 16)]
FULL_GRID = [*GRID, (256, 16)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _counter_sum(metrics_text: str, name: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in metrics_text.splitlines()
        if line.startswith(name + "{") and 'model="length"' not in line
    )


def _padding_efficiency(before: str, after: str) -> float:
    real = _counter_sum(after, "alarm_real_tokens_total") - _counter_sum(
        before, "alarm_real_tokens_total"
    )
    padded = _counter_sum(after, "alarm_padded_tokens_total") - _counter_sum(
        before, "alarm_padded_tokens_total"
    )
    return real / padded if padded else float("nan")


def _start(command: list[str], url: str) -> subprocess.Popen:
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"{command[0]} exited: {stderr[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{command} not ready")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _sweep(
    name: str, url: str, items: list[dict[str, str]], grid: list[tuple[int, int]], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    asyncio.run(run_load(url, "/v1/rewards", items, 4, 4, 2.0))  # warm-up
    for concurrency, per_request in grid:
        before = httpx.get(f"{url}/metrics").text if name == "alarm-serve" else ""
        result: LoadResult = asyncio.run(
            run_load(url, "/v1/rewards", items, concurrency, per_request, seconds)
        )
        row = {"system": name, **asdict(result)}
        if name == "alarm-serve":
            row["padding_efficiency"] = _padding_efficiency(
                before, httpx.get(f"{url}/metrics").text
            )
        print(
            f"{name:12s} C={concurrency:<4d} k={per_request:<3d} {result.items_per_s:8.1f} items/s"
            f"  p50 {result.p50_ms:8.1f} ms  p99 {result.p99_ms:8.1f} ms  errors {result.errors}",
            flush=True,
        )
        rows.append(row)
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["concurrency"], r["items_per_request"]) for r in results["alarm-serve"]]
    labels = [f"C={c}\nk={k}" for c, k in points]
    xs = range(len(points))
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.38
    for offset, system in ((-width / 2, "alarm-serve"), (width / 2, "naive-fastapi")):
        tput.bar(
            [x + offset for x in xs],
            [r["items_per_s"] for r in results[system]],
            width,
            label=system,
        )
        lat.bar(
            [x + offset for x in xs], [r["p99_ms"] for r in results[system]], width, label=system
        )
    tput.axhline(
        results["limit"]["best"]["items_per_s"],
        color="black",
        linestyle="--",
        label="in-process limit",
    )
    tput.set(title="throughput (items/s)", xticks=list(xs), xticklabels=labels)
    lat.set(title="p99 latency (ms, log)", xticks=list(xs), xticklabels=labels, yscale="log")
    for ax in (tput, lat):
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per point")
    parser.add_argument("--full", action="store_true", help="add C=256, k=16 (slow on CPU)")
    parser.add_argument(
        "--min-padding-efficiency", type=float, default=0.0, help="batching knob under test"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.yaml"
    write_config(args.cache_dir, config_path, min_padding_efficiency=args.min_padding_efficiency)
    config = load_reward_config(config_path)
    items = load_items(1024)
    grid = FULL_GRID if args.full else GRID
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "grid": grid,
    }

    best, all_sizes = best_limit(config, args.cache_dir, items[:256], [1, 8, 32, 64])
    results["limit"] = {"best": asdict(best), "by_batch_size": [asdict(r) for r in all_sizes]}
    print(
        f"limit: {best.items_per_s:.1f} items/s at batch {best.batch_size} "
        f"(padding efficiency {best.padding_efficiency:.3f})",
        flush=True,
    )

    for name, command in (
        (
            "alarm-serve",
            [
                str(Path(sys.executable).with_name("alarm-serve")),
                "serve",
                "--config",
                str(config_path),
                "--cache-dir",
                str(args.cache_dir),
                "--log-level",
                "warning",
            ],
        ),
        (
            "naive-fastapi",
            [
                sys.executable,
                "-m",
                "benchmarks.naive_server",
                "--config",
                str(config_path),
                "--cache-dir",
                str(args.cache_dir),
            ],
        ),
    ):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = _start([*command, "--port", str(port)], url)
        try:
            results[name] = _sweep(name, url, items, grid, args.seconds)
        finally:
            _stop(process)

    limit = best.items_per_s
    results["ratios"] = [
        {
            "concurrency": ours["concurrency"],
            "items_per_request": ours["items_per_request"],
            "alarm_over_limit": ours["items_per_s"] / limit,
            "alarm_over_naive": ours["items_per_s"] / peer["items_per_s"],
            "padding_efficiency": ours["padding_efficiency"],
        }
        for ours, peer in zip(results["alarm-serve"], results["naive-fastapi"], strict=True)
    ]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "throughput.png")
    print("\nC     k    alarm/limit  alarm/naive  padding-eff")
    for r in results["ratios"]:
        print(
            f"{r['concurrency']:<5d} {r['items_per_request']:<4d} {r['alarm_over_limit']:11.2f}"
            f"  {r['alarm_over_naive']:11.2f}  {r['padding_efficiency']:11.3f}"
        )
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
