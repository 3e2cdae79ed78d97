"""`alarm-serve serve` with `front_ends > 0`: one engine process and N HTTP front-ends.

This process supervises and serves nothing itself. It binds the port once (a port taken
fails here, at once) and hands the listening socket to every front-end, which accept from
it in turn, as uvicorn's and gunicorn's workers do. The children are this same command run
again with a role in the environment, so they read the same flags, variables and files.
They share a private directory for the engine link's socket and for Prometheus'
multiprocess files (every process's counters summed in one scrape). If any child exits,
the others are stopped and the command exits: a server without its engine, or with fewer
front-ends than configured, is not the server that was asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from service.config import ServiceSettings

log = logging.getLogger(__name__)
ROLE_ENV = "ALARM_PROCESS_ROLE"  # engine | front-end: set only in a supervisor's children
LINK_ENV = "ALARM_ENGINE_LINK"  # the engine link's Unix socket
LISTEN_FD_ENV = "ALARM_LISTEN_FD"  # a front-end's inherited listening socket
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
FRONT_ENDS_GROUP = "front_ends"  # the front-ends' CPU in alarm_thread_cpu_seconds_total
ENGINE_ROLE = "engine"
FRONT_END_ROLE = "front-end"
_STOP_GRACE_S = 30.0
_POLL_S = 0.1


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """The HTTP port, bound and listening, inheritable by the front-ends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _this_command() -> list[str]:
    """This command line again, run by this interpreter (the console script's path aside)."""
    return [sys.executable, "-m", "service", *sys.argv[1:]]


class _StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum


def supervise(settings: ServiceSettings, child_command: Sequence[str] | None = None) -> int:
    """Start the engine and the front-ends, each as `child_command` (default: this command
    line again); return when one exits, or on SIGTERM or SIGINT."""
    command = list(child_command or _this_command())
    try:
        listener = bind_listening_socket(settings.host, settings.port)
    except OSError as exc:
        print(
            f"alarm-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    host, port = listener.getsockname()[:2]
    shared = Path(tempfile.mkdtemp(prefix="alarm-serve-"))  # mode 0700: this user only
    metrics_dir = shared / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, LINK_ENV: str(shared / "engine.sock"), METRICS_DIR_ENV: str(metrics_dir)}
    stop = _StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        children["engine"] = subprocess.Popen(command, env={**env, ROLE_ENV: ENGINE_ROLE})
        fd = str(listener.fileno())
        for index in range(settings.front_ends):
            children[f"front-end {index + 1}"] = subprocess.Popen(
                command,
                env={**env, ROLE_ENV: FRONT_END_ROLE, LISTEN_FD_ENV: fd},
                pass_fds=(listener.fileno(),),
            )
        listener.close()  # the front-ends hold it now
        log.info(
            "serving on http://%s:%d: engine pid %d, %d front-ends (pids %s)",
            host,
            port,
            children["engine"].pid,
            settings.front_ends,
            ", ".join(str(p.pid) for name, p in children.items() if name != "engine"),
        )
        return _wait(children, stop)
    finally:
        listener.close()
        _stop_all(children)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(shared, ignore_errors=True)


def _wait(children: dict[str, subprocess.Popen[bytes]], stop: _StopRequest) -> int:
    while stop.signal is None:
        for name, child in children.items():
            code = child.poll()
            if code is not None:
                print(
                    f"alarm-serve: the {name} process exited (status {code}); stopping the rest",
                    file=sys.stderr,
                )
                return code or 1
        time.sleep(_POLL_S)
    return 130 if stop.signal == signal.SIGINT else 0


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """The front-ends first (they finish their requests in flight, which need the engine),
    then the engine; SIGKILL to any child still alive after its grace."""
    front_ends = [child for name, child in children.items() if name != "engine"]
    _stop(front_ends)
    _stop([child for name, child in children.items() if name == "engine"])


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
