"""A split server (`--front-ends N`): one engine process behind N HTTP front-end processes.

It must answer as one process does (same rewards, same contract, one set of metrics), and
stop as a whole: a child that dies takes the server down, never leaving a port that
answers without an engine or an engine that nobody can reach.
"""

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from benchmarks.servers import free_port
from service.api import create_app
from service.config import ServiceSettings
from service.supervisor import ENGINE_ROLE, FRONT_END_ROLE, LINK_ENV, ROLE_ENV
from tests.conftest import tiny_config_dict
from tests.server_process import ALARM_SERVE, start, wait_ready

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ANSWERS = [
    "William Shakespeare wrote Hamlet. It is a tragedy.",
    "Hamlet was written by Christopher Marlowe in 1850.",
    "Shakespeare.",
    "It is a play. Many people have seen it. Some liked it, and others did not.",
]
EXIT_WITHIN_S = 20


def children_of(pid: int) -> dict[int, str]:
    """The live children of `pid`, by role (from their environment)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent != pid:
            continue
        prefix = f"{ROLE_ENV}=".encode()
        roles = [v.removeprefix(prefix).decode() for v in environ if v.startswith(prefix)]
        found[int(entry.name)] = roles[0] if roles else ""
    return found


def shared_directory(pid: int) -> Path:
    """The private directory a child's engine link lives in."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (link,) = [v.partition(b"=")[2] for v in environ if v.startswith(f"{LINK_ENV}=".encode())]
    return Path(link.decode()).parent


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def config_file(tiny_paths, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("front-ends")
    path = folder / "config.yaml"
    config = tiny_config_dict(tiny_paths, batching={"max_batch_size": 8, "max_wait_ms": 2})
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def server(config: Path, front_ends: int) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    process = start(
        ["--config", str(config), "--port", str(port), "--cache-dir", str(config.parent)],
        {"ALARM_FRONT_ENDS": str(front_ends)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, timeout_s=120)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric(url: str, prefix: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


async def score_each_alone(url: str, answers: list[str]) -> list[dict]:
    """Every answer in its own request and connection (so that they spread over the
    front-ends), all at once."""

    async def one(answer: str) -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            reply = await client.post(
                "/v1/rewards", json={"items": [{"prompt": PROMPT, "response": answer}]}
            )
            assert reply.status_code == 200, reply.text
            return reply.json()

    return list(await asyncio.gather(*(one(answer) for answer in answers)))


def test_a_split_server_answers_as_one_process_does(config_file):
    answers = ANSWERS * 4
    with server(config_file, front_ends=0) as (url, _):
        expected = asyncio.run(score_each_alone(url, answers))
        expected_models = httpx.get(f"{url}/v1/models").json()
    with server(config_file, front_ends=2) as (url, process):
        roles = sorted(children_of(process.pid).values())
        assert roles == [ENGINE_ROLE, FRONT_END_ROLE, FRONT_END_ROLE]
        requests_before = metric(url, 'alarm_requests_total{route="/v1/rewards",status="200"}')
        scored_before = metric(url, 'alarm_items_scored_total{model="holistic"}')
        got = asyncio.run(score_each_alone(url, answers))
        assert httpx.get(f"{url}/v1/models").json() == expected_models
        # Every front-end's requests and the engine's batches, in one scrape from any of them.
        for _ in range(4):
            requests = metric(url, 'alarm_requests_total{route="/v1/rewards",status="200"}')
            assert requests - requests_before == len(answers)
        assert metric(url, 'alarm_items_scored_total{model="holistic"}') - scored_before == len(
            answers
        )
        assert metric(url, 'alarm_thread_cpu_seconds_total{threads="front_ends"}') > 0
        assert metric(url, 'alarm_thread_cpu_seconds_total{threads="event_loop"}') > 0
        assert metric(url, "alarm_in_flight_items") == 0
    for one, split in zip(expected, got, strict=True):
        assert split["reward_definition"] == one["reward_definition"]
        (a,), (b,) = one["results"], split["results"]
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-5)
        assert b["holistic"] == pytest.approx(a["holistic"], abs=1e-5)
        assert [d["end"] for d in b["dense"]] == [d["end"] for d in a["dense"]]


@pytest.mark.parametrize("victim", [FRONT_END_ROLE, ENGINE_ROLE])
def test_a_child_that_dies_stops_the_whole_server(config_file, victim):
    with server(config_file, front_ends=2) as (url, process):
        children = children_of(process.pid)
        shared = shared_directory(next(iter(children)))
        assert shared.is_dir()
        pid = next(p for p, role in children.items() if role == victim)
        os.kill(pid, signal.SIGKILL)
        code = process.wait(timeout=EXIT_WITHIN_S)
        output = process.stdout.read()
        assert code == 128 + signal.SIGKILL  # as a shell reports a child killed by a signal
        assert f"the {victim}" in output and "process exited" in output
        deadline = time.monotonic() + EXIT_WITHIN_S
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in children)
        assert not shared.exists()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_children_stop_when_their_supervisor_is_killed(config_file):
    """SIGKILL leaves the supervisor no clean-up: its children must not serve on alone."""
    with server(config_file, front_ends=2) as (url, process):
        children = children_of(process.pid)
        shared = shared_directory(next(iter(children)))
        process.kill()
        process.wait()
        deadline = time.monotonic() + EXIT_WITHIN_S
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in children)
        assert not shared.exists()  # the engine, last out, removed it
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)


def test_a_bad_config_stops_the_supervisor_before_any_child_starts(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("holistic:\n  name: h\n  kind: sequence_scalar\n  path: x\n  sigma: -1\n")
    result = subprocess.run(
        [ALARM_SERVE, "serve", "--config", str(config), "--port", str(free_port())],
        env={**os.environ, "ALARM_FRONT_ENDS": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("configuration error") == 1, result.stderr
    assert "holistic.sequence_scalar.sigma" in result.stderr


def test_sigterm_stops_every_process_and_removes_the_shared_directory(config_file):
    with server(config_file, front_ends=1) as (_, process):
        children = children_of(process.pid)
        shared = shared_directory(next(iter(children)))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_WITHIN_S) == 0
        assert not any(alive(p) for p in children)
        assert not shared.exists()


@pytest.mark.parametrize("to_whom", ["supervisor", "process group"])
def test_sigterm_lets_the_requests_in_flight_finish(tiny_paths, tmp_path, to_whom):
    """The front-ends drain their requests, which need the engine, before the engine stops,
    whether the signal reaches the supervisor alone (docker, Kubernetes) or every process
    (a shell's Ctrl-C, `kill -- -<group>`). Items wait 300 ms for their batch to fill, so
    the signal finds them queued in the engine."""
    config = tiny_config_dict(tiny_paths, batching={"max_wait_ms": 300}, cache={"max_items": 0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [ALARM_SERVE, "serve", "--config", str(path), "--port", str(port)],
        env={**os.environ, "ALARM_FRONT_ENDS": "2", "ALARM_CACHE_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_ready(process, url, timeout_s=120)

        async def load() -> list[httpx.Response]:
            async def one(index: int) -> httpx.Response:
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    item = {"prompt": PROMPT, "response": f"{ANSWERS[0]} {index}"}
                    return await client.post("/v1/rewards", json={"items": [item] * 3})

            sends = [asyncio.create_task(one(i)) for i in range(8)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if await asyncio.to_thread(metric, url, "alarm_in_flight_items") > 0:
                    break
            if to_whom == "supervisor":
                process.send_signal(signal.SIGTERM)
            else:
                os.killpg(process.pid, signal.SIGTERM)
            return await asyncio.gather(*sends)

        replies = asyncio.run(load())
        assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]
        assert process.wait(timeout=EXIT_WITHIN_S) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_taken_port_fails_at_once_without_starting_children(config_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(
            ["--config", str(config_file), "--port", str(port)], {"ALARM_FRONT_ENDS": "2"}
        )
        assert process.wait(timeout=EXIT_WITHIN_S) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in process.stdout.read()


def test_an_engine_that_cannot_load_its_models_stops_the_server(tiny_paths, tmp_path):
    config = tiny_config_dict(tiny_paths)
    config["holistic"]["path"] = str(tmp_path / "no-such-model")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    process = start(
        ["--config", str(path), "--port", str(free_port()), "--cache-dir", str(tmp_path)],
        {"ALARM_FRONT_ENDS": "1"},
    )
    code = process.wait(timeout=120)
    output = process.stdout.read()
    assert code != 0
    assert "model loading failed" in output and "no-such-model" in output
    assert "the engine process exited" in output


def test_a_front_end_is_live_but_not_ready_until_the_engine_listens(tiny_config, tmp_path):
    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        tiny_config,
        engine_link=tmp_path / "engine.sock",  # nothing listens there
        metrics_dir=tmp_path,
    )
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["type"] == "not_ready"
        assert "retry-after" in ready.headers
        scored = client.post(
            "/v1/rewards", json={"items": [{"prompt": PROMPT, "response": ANSWERS[0]}]}
        )
        assert scored.status_code == 503
        assert client.get("/metrics").status_code == 200


def test_a_front_end_whose_engine_hangs_up_in_the_handshake_stops(tiny_config, tmp_path):
    """Not a front-end that waits forever: it reports the failure (the supervisor then
    stops the server) and answers 503 meanwhile."""
    link = tmp_path / "engine.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(link))
    listener.listen()

    def hang_up() -> None:
        connection, _ = listener.accept()
        connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    fatal: list[str] = []
    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        tiny_config,
        on_fatal=fatal.append,
        engine_link=link,
        metrics_dir=tmp_path,
    )
    try:
        with TestClient(app) as client:
            deadline = time.monotonic() + EXIT_WITHIN_S
            while not fatal and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fatal and "cannot connect to the engine process" in fatal[0]
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert "cannot connect to the engine process" in ready.json()["error"]["message"]
    finally:
        listener.close()
