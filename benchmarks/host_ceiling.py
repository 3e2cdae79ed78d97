"""The host's ceiling: requests/s with forwards that cost nothing, over HTTP and without.

    python -m benchmarks.host_ceiling --out benchmarks/out-host     (2 CPUs: about 3 minutes)

A host-bound GPU (session 10: one H100 at 7-27 % utilisation) serves what its host allows.
This measures that bound on any machine: the benchmark's reward definition with every
network swapped for one that returns at once (`benchmarks.free_forwards`), scheduled as
on a GPU (one forward at a time, the GPU's forward-overhead figure), loaded by the same
closed-loop clients as `benchmarks.bench`. Each round measures, at each load point:
- **engine**: C asyncio clients calling the engine's `score` in this process (no HTTP);
- **http**: the same engine served by alarm-serve over HTTP, in each layout asked for
  (`--front-ends 0,1,2`: 0 is one process, N an engine process behind N HTTP front-end
  processes), with the engine's event loop's CPU per request (its process's main thread,
  from /proc) and all the server's processes';
every server but the one under load is paused (SIGSTOP), all of them while the engine alone
runs. Figures are medians of the rounds, the ratio http / engine the median of the rounds'
ratios: what HTTP, validation and JSON cost on top of the engine's own host work. The
`http_*` figures are the first layout's; `layouts` holds each one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.free_forwards import load_free_models
from benchmarks.gpu_utilisation import gpu_name
from benchmarks.load import run_load
from benchmarks.models import write_config
from benchmarks.servers import (
    cpu_seconds,
    free_port,
    paused,
    server_processes,
    start_server,
    stop_server,
)
from benchmarks.workload import load_items
from service.config import load_reward_config
from service.engine import RewardEngine, ScoreInput
from service.memory import share_one_heap
from service.metrics import ServiceMetrics
from service.supervisor import ENGINE_ROLE, ROLE_ENV

POINTS = [(1, 1), (64, 1), (256, 1), (8, 16), (64, 16)]
GPU_FORWARD_OVERHEAD_TOKENS = 4096  # the server's default on a GPU (service.models.loading)
ITEMS = 256


@dataclass(frozen=True)
class Measured:
    items_per_s: float
    requests_per_s: float
    loop_ms_per_request: float  # the event loop's (main thread's) CPU per request
    process_ms_per_request: float | None  # all threads; None: not measured (in process)


def _thread_cpu_s(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine_alone(
    engine: RewardEngine, items: list[ScoreInput], concurrency: int, k: int, seconds: float
) -> Measured:
    """C clients calling `engine.score` back to back, each with k items."""
    cursor = 0
    done = 0

    async def client(stop_at: float) -> None:
        nonlocal cursor, done
        while time.perf_counter() < stop_at:
            chunk = [items[(cursor + i) % len(items)] for i in range(k)]
            cursor += k
            await engine.score(chunk)
            done += 1

    cpu, started = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return Measured(done * k / elapsed, done / elapsed, 1000 * cpu / max(done, 1), None)


def engine_process(leader: int) -> int:
    """The server process that runs the engine: the leader itself, or a split server's
    child in the engine role."""
    role = f"{ROLE_ENV}={ENGINE_ROLE}".encode()
    for pid in server_processes(leader):
        try:
            if role in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return leader


async def over_http(
    url: str, leader: int, items: list[dict[str, str]], concurrency: int, k: int, seconds: float
) -> Measured:
    pids = server_processes(leader)
    engine = engine_process(leader)
    loop_before, process_before = _thread_cpu_s(engine, engine), cpu_seconds(pids)
    load = await run_load(url, "/v1/rewards", items, concurrency, k, seconds)
    loop_cpu = _thread_cpu_s(engine, engine) - loop_before
    process_cpu = cpu_seconds(pids) - process_before
    if load.errors:
        raise RuntimeError(f"errors under load: {load.errors}")
    requests = max(load.requests, 1)
    return Measured(
        load.items_per_s,
        load.requests / load.seconds,
        1000 * loop_cpu / requests,
        1000 * process_cpu / requests,
    )


def _points(text: str) -> list[tuple[int, int]]:
    return [(int(c), int(k)) for c, k in (p.split("x") for p in text.split(","))]


def _counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config_path = args.out / "config.yaml"
    write_config(
        args.cache_dir,
        config_path,
        cpu_workers=1,  # one forward at a time, as on a GPU
        forward_overhead_tokens=GPU_FORWARD_OVERHEAD_TOKENS,
    )
    config = load_reward_config(config_path)
    workload = load_items(1024)[:ITEMS]
    inputs = [ScoreInput(item["prompt"], item["response"]) for item in workload]
    engine = RewardEngine(
        load_free_models(config, args.cache_dir), config, ServiceMetrics(CollectorRegistry())
    )
    await engine.start()
    layouts: list[int] = getattr(args, "front_ends", None) or [0]
    servers: dict[int, tuple[str, Any]] = {}
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPUs{gpu_name()}",
        "front_ends": layouts,
        "points": [],
    }
    try:
        for front_ends in layouts:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "benchmarks.free_forwards"]
            command += ["--config", str(config_path), "--cache-dir", str(args.cache_dir)]
            command += ["--port", str(port), "--front-ends", str(front_ends)]
            log = args.out / f"server-{front_ends}.log"
            with paused([process.pid for _, process in servers.values()]):
                servers[front_ends] = (url, start_server(command, url, log))
                await run_load(url, "/v1/rewards", workload, 4, 4, 2.0)  # warm-up
        leaders = {n: process.pid for n, (_, process) in servers.items()}
        for concurrency, k in args.points:
            rounds: list[tuple[Measured, dict[int, Measured]]] = []
            for _ in range(args.rounds):
                with paused(list(leaders.values())):
                    alone = await engine_alone(engine, inputs, concurrency, k, args.seconds)
                served: dict[int, Measured] = {}
                for n, (url, _) in servers.items():
                    with paused([pid for other, pid in leaders.items() if other != n]):
                        served[n] = await over_http(
                            url, leaders[n], workload, concurrency, k, args.seconds
                        )
                rounds.append((alone, served))
            point = summarise(concurrency, k, rounds)
            results["points"].append(point)
            served_text = "; ".join(
                f"{n} front-ends: {layout['items_per_s']:.0f} items/s "
                f"({layout['over_engine']:.2f} of the engine alone, its loop "
                f"{layout['loop_ms_per_request']:.2f} ms per request)"
                for n, layout in point["layouts"].items()
            )
            print(
                f"C={concurrency} k={k}: engine alone {point['engine_items_per_s']:.0f} "
                f"items/s ({point['engine_loop_ms_per_request']:.2f} ms per request); "
                f"over HTTP with {served_text}",
                flush=True,
            )
    finally:
        for _, process in servers.values():
            stop_server(process)
        await engine.stop()
    return results


def _layout(alone: list[Measured], served: list[Measured]) -> dict[str, Any]:
    return {
        "items_per_s": statistics.median(s.items_per_s for s in served),
        "requests_per_s": statistics.median(s.requests_per_s for s in served),
        "over_engine": statistics.median(
            s.items_per_s / a.items_per_s for a, s in zip(alone, served, strict=True)
        ),
        "loop_ms_per_request": statistics.median(s.loop_ms_per_request for s in served),
        "process_ms_per_request": statistics.median(
            s.process_ms_per_request or 0.0 for s in served
        ),
    }


def summarise(
    concurrency: int, k: int, rounds: list[tuple[Measured, dict[int, Measured]]]
) -> dict[str, Any]:
    alone = [a for a, _ in rounds]
    layouts = {str(n): _layout(alone, [served[n] for _, served in rounds]) for n in rounds[0][1]}
    first = next(iter(layouts.values()))
    return {
        "concurrency": concurrency,
        "items_per_request": k,
        "engine_items_per_s": statistics.median(a.items_per_s for a in alone),
        "http_items_per_s": first["items_per_s"],
        "http_requests_per_s": first["requests_per_s"],
        "http_over_engine": first["over_engine"],
        "engine_loop_ms_per_request": statistics.median(a.loop_ms_per_request for a in alone),
        "http_loop_ms_per_request": first["loop_ms_per_request"],
        "http_process_ms_per_request": first["process_ms_per_request"],
        "layouts": layouts,
        "rounds": [
            {
                "engine_items_per_s": a.items_per_s,
                "http_items_per_s": {str(n): m.items_per_s for n, m in served.items()},
            }
            for a, served in rounds
        ],
    }


def main() -> int:
    share_one_heap()  # the server's heap policy (service.memory), for the engine alone
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out-host"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--points", type=_points, default=POINTS, help="e.g. 64x1,8x16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="load per point and round")
    parser.add_argument(
        "--front-ends",
        type=_counts,
        default=[0],
        help="server layouts to compare, e.g. 0,1,2 (0: one process)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
