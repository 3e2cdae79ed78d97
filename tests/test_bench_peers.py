"""The benchmark's batching peers score exactly as the naive peer does, and stop cleanly.

LitServe and Ray Serve run as real processes on the tiny offline models, with a small
batch cap and a long batch wait so that concurrent requests are merged and cut across
request borders; the naive peer's app runs in process.
"""

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from benchmarks.bench import PEERS, peer_command
from benchmarks.load import HttpConnection
from benchmarks.models import PeerItem, PeerScorer
from benchmarks.naive_server import create_app as create_naive_app
from benchmarks.servers import (
    cpu_seconds,
    free_port,
    paused,
    server_processes,
    start_server,
    still_running,
    stop_server,
)
from tests.conftest import tiny_config_dict

# Three requests of 3 + 2 + 1 items: when they form one batch, forwards capped at 4 items
# split the second request across two forwards, which the reassembly must get right.
REQUESTS = [
    [
        {"prompt": "What is the capital of France?", "response": "Paris. It is on the Seine."},
        {"prompt": "Name a prime.", "response": "Seven is prime."},
        {"prompt": "Why is the sky blue?", "response": "Rayleigh scattering. Short waves."},
    ],
    [
        {"prompt": "Count to three.", "response": "One, two, three."},
        {"prompt": "What is water?", "response": "H2O. A liquid at room temperature."},
    ],
    [{"prompt": "Say hi.", "response": "Hi."}],
]


@pytest.fixture(scope="module")
def peer_config(tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    batching = {"max_batch_tokens": 2048, "max_batch_size": 4, "max_wait_ms": 200}
    path = tmp_path_factory.mktemp("peers") / "peers.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths, batching=batching)))
    return path


def _score_concurrently(url: str) -> list[list[float]]:
    """Through the load generator's own HTTP client, so that it is checked on each peer."""

    async def send(items: list[dict[str, str]]) -> tuple[int, bytes]:
        connection = HttpConnection(url)
        try:
            return await asyncio.wait_for(connection.post_json("/v1/rewards", {"items": items}), 60)
        finally:
            await connection.close()

    async def send_all() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(send(items) for items in REQUESTS))

    replies = asyncio.run(send_all())
    assert [status for status, _ in replies] == [200] * len(REQUESTS), replies
    return [json.loads(body)["rewards"] for _, body in replies]


def _start_peer(name: str, config: Path, work_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*peer_command(PEERS[name], config, work_dir / "cache"), "--port", str(port)]
    return start_server(command, url, work_dir / f"{name}.log", ready_timeout_s=120), url


def _process_states(pids: set[int]) -> set[str]:
    states = set()
    for pid in pids:
        try:
            states.add(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue  # exited
    return states


def _assert_pausing_stops_and_resumes(leader: int, url: str) -> None:
    """What the benchmark relies on: a paused server takes no CPU and answers nothing,
    and after the pause it answers again on the same connection."""

    async def ask(connection: HttpConnection) -> int:
        status, _ = await connection.post_json("/v1/rewards", {"items": REQUESTS[2]})
        return status

    async def paused_then_resumed() -> tuple[bool, set[str], float, int]:
        connection = HttpConnection(url)
        try:
            assert await asyncio.wait_for(ask(connection), 60) == 200  # connected, warm
            pids = server_processes(leader)
            with paused([leader]):
                states = _process_states(pids)
                spent = cpu_seconds(pids)
                pending = asyncio.ensure_future(ask(connection))
                done, _ = await asyncio.wait([pending], timeout=1.5)
                spent = cpu_seconds(pids) - spent
            return bool(done), states, spent, await asyncio.wait_for(pending, 60)
        finally:
            await connection.close()

    answered_while_paused, states, spent, status = asyncio.run(paused_then_resumed())
    assert not answered_while_paused
    assert states == {"T"}  # every process of the server stopped
    assert spent == 0
    assert status == 200


@pytest.fixture(scope="module")
def naive_rewards(peer_config: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[float]]:
    """The naive peer's app, in process: one process start fewer, the same route code."""
    app = create_naive_app(peer_config, tmp_path_factory.mktemp("naive-cache"))
    with TestClient(app) as client:
        replies = [client.post("/v1/rewards", json={"items": items}) for items in REQUESTS]
    assert [r.status_code for r in replies] == [200] * len(REQUESTS)
    return [r.json()["rewards"] for r in replies]


def test_rewards_per_request_match_scoring_each_request_alone(
    peer_config: Path, tmp_path: Path
) -> None:
    scorer = PeerScorer.load(peer_config, tmp_path)
    requests = [[PeerItem(**item) for item in items] for items in REQUESTS]
    expected = [scorer.rewards(items) for items in requests]
    got = scorer.rewards_per_request(requests, max_forward_items=4)
    assert [len(r) for r in got] == [len(r) for r in REQUESTS]
    for rewards, want in zip(got, expected, strict=True):
        assert rewards == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", ["litserve", "ray"])
def test_batching_peer_returns_the_naive_peers_rewards_and_leaves_no_process(
    name: str, peer_config: Path, naive_rewards: list[list[float]], tmp_path: Path
) -> None:
    process, url = _start_peer(name, peer_config, tmp_path)
    try:
        _assert_pausing_stops_and_resumes(process.pid, url)
        rewards = _score_concurrently(url)
    finally:
        stopped = stop_server(process)
    # LitServe's API server and inference worker; Ray's raylet, GCS and actors (the actors
    # lead process groups of their own, so a group check alone would miss them).
    assert len(stopped) > 1
    assert not still_running(stopped)
    for got, want in zip(rewards, naive_rewards, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
