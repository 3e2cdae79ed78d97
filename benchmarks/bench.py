"""One-command throughput benchmark: in-process limit vs alarm-serve vs its peers.

    python -m benchmarks.bench --out benchmarks/out     (2 CPUs: about 30 minutes)

Same models (holistic + 2 aspects), same inputs, same machine, one run. The peers
(`--peers`, all by default) are the naive one-forward-per-request FastAPI server, LitServe
with its batching and Ray Serve with `@serve.batch`, all on the same scoring code. Every
server stays up for the whole run; at each load point the servers and the in-process
limits (all items sorted together, and only the C x k items in flight) are measured in
`--rounds` rounds close together (servers not under load paused), and each figure is
the median of its rounds; each ratio is the median of its rounds' ratios. Writes
results.json and throughput.png, and prints the ratios alarm-serve / limit,
alarm-serve / in-flight limit and alarm-serve / each peer for every load point, with the
host's share of alarm-serve's CPU (its event loop and tokenizer threads against its forwards).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gpu_utilisation import gpu_name
from benchmarks.limit import LimitResult, best_limit, measure
from benchmarks.load import run_load
from benchmarks.load_point import LIMIT_ITEMS, measure_point
from benchmarks.models import HOLISTIC_SIZES, RELEVANCE_PATH, write_config
from benchmarks.servers import free_port, idle_cpu_share, start_server, stop_server
from benchmarks.summary import plot, print_table, summarise, write_atomically
from benchmarks.workload import load_items
from service.allocator import loaded_allocator, run_again_with_tcmalloc
from service.config import load_reward_config
from service.engine import HOST_DEVICE, batch_limits, device_slots
from service.memory import share_one_heap
from service.models import load_models

GRID = [(1, 1), (8, 1), (64, 1), (256, 1), (1, 16), (8, 16), (64, 16)]
FULL_GRID = [*GRID, (256, 16)]


@dataclass(frozen=True)
class Peer:
    system: str  # its name in results.json and on the chart
    module: str  # run as `python -m module --config --cache-dir --port`


PEERS = {
    "naive": Peer("naive-fastapi", "benchmarks.naive_server"),
    "litserve": Peer("litserve", "benchmarks.litserve_peer"),
    "ray": Peer("ray-serve", "benchmarks.ray_serve_peer"),
}


def peer_command(peer: Peer, config_path: Path, cache_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        peer.module,
        "--config",
        str(config_path),
        "--cache-dir",
        str(cache_dir),
    ]


def source_revision(directory: Path = Path(__file__).parent) -> str:
    """The commit whose code a run measured, "-dirty" when any tracked file was changed
    (documents too), so that each results.json names its code; "unknown" outside a git
    checkout (a copied tree: `--commit` names it). The checkout is `directory`'s own,
    whatever GIT_* variables the caller has set."""
    git = ["git", "--no-optional-locks", "-C", str(directory)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}

    def run(*args: str) -> str:
        return subprocess.run(
            [*git, *args], capture_output=True, text=True, check=True, env=env
        ).stdout.strip()

    try:
        commit = run("rev-parse", "--short", "HEAD")
        changed = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changed else "")


def _peer_names(text: str) -> list[str]:
    """`naive,litserve`, or `none`: alarm-serve and its limits alone (a knob's second run)."""
    if text.strip() == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; choose from {sorted(PEERS)}")
    return names


def _batch_sizes(text: str) -> list[int]:
    sizes = [int(size) for size in text.split(",")]
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError("batch sizes are positive integers")
    return sizes


def _load_points(text: str) -> list[tuple[int, int]]:
    """`1x1,8x16`: C concurrent clients x k items per request."""
    try:
        return [(int(c), int(k)) for c, k in (p.split("x") for p in text.split(","))]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CxK[,CxK...], got {text!r}") from exc


def _parser() -> argparse.ArgumentParser:
    """The run's options: the load grid, the peers, the models, and the batching knobs
    that a GPU session tries."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="load per server, point and round"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="rounds per point (figures are their medians)"
    )
    parser.add_argument("--full", action="store_true", help="add C=256, k=16 (slow on CPU)")
    parser.add_argument(
        "--points", type=_load_points, help="load points instead of the grid, e.g. 1x1,8x16"
    )
    parser.add_argument(
        "--peers",
        type=_peer_names,
        default=list(PEERS),
        help=f"comma-separated peers to compare against, or none (default: {','.join(PEERS)})",
    )
    parser.add_argument(
        "--min-padding-efficiency", type=float, default=0.0, help="batching knob under test"
    )
    parser.add_argument(
        "--holistic",
        choices=["minilm", *HOLISTIC_SIZES],
        default="minilm",
        help="holistic RM: MiniLM with a scalar head, or a random-weight RM of a real size",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--cpu-workers",
        type=int,
        default=None,
        help="alarm-serve's batching.cpu_workers (default: the server's)",
    )
    parser.add_argument(
        "--gpu-workers",
        type=int,
        default=None,
        help="alarm-serve's batching.gpu_workers: forwards at once per GPU (default: the "
        "server's, 1)",
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="batching wait, for every server"
    )
    parser.add_argument(
        "--fill-wait-ms",
        type=float,
        default=0.0,
        help="alarm-serve's batching.fill_wait_ms: how long a batch that has its device "
        "may wait to fill",
    )
    parser.add_argument(
        "--gil-switch-interval-ms",
        type=float,
        default=None,
        help="alarm-serve's batching.gil_switch_interval_ms (default: Python's 5 ms)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="leave packed forwards eager (trace_packed: false) in every server and limit",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="items per forward, for alarm-serve, the peers and the limits (GPUs: try more)",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="padded tokens per forward"
    )
    parser.add_argument(
        "--limit-batch-sizes",
        type=_batch_sizes,
        default=[1, 8, 32, 64],
        help="batch sizes the limit tries (the configured --max-batch-size too), e.g. 1,64,256",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=2.0,
        help="load each server takes before the run (a GPU meets each new shape once)",
    )
    parser.add_argument(
        "--front-ends",
        type=int,
        default=0,
        help="alarm-serve's HTTP front-end processes over one engine process (0: one process)",
    )
    parser.add_argument(
        "--commit",
        help="the commit results.json names, for a tree without git (default: the checkout's)",
    )
    parser.add_argument(
        "--relevance-path",
        default=RELEVANCE_PATH,
        help="the relevance aspect's embedding model (a MiniLM-style folder)",
    )
    return parser


def main() -> int:
    # The server's malloc (service.allocator) and heap policy (service.memory), for the
    # in-process limits; every server started below inherits the malloc (ALARM_ALLOCATOR).
    run_again_with_tcmalloc()
    share_one_heap()
    args = _parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.yaml"
    write_config(
        args.cache_dir,
        config_path,
        min_padding_efficiency=args.min_padding_efficiency,
        holistic=args.holistic,
        dtype=args.dtype,
        compile=args.compile,
        relevance_path=args.relevance_path,
        cpu_workers=args.cpu_workers,
        gpu_workers=args.gpu_workers,
        max_wait_ms=args.max_wait_ms,
        fill_wait_ms=args.fill_wait_ms,
        gil_switch_interval_ms=args.gil_switch_interval_ms,
        trace_packed=not args.eager,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
    )
    config = load_reward_config(config_path)
    items = load_items(1024)
    grid = args.points or (FULL_GRID if args.full else GRID)
    limit_sizes = sorted({*args.limit_batch_sizes, config.batching.max_batch_size})
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}{gpu_name()}",
        "commit": args.commit or source_revision(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "models": {
            "holistic": args.holistic,
            "relevance": args.relevance_path,
            "dtype": args.dtype,
            "compile": args.compile,
            "trace_packed": not args.eager,
            "cpu_workers": config.batching.cpu_workers,
            "gpu_workers": config.batching.gpu_workers,
            "fill_wait_ms": config.batching.fill_wait_ms,
            "gil_switch_interval_ms": config.batching.gil_switch_interval_ms,
            "max_batch_tokens": config.batching.max_batch_tokens,
        },
        "grid": grid,
        "alarm_serve_front_ends": args.front_ends,
        "warmup_seconds": args.warmup_seconds,
        "limit_batch_sizes": limit_sizes,
        # LitServe and Ray Serve batch requests under these limits, as alarm-serve batches items.
        "peer_batching": {
            "max_batch_size": config.batching.max_batch_size,
            "max_wait_ms": config.batching.max_wait_ms,
        },
    }

    measured = items[:LIMIT_ITEMS]
    models = load_models(config, args.cache_dir)
    # How each model runs (packed, traced, attention): the load checks' outcome on this machine.
    results["models"]["runtime"] = {model.name: model.describe() for model in models}
    # Forwards at once, as the server runs them: `cpu_workers` on a CPU, `gpu_workers` on a GPU.
    workers = max(device_slots(m.device, config) for m in models if m.device != HOST_DEVICE)
    best, all_sizes = best_limit(models, config, measured, limit_sizes, sorted({1, workers}))
    results["limit"] = {"best": asdict(best), "by_batch_size": [asdict(r) for r in all_sizes]}
    print(
        f"limit: {best.items_per_s:.1f} items/s at batch {best.batch_size}, "
        f"{best.workers} forward(s) at once (padding efficiency "
        f"{best.padding_efficiency:.3f}); per point below: the server's own batch limits "
        f"and {workers} forward(s) at once, measured beside the servers",
        flush=True,
    )

    def limit_of(window: int, sample: list[dict[str, str]] | None) -> LimitResult:
        """In process, `window` items sorted at a time, on `sample` (None: the workload)."""
        on = measured if sample is None else sample
        return measure(models, on, lambda m: batch_limits(config, m), window, workers)

    alarm_serve = [
        sys.executable,  # `python -m service` is the `alarm-serve` script, installed or not
        "-m",
        "service",
        "serve",
        "--config",
        str(config_path),
        "--cache-dir",
        str(args.cache_dir),
        "--log-level",
        "warning",
        "--front-ends",
        str(args.front_ends),
    ]
    commands = [("alarm-serve", alarm_serve)] + [
        (PEERS[name].system, peer_command(PEERS[name], config_path, args.cache_dir))
        for name in args.peers
    ]
    # All servers stay up, paused but for the one under load, so that a load point's
    # figures are measured minutes apart at most (see measure_point).
    processes: list[subprocess.Popen] = []
    servers: dict[str, str] = {}
    leaders: dict[str, int] = {}
    try:
        for system, command in commands:
            port = free_port()
            servers[system] = f"http://127.0.0.1:{port}"
            log_path = args.out / f"{system}.log"
            log_path.unlink(missing_ok=True)
            processes.append(
                start_server([*command, "--port", str(port)], servers[system], log_path)
            )
            leaders[system] = processes[-1].pid
            warm_up = run_load(servers[system], "/v1/rewards", measured, 4, 4, args.warmup_seconds)
            asyncio.run(warm_up)
        results["allocator"] = {
            "limits": loaded_allocator(),
            **{system: loaded_allocator(leader) for system, leader in leaders.items()},
        }
        print(f"malloc: {results['allocator']}", flush=True)
        # What pausing the idle servers saves: each one's CPU use while nobody calls it.
        results["idle_cpu_share"] = {
            system: idle_cpu_share(leader, 5.0) for system, leader in leaders.items()
        }
        print(f"idle CPU-seconds per second: {results['idle_cpu_share']}", flush=True)
        by_point: dict[tuple[int, int], dict[str, Any]] = {}
        for point in grid:
            print(f"C={point[0]} k={point[1]}", flush=True)
            by_point[point] = measure_point(
                servers, leaders, limit_of, measured, point, args.seconds, args.rounds
            )
            # Rewritten after every point: a run cut short keeps the points it finished.
            summarise(
                results,
                by_point,
                list(servers),
                {name: PEERS[name].system for name in args.peers},
                config.batching.max_wait_ms,
            )
            write_atomically(args.out / "results.json", json.dumps(results, indent=2))
    finally:
        for process in processes:
            stop_server(process)
    plot(results, list(servers), args.out / "throughput.png")
    print_table(results, args.peers)
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
