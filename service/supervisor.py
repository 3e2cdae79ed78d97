"""`alarm-serve serve` with `front_ends > 0`: one engine process and N HTTP front-ends.

This process supervises and serves nothing itself. It checks the configuration, binds the
port once (a port taken fails here, at once) and hands the listening socket to every
front-end, which accept from it in turn, as uvicorn's and gunicorn's workers do. The
children are this command line run again with a role in the environment, so they read the
same flags, variables and files. They share a private directory for the engine link's
socket and for Prometheus' multiprocess files (every process's counters summed in one
scrape). If any child exits, the others are stopped and the command exits: a server
without its engine, or with fewer front-ends than configured, is not the server that was
asked for. A child whose supervisor dies is sent SIGTERM (`stop_with_supervisor`).
"""

from __future__ import annotations

import contextlib
import ctypes
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

from service.auth import Authenticator
from service.config import ServiceSettings, load_reward_config
from service.errors import ConfigError

log = logging.getLogger(__name__)
ROLE_ENV = "ALARM_PROCESS_ROLE"  # engine | front-end: set only in a supervisor's children
LINK_ENV = "ALARM_ENGINE_LINK"  # the engine link's Unix socket
LISTEN_FD_ENV = "ALARM_LISTEN_FD"  # a front-end's inherited listening sockets, comma-separated
SUPERVISOR_ENV = "ALARM_SUPERVISOR_PID"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
FRONT_ENDS_GROUP = "front_ends"  # the front-ends' CPU in alarm_thread_cpu_seconds_total
ENGINE_ROLE = "engine"
FRONT_END_ROLE = "front-end"
STOP_GRACE_S = 30.0  # how long each side may take to stop: front-ends first, then the engine
_POLL_S = 0.1
_MAX_UNIX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one a NUL
_PR_SET_PDEATHSIG = 1


def bind_listening_sockets(host: str, port: int) -> list[socket.socket]:
    """The HTTP port on every address `host` resolves to, listening and inheritable by the
    front-ends, as asyncio binds for uvicorn in one process: `localhost` may be 127.0.0.1
    and ::1, `""` means every interface, and an address family this host cannot open a
    socket in (IPv6 turned off) is skipped. An address that cannot be bound fails it all."""
    addresses = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):  # once each
            try:
                sock = socket.socket(family, kind, protocol)
            except OSError:
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio's servers: IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"{address[0]}: {exc.strerror}") from exc
            sock.listen(2048)
            sock.set_inheritable(True)
        if not sockets:
            raise OSError(f"no socket can be opened for {host!r}")
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def inherited_listening_sockets() -> list[socket.socket]:
    """In a front-end: the listening sockets its supervisor passed on."""
    return [socket.socket(fileno=int(fd)) for fd in os.environ[LISTEN_FD_ENV].split(",")]


def stop_with_supervisor() -> None:
    """In a child: have the kernel send SIGTERM when the supervisor dies (Linux), and stop
    now if it already has. Without it, a supervisor killed outright (the OOM killer,
    `kill -9`) would leave front-ends answering and an engine holding the devices."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0"))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor and os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def _this_command() -> list[str]:
    """This command line again, run by this interpreter (the console script's path aside);
    `-P`: the service as installed, never a `service` folder in the working directory."""
    return [sys.executable, "-P", "-m", "service", *sys.argv[1:]]


def _check_config(settings: ServiceSettings) -> None:
    """What every child will read, read once here: a bad file stops the command before
    any child starts (exit 2, one message), as it does in one process."""
    load_reward_config(settings.config)
    Authenticator.from_settings(settings)


def _shared_directory() -> Path:
    try:
        shared = Path(tempfile.mkdtemp(prefix="alarm-serve-"))  # mode 0700: this user only
        (shared / "metrics").mkdir()
    except OSError as exc:
        raise ConfigError(f"cannot make a private directory for the processes: {exc}") from exc
    link = shared / "engine.sock"
    if len(os.fsencode(link)) > _MAX_UNIX_SOCKET_PATH:
        shutil.rmtree(shared, ignore_errors=True)
        raise ConfigError(f"{link}: too long for a Unix socket; set a shorter TMPDIR")
    return shared


class _StopRequest:
    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signum


def supervise(settings: ServiceSettings, child_command: Sequence[str] | None = None) -> int:
    """Start the engine and the front-ends, each as `child_command` (default: this command
    line again); return when one exits, or on SIGTERM or SIGINT."""
    command = list(child_command or _this_command())
    _check_config(settings)
    try:
        listeners = bind_listening_sockets(settings.host, settings.port)
    except OSError as exc:
        print(
            f"alarm-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    stop = _StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    children: dict[str, subprocess.Popen[bytes]] = {}
    shared: Path | None = None
    try:
        shared = _shared_directory()
        env = {
            **os.environ,
            LINK_ENV: str(shared / "engine.sock"),
            METRICS_DIR_ENV: str(shared / "metrics"),
            SUPERVISOR_ENV: str(os.getpid()),
        }
        children["engine"] = subprocess.Popen(command, env={**env, ROLE_ENV: ENGINE_ROLE})
        fds = tuple(listener.fileno() for listener in listeners)
        for index in range(settings.front_ends):
            children[f"front-end {index + 1}"] = subprocess.Popen(
                command,
                env={**env, ROLE_ENV: FRONT_END_ROLE, LISTEN_FD_ENV: ",".join(map(str, fds))},
                pass_fds=fds,
            )
        addresses = [listener.getsockname()[:2] for listener in listeners]
        for listener in listeners:
            listener.close()  # the front-ends hold them now
        log.info(
            "serving on %s: engine pid %d, %d front-ends (pids %s)",
            ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in addresses),
            children["engine"].pid,
            settings.front_ends,
            ", ".join(str(p.pid) for name, p in children.items() if name != "engine"),
        )
        return _wait(children, stop)
    finally:
        for listener in listeners:  # closed already once the front-ends started
            listener.close()
        _stop_all(children)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if shared is not None:
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
                return 128 - code if code < 0 else code or 1  # a signal's number as a shell's
        time.sleep(_POLL_S)
    return 130 if stop.signal == signal.SIGINT else 0


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """The front-ends first (they finish their requests in flight, which need the engine),
    then the engine; SIGKILL to any child still alive after its grace."""
    _stop([child for name, child in children.items() if name != "engine"])
    _stop([child for name, child in children.items() if name == "engine"])


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
