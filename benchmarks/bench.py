"""One-command throughput benchmark: in-process limit vs alarm-serve vs its peers.

    python -m benchmarks.bench --out benchmarks/out     (2 CPUs: 6 min with --peers naive,
                                                        roughly twice that with all peers)

Same models (holistic + 2 aspects), same inputs, same machine, one run. The peers
(`--peers`, all by default) are the naive one-forward-per-request FastAPI server, LitServe
with its batching and Ray Serve with `@serve.batch`, all on the same scoring code. Writes
results.json and throughput.png, and prints the ratios alarm-serve / limit and
alarm-serve / each peer for every load point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.limit import best_limit, in_flight_limits
from benchmarks.load import LoadResult, run_load
from benchmarks.models import write_config
from benchmarks.workload import load_items
from service.config import RewardConfig, load_reward_config

GRID = [(1, 1), (8, 1), (64, 1), (256, 1), (1, 16), (8, 16), (64, 16)]
FULL_GRID = [*GRID, (256, 16)]
LIMIT_ITEMS = 256  # workload items the in-process limits are measured on


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


@dataclass(frozen=True)
class Peer:
    system: str  # its name in results.json and on the chart
    module: str  # run as `python -m module --config --cache-dir --port`


PEERS = {
    "naive": Peer("naive-fastapi", "benchmarks.naive_server"),
    "litserve": Peer("litserve", "benchmarks.litserve_peer"),
    "ray": Peer("ray-serve", "benchmarks.ray_serve_peer"),
}
REPO_ROOT = Path(__file__).resolve().parents[1]


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


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live, non-zombie process (Linux /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z":
            stats[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return stats


def server_processes(leader: int) -> set[int]:
    """The leader's process group and all its descendants, live, the leader included.

    Both, because LitServe's workers stay in the group but may outlive their parent, and
    Ray's actors are the raylet's children but each leads a process group of its own.
    """
    stats = _proc_stats()
    found = {pid for pid, (_, group) in stats.items() if group == leader}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier} - found
        found |= frontier
    return found


def _signal_all(pids: set[int], signum: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def still_running(pids: set[int]) -> set[int]:
    return pids & set(_proc_stats())


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := still_running(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def start_server(
    command: list[str],
    url: str,
    log_path: Path,
    ready_timeout_s: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `command` as the leader of a new process group; return once /readyz says 200.

    `env` adds variables to the server's environment only, never to this process's."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_server(process)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{command[:3]} exited ({process.returncode}): {tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"{command[:3]} not ready in {ready_timeout_s} s, see {log_path}")


def stop_server(process: subprocess.Popen, grace_s: float = 60) -> set[int]:
    """Stop a server and every process it started; return their pids; raise if one survives.

    SIGTERM goes to the leader alone first, so that it shuts its own children down (Ray
    needs its raylet alive for that); whatever outlives it is terminated, then killed.
    """
    started = server_processes(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    leftover = (started | server_processes(process.pid)) - {process.pid}
    _signal_all(leftover, signal.SIGTERM)
    leftover = _wait_gone(leftover, 10)
    _signal_all(leftover, signal.SIGKILL)
    if leftover := _wait_gone(leftover, 10):
        raise RuntimeError(f"server processes left running: {sorted(leftover)}")
    return started


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


def plot(results: dict[str, Any], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["concurrency"], r["items_per_request"]) for r in results["alarm-serve"]]
    labels = [f"C={c}\nk={k}" for c, k in points]
    xs = range(len(points))
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        offset = (index - (len(systems) - 1) / 2) * width
        lefts = [x + offset for x in xs]
        tput.bar(lefts, [r["items_per_s"] for r in results[system]], width, label=system)
        lat.bar(lefts, [r["p99_ms"] for r in results[system]], width, label=system)
    tput.axhline(
        results["limit"]["mean_items_per_s"],
        color="black",
        linestyle="--",
        label="in-process limit (mean of before and after)",
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


def _low_load_latency(
    results: dict[str, Any],
    config: RewardConfig,
    cache_dir: Path,
    items: list[dict[str, str]],
) -> dict[str, float] | None:
    """One client, one item: the mean latency (closed loop: 1 / throughput) against the
    mean single-item forward of every model in process over the very items that run sent
    (the load generator sends the workload in order), plus the batching wait."""
    one = [
        r for r in results["alarm-serve"] if (r["concurrency"], r["items_per_request"]) == (1, 1)
    ]
    if not one:
        return None
    sent = items[: max(1, one[0]["requests"])]
    single = in_flight_limits(config, cache_dir, sent, [1])[1]
    forward_ms = 1000 / single.items_per_s
    mean_ms = 1000 / one[0]["items_per_s"]
    max_wait_ms = config.batching.max_wait_ms
    return {
        "items": len(sent),
        "single_item_forward_ms": forward_ms,
        "max_wait_ms": max_wait_ms,
        "alarm_mean_ms": mean_ms,
        "alarm_overhead_ms": mean_ms - forward_ms - max_wait_ms,
    }


def _in_flight(row: dict[str, Any]) -> int:
    """Items a load point keeps in flight (C x k), as far as the limit's workload goes."""
    return min(row["concurrency"] * row["items_per_request"], LIMIT_ITEMS)


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")  # a peer that served nothing: no ratio


def _peer_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; choose from {sorted(PEERS)}")
    return names


def _load_points(text: str) -> list[tuple[int, int]]:
    """`1x1,8x16`: C concurrent clients x k items per request."""
    try:
        return [(int(c), int(k)) for c, k in (p.split("x") for p in text.split(","))]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected CxK[,CxK...], got {text!r}") from exc


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "alarm-serve")
    parser.add_argument("--seconds", type=float, default=8.0, help="load per point")
    parser.add_argument("--full", action="store_true", help="add C=256, k=16 (slow on CPU)")
    parser.add_argument(
        "--points", type=_load_points, help="load points instead of the grid, e.g. 1x1,8x16"
    )
    parser.add_argument(
        "--peers",
        type=_peer_names,
        default=list(PEERS),
        help=f"comma-separated peers to compare against (default: {','.join(PEERS)})",
    )
    parser.add_argument(
        "--min-padding-efficiency", type=float, default=0.0, help="batching knob under test"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.yaml"
    write_config(args.cache_dir, config_path, min_padding_efficiency=args.min_padding_efficiency)
    config = load_reward_config(config_path)
    items = load_items(1024)
    grid = args.points or (FULL_GRID if args.full else GRID)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
        "grid": grid,
        # LitServe and Ray Serve batch requests under these limits, as alarm-serve batches items.
        "peer_batching": {
            "max_batch_size": config.batching.max_batch_size,
            "max_wait_ms": config.batching.max_wait_ms,
        },
    }

    measured = items[:LIMIT_ITEMS]
    best, all_sizes = best_limit(config, args.cache_dir, measured, [1, 8, 32, 64])
    results["limit"] = {"best": asdict(best), "by_batch_size": [asdict(r) for r in all_sizes]}
    print(
        f"limit: {best.items_per_s:.1f} items/s at batch {best.batch_size} "
        f"(padding efficiency {best.padding_efficiency:.3f})",
        flush=True,
    )
    windows = sorted({min(c * k, LIMIT_ITEMS) for c, k in grid})
    windows_before = in_flight_limits(config, args.cache_dir, measured, windows)
    print(
        "in-flight limits: "
        + ", ".join(f"{w} items {r.items_per_s:.1f}/s" for w, r in windows_before.items()),
        flush=True,
    )

    alarm_serve = [
        str(Path(sys.executable).with_name("alarm-serve")),
        "serve",
        "--config",
        str(config_path),
        "--cache-dir",
        str(args.cache_dir),
        "--log-level",
        "warning",
    ]
    servers = [("alarm-serve", alarm_serve)] + [
        (PEERS[name].system, peer_command(PEERS[name], config_path, args.cache_dir))
        for name in args.peers
    ]
    for system, command in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = args.out / f"{system}.log"
        log_path.unlink(missing_ok=True)
        process = start_server([*command, "--port", str(port)], url, log_path)
        try:
            results[system] = _sweep(system, url, items, grid, args.seconds)
        finally:
            stop_server(process)

    # This VM's speed drifts within a run: measure the limit again after the servers, at
    # the best batch size, and compare every server with the mean of the two.
    after, _ = best_limit(config, args.cache_dir, measured, [best.batch_size])
    results["limit"]["after"] = asdict(after)
    limit = (best.items_per_s + after.items_per_s) / 2
    results["limit"]["mean_items_per_s"] = limit
    print(
        f"limit after the servers: {after.items_per_s:.1f} items/s "
        f"(before {best.items_per_s:.1f}; ratios use the mean {limit:.1f})",
        flush=True,
    )
    windows_after = in_flight_limits(config, args.cache_dir, measured, windows)
    in_flight = {
        w: (windows_before[w].items_per_s + windows_after[w].items_per_s) / 2 for w in windows
    }
    results["limit"]["in_flight"] = [
        {
            "window": w,
            "before": asdict(windows_before[w]),
            "after": asdict(windows_after[w]),
            "mean_items_per_s": in_flight[w],
        }
        for w in windows
    ]
    results["ratios"] = [
        {
            "concurrency": ours["concurrency"],
            "items_per_request": ours["items_per_request"],
            "alarm_over_limit": _ratio(ours["items_per_s"], limit),
            "in_flight_limit": in_flight[_in_flight(ours)],
            "alarm_over_in_flight_limit": _ratio(ours["items_per_s"], in_flight[_in_flight(ours)]),
            **{
                f"alarm_over_{name}": _ratio(
                    ours["items_per_s"], results[PEERS[name].system][index]["items_per_s"]
                )
                for name in args.peers
            },
            "padding_efficiency": ours["padding_efficiency"],
        }
        for index, ours in enumerate(results["alarm-serve"])
    ]
    low_load = _low_load_latency(results, config, args.cache_dir, items)
    if low_load is not None:
        results["low_load"] = low_load
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, [system for system, _ in servers], args.out / "throughput.png")
    print(
        "\nC     k    alarm/limit  alarm/in-flight"
        + "".join(f"  alarm/{n:9s}" for n in args.peers)
        + "  pad-eff"
    )
    for r in results["ratios"]:
        print(
            f"{r['concurrency']:<5d} {r['items_per_request']:<4d} {r['alarm_over_limit']:11.2f}"
            f"  {r['alarm_over_in_flight_limit']:15.2f}"
            + "".join(f"  {r[f'alarm_over_{n}']:15.2f}" for n in args.peers)
            + f"  {r['padding_efficiency']:7.3f}"
        )
    if low_load is not None:
        print(
            f"\nC=1 k=1: mean latency {low_load['alarm_mean_ms']:.1f} ms = single-item "
            f"forward {low_load['single_item_forward_ms']:.1f} ms (the same "
            f"{low_load['items']:g} items, in process) + max wait "
            f"{low_load['max_wait_ms']:g} ms + {low_load['alarm_overhead_ms']:.1f} ms"
        )
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
