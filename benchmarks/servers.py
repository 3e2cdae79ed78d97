"""The benchmark's server processes: started, paused while another is measured, stopped.

A server is a process group plus its descendants (LitServe's workers, Ray's raylet and
actors). Idle servers are not idle on the CPU (LitServe's processes used about 0.2
CPU-seconds per second on the 2-core VM, Ray's about 0.1), so every server not under
load is stopped (SIGSTOP) while another one, or the in-process limit, is measured.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


# Ray's worker processes take ports 10002-19999 by default; nothing here binds above them
# and below the kernel's ephemeral range on its own.
_FIXED_PORTS_FROM = 20000
_handed_out: set[int] = set()


def _ephemeral_ports_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free port below the kernel's ephemeral range, not handed out before in this process.

    A port the kernel picks for `bind(0)` is one it may pick again for any process that
    binds port 0 or opens a connection before the server binds it, and Ray starts dozens of
    those (a CI run lost its proxy's port that way); ports below the range are only ever
    taken on request.
    """
    candidates = list(
        range(_FIXED_PORTS_FROM, max(_ephemeral_ports_from(), _FIXED_PORTS_FROM + 1000))
    )
    random.shuffle(candidates)
    for port in candidates:
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (state first), or None once it has exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live, non-zombie process (Linux /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and fields[0] != "Z":
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


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time the live processes among `pids` have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def page_faults(pids: set[int]) -> int:
    """Page faults (minor + major) the live processes among `pids` have taken so far: a
    server whose memory goes back to the OS between forwards faults it in again."""
    total = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            total += int(fields[7]) + int(fields[9])  # minflt, majflt
    return total


def idle_cpu_share(leader: int, seconds: float) -> float:
    """CPU-seconds per second a server uses while nobody sends it anything."""
    pids = server_processes(leader)
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds


def _wait_stopped(pids: set[int], timeout_s: float) -> None:
    """Return once every live process of `pids` is stopped: SIGSTOP lands asynchronously,
    and a process still running for a moment would take CPU from the measurement."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = [
            pid
            for pid in pids
            if (fields := _stat_fields(pid)) is not None and fields[0] not in ("T", "Z")
        ]
        if not running:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes not stopped by SIGSTOP: {sorted(running)}")
        time.sleep(0.01)


@contextlib.contextmanager
def paused(leaders: list[int]) -> Iterator[None]:
    """Stop every process of these servers (SIGSTOP) for the block, then let them go on.

    Their sockets stay open, so a paused server keeps its connections and state; it just
    takes no CPU from the one under measurement.
    """
    pids: set[int] = set().union(*(server_processes(leader) for leader in leaders))
    _signal_all(pids, signal.SIGSTOP)
    try:
        _wait_stopped(pids, timeout_s=10)
        yield
    finally:
        _signal_all(pids, signal.SIGCONT)
