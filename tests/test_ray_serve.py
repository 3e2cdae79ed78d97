"""Scale-out on Ray Serve: `alarm-serve ray` with two CPU replicas, scored over real HTTP.

Ray is heavy on a small machine, so there are two Ray instances in this module, one at a
time: the CLI starts each locally. In the first, the test talks to the Ray proxy with
httpx, then SIGTERM must stop Serve and Ray and leave no process of theirs behind; in the
second, the replicas cannot load their models and the CLI must end the same way by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from service.allocator import find_tcmalloc, loaded_allocator
from service.errors import ConfigError
from service.ray_app import ReplicaScale, replica_env_vars
from tests.conftest import asgi_client, tiny_config_dict, wait_ready
from tests.server_process import ALARM_SERVE, free_port

pytestmark = pytest.mark.slow

# No usage report, and no auth token written under the home folder.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ITEMS = [
    {"prompt": PROMPT, "response": "William Shakespeare wrote Hamlet. It is a tragedy."},
    {"prompt": PROMPT, "response": "Marlowe."},
    {"prompt": PROMPT, "response": "Shakespeare, around 1600. He also wrote Macbeth."},
]


def test_replica_scale_becomes_ray_deployment_options():
    fixed = ReplicaScale(replicas=2).deployment_options(cluster_gpus=0)
    assert fixed["num_replicas"] == 2
    assert fixed["ray_actor_options"] == {
        "num_cpus": 1,
        "num_gpus": 0.0,
        "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "1"}},  # one heap (service.memory)
    }
    scaled = ReplicaScale(min_replicas=1, max_replicas=4).deployment_options(cluster_gpus=8)
    assert "num_replicas" not in scaled
    assert scaled["ray_actor_options"]["num_gpus"] == 1.0  # one GPU per replica
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
    }
    given = {"MALLOC_ARENA_MAX": "1", "LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4"}
    options = ReplicaScale().deployment_options(cluster_gpus=0, env_vars=given)
    assert options["ray_actor_options"]["runtime_env"] == {"env_vars": given}
    with pytest.raises(ConfigError, match="needs max_replicas"):
        ReplicaScale(min_replicas=2)
    with pytest.raises(ConfigError, match="max_replicas"):
        ReplicaScale(replicas=5, max_replicas=4)


@contextmanager
def ray_cli(config: Path, cache_dir: Path, log: Path, port: int) -> Iterator[subprocess.Popen]:
    """`alarm-serve ray` in its own process group; whatever is left of the group is killed."""
    files = ["--config", str(config), "--cache-dir", str(cache_dir)]
    # Half a CPU each: two replicas fit even where Ray sees a single CPU.
    scale = ["--replicas", "2", "--cpus-per-replica", "0.5"]
    with log.open("w") as out:
        process = subprocess.Popen(
            [ALARM_SERVE, "ray", *files, "--port", str(port), *scale],
            env={**os.environ, **RAY_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def replica_environments() -> dict[int, dict[str, str]]:
    """pid -> environment of every live alarm-serve replica process (Ray names them so)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ServeReplica:alarm-serve" in (
                (entry / "cmdline").read_bytes()
            ):
                pairs = (entry / "environ").read_bytes().split(b"\0")
                environment = dict(p.decode().partition("=")[::2] for p in pairs if b"=" in p)
                found[int(entry.name)] = environment
        except OSError:
            continue  # exited, or not ours to read
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_for_proxy(process: subprocess.Popen, base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 150
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"alarm-serve ray exited early:\n{log.read_text()}"
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # the proxy is not listening yet
            await asyncio.sleep(0.5)
    raise AssertionError(f"no ready replica in 150 s:\n{log.read_text()}")


@pytest.mark.timeout(300)
async def test_two_ray_replicas_score_like_the_plain_app_and_stop_cleanly(
    tiny_config, tiny_config_file, tmp_path
):
    async with asgi_client(tiny_config, tmp_path / "plain") as client:
        await wait_ready(client)
        expected = (await client.post("/v1/rewards", json={"items": ITEMS})).json()

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "alarm-serve-ray.log"
    with ray_cli(tiny_config_file, tmp_path / "cache", log, port) as process:
        await wait_for_proxy(process, base_url, log)
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            replicas: set[str] = set()
            deadline = time.monotonic() + 60
            while len(replicas) < 2 and time.monotonic() < deadline:
                responses = await asyncio.gather(
                    *(http.post("/v1/rewards", json={"items": ITEMS}) for _ in range(8))
                )
                for response in responses:
                    assert response.status_code == 200, response.text
                    body = response.json()
                    # Same models and parameters: the same definition in every process.
                    assert body["reward_definition"] == expected["reward_definition"]
                    assert [r["reward"] for r in body["results"]] == pytest.approx(
                        [r["reward"] for r in expected["results"]], rel=1e-5, abs=1e-6
                    )
                    assert len(response.headers.get_list("x-request-id")) == 1
                    replicas.add(response.headers["x-alarm-replica"])
            assert len(replicas) == 2, f"answered only by {replicas}"
            # Ray's worker processes had threads long before the engine: one heap for all
            # of them comes from the environment glibc read at their start, and TCMalloc,
            # where installed, from the preload they started with, as `serve` runs.
            environments = replica_environments()
            assert len(environments) == 2
            assert all(env.get("MALLOC_ARENA_MAX") == "1" for env in environments.values())
            malloc = "tcmalloc" if find_tcmalloc() is not None else "system"
            assert [loaded_allocator(pid) for pid in environments] == [malloc, malloc]

            models = await http.get("/v1/models")
            assert models.status_code == 200
            assert [m["name"] for m in models.json()["models"]] == [
                "holistic",
                "factuality",
                "completeness",
                "length",
            ]
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert "alarm_requests_total{" in metrics.text
            assert "alarm_batch_size_items_bucket{" in metrics.text

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        await wait_group_gone(process.pid)  # Serve's replicas and the local Ray instance
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/healthz", timeout=2)


async def wait_group_gone(pgid: int) -> None:
    for _ in range(50):
        if not group_alive(pgid):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("Ray processes outlived alarm-serve ray")


@pytest.mark.timeout(300)
async def test_replicas_that_cannot_load_their_models_end_ray_with_exit_1(tiny_paths, tmp_path):
    """A wrong model path fails inside the replicas, not in the CLI: once Serve gives up
    retrying them, `alarm-serve ray` must say why, exit 1 and take Ray down, not hang."""
    missing = tmp_path / "no-such-model"
    config = tiny_config_dict(tiny_paths)
    config["holistic"]["path"] = str(missing)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "alarm-serve-ray.log"
    with ray_cli(config_file, tmp_path / "cache", log, free_port()) as process:
        exit_status = await asyncio.to_thread(process.wait, 240)
        assert exit_status == 1, log.read_text()
        await wait_group_gone(process.pid)
    text = log.read_text()
    assert "deployment failed" in text
    assert f"model loading failed: ConfigError: model path '{missing}' is not a folder" in text


def test_replicas_start_on_the_malloc_alarm_allocator_chooses(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr("service.allocator.find_tcmalloc", lambda: Path("/lib/libtcmalloc.so.4"))
    monkeypatch.setenv("ALARM_ALLOCATOR", "auto")
    assert replica_env_vars() == {
        "MALLOC_ARENA_MAX": "1",
        "LD_PRELOAD": "/lib/libtcmalloc.so.4",
        "ALARM_ALLOCATOR": "auto",
        "ALARM_ALLOCATOR_PRELOADED": "/lib/libtcmalloc.so.4",  # checked by the replica
    }
    monkeypatch.setenv("ALARM_ALLOCATOR", "system")
    assert replica_env_vars() == {"MALLOC_ARENA_MAX": "1"}
    monkeypatch.setattr("service.allocator.find_tcmalloc", lambda: None)
    monkeypatch.setenv("ALARM_ALLOCATOR", "auto")
    assert replica_env_vars() == {"MALLOC_ARENA_MAX": "1"}


def test_ray_refuses_an_allocator_it_cannot_give_its_replicas(tiny_config_file, tmp_path):
    """Before Ray starts: nothing to tear down, and the same exit status as `serve`."""
    command = [ALARM_SERVE, "ray", "--config", str(tiny_config_file), "--port", str(free_port())]
    result = subprocess.run(
        [*command, "--cache-dir", str(tmp_path)],
        env={**os.environ, **RAY_ENV, "ALARM_ALLOCATOR": "mimalloc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "ALARM_ALLOCATOR='mimalloc'" in result.stderr
