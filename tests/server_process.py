"""Start `alarm-serve serve` as a real process on a free port, and wait for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from benchmarks.servers import free_port

ALARM_SERVE = str(Path(sys.executable).with_name("alarm-serve"))


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [ALARM_SERVE, "serve", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(process: subprocess.Popen, base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server not ready in {timeout_s} s:\n{process.stdout.read()}")


@contextmanager
def running_server(
    config: Path, cache_dir: Path, timeout_s: float = 120, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield the base URL of a ready server; SIGTERM it afterwards."""
    port = free_port()
    process = start(
        ["--config", str(config), "--port", str(port), "--cache-dir", str(cache_dir)], env
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base_url, timeout_s)
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
