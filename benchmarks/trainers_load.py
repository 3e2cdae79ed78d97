"""Several trainer processes share one alarm-serve process on loopback, for a fixed time.

Each round starts one OS process per trainer (its own API key, its own asyncio client with
a few requests in flight), runs them for `--seconds`, and reports throughput, latency
percentiles per trainer, errors by type and the server's resident memory before and after.
Repeating rounds against the same server shows whether memory grows from round to round.

    python -m benchmarks.trainers_load --out benchmarks/out/trainers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.models import write_config
from benchmarks.servers import free_port, start_server, stop_server
from benchmarks.workload import load_items

ALARM_SERVE = str(Path(sys.executable).with_name("alarm-serve"))


def resident_mb(pid: int) -> float:
    """The process's resident set size, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    try:
        error_type = response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        error_type = "unparsable"
    return f"{response.status_code} {error_type}"


async def _trainer_loop(
    base_url: str, key: str, seconds: float, concurrency: int, items_per_request: int, seed: int
) -> dict[str, Any]:
    pool = load_items(240, seed)
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    latencies_ms: list[float] = []
    items_ok = 0
    started = time.monotonic()
    stop_at = started + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal items_ok
        while time.monotonic() < stop_at:
            items = rng.sample(pool, items_per_request)
            started = time.perf_counter()
            try:
                response = await client.post("/v1/rewards", json={"items": items})
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                continue
            outcome = _outcome(response)
            outcomes[outcome] += 1
            if outcome == "ok":
                latencies_ms.append(1000 * (time.perf_counter() - started))
                items_ok += len(response.json()["results"])
            elif "retry-after" in response.headers:  # behave like a real client
                await asyncio.sleep(float(response.headers["retry-after"]))

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return {
        "outcomes": dict(outcomes),
        "latencies_ms": latencies_ms,
        "items_ok": items_ok,
        "seconds": time.monotonic() - started,  # incl. the last answers, excl. start-up
    }


def _trainer_process(args: tuple[str, str, float, int, int, int], results: Any) -> None:
    results.put((args[1], asyncio.run(_trainer_loop(*args))))


def _percentile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run_round(
    base_url: str, keys: dict[str, str], seconds: float, concurrency: int, items_per_request: int
) -> dict[str, Any]:
    """One round: every trainer process runs for `seconds`; returns the round's report."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(
            target=_trainer_process,
            args=((base_url, key, seconds, concurrency, items_per_request, seed), results),
        )
        for seed, key in enumerate(keys.values())
    ]
    for process in processes:
        process.start()
    by_key = dict(results.get(timeout=seconds + 300) for _ in processes)
    for process in processes:
        process.join()
    elapsed = max(report["seconds"] for report in by_key.values())
    trainers = {}
    errors: Counter[str] = Counter()
    for name, key in keys.items():
        report = by_key[key]
        latencies = report["latencies_ms"]
        outcomes = Counter(report["outcomes"])
        errors.update({k: v for k, v in outcomes.items() if k != "ok"})
        trainers[name] = {
            "requests": sum(outcomes.values()),
            "ok": outcomes["ok"],
            "items_per_s": report["items_ok"] / report["seconds"],
            "p50_ms": _percentile(latencies, 50),
            "p95_ms": _percentile(latencies, 95),
            "p99_ms": _percentile(latencies, 99),
        }
    return {
        "seconds": elapsed,
        "items_per_s": sum(by_key[key]["items_ok"] for key in keys.values()) / elapsed,
        "trainers": trainers,
        "errors": dict(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/trainers"))
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight each")
    parser.add_argument("--items-per-request", type=int, default=8)
    parser.add_argument("--config", type=Path, help="a reward config (default: the benchmark's)")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.out / "cache"
    config_path = args.config or args.out / "config.yaml"
    if args.config is None:
        write_config(cache_dir, config_path)
    keys = {f"trainer-{i}": f"load-key-{i}-{os.urandom(8).hex()}" for i in range(args.trainers)}
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api_keys = ",".join(f"{name}:{key}" for name, key in keys.items())
    command = [ALARM_SERVE, "serve", "--config", str(config_path), "--port", str(port)]
    server = start_server(
        [*command, "--cache-dir", str(cache_dir)],
        base_url,
        args.out / "server.log",
        env={"ALARM_API_KEYS": api_keys},
    )
    rounds = []
    try:
        for index in range(args.rounds):
            before = resident_mb(server.pid)
            report = run_round(
                base_url, keys, args.seconds, args.concurrency, args.items_per_request
            )
            report.update(
                round=index + 1, rss_before_mb=before, rss_after_mb=resident_mb(server.pid)
            )
            rounds.append(report)
            print(_summary(report), flush=True)
    finally:
        stop_server(server)
    result = {
        "trainers": args.trainers,
        "seconds_per_round": args.seconds,
        "concurrency_per_trainer": args.concurrency,
        "items_per_request": args.items_per_request,
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
        # The first round warms allocators and caches; growth after it would be a leak.
        "rss_growth_after_first_round_mb": rounds[-1]["rss_after_mb"] - rounds[0]["rss_after_mb"],
    }
    (args.out / "trainers_load.json").write_text(json.dumps(result, indent=2))
    print(f"RSS growth after round 1: {result['rss_growth_after_first_round_mb']:+.1f} MB")
    return 0


def _summary(report: dict[str, Any]) -> str:
    lines = [
        f"round {report['round']}: {report['items_per_s']:.1f} items/s, "
        f"RSS {report['rss_before_mb']:.0f} -> {report['rss_after_mb']:.0f} MB, "
        f"errors {report['errors'] or 'none'}"
    ]
    for name, t in report["trainers"].items():
        lines.append(
            f"  {name}: {t['ok']}/{t['requests']} ok, {t['items_per_s']:.1f} items/s, "
            + ", ".join(f"{q} {_ms(t[f'{q}_ms'])}" for q in ("p50", "p95", "p99"))
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


if __name__ == "__main__":
    raise SystemExit(main())
