"""The `alarm-serve` command's failures: each a prompt exit with a one-line reason, no traceback.

- a start that fails while the models are still loading (the port taken, or a SIGTERM) exits
  at once: the load thread cannot be interrupted, and nothing waits for it;
- unreadable or undecodable configs, unknown log levels and unwritable `openapi --out` paths
  are reported in one line;
- installed without an extra, `alarm-serve` and `alarm-ppo` name the extra to install.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager
from prometheus_client import CollectorRegistry

from service.api import create_app
from service.config import ServiceSettings, load_reward_config
from tests import tiny_models
from tests.server_process import ALARM_SERVE, free_port, start

# A grammar checker whose import blocks the load thread for far longer than any test runs:
# models load in the background, so the server is up while its load is still "running".
SLOW_CHECKER = "import time\ntime.sleep(600)\n\n\ndef spans(text):\n    return []\n"


@pytest.fixture(scope="module")
def slow_loading_config(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("slow-load")
    (root / "slow_checker_for_cli_test.py").write_text(SLOW_CHECKER)
    config = {
        "holistic": {
            "name": "holistic",
            "kind": "sequence_scalar",
            "path": str(tiny_models.build_llama_scalar_rm(root / "llama-rm")),
            "device": "cpu",
            "max_length": 64,
        },
        "aspects": [
            {"name": "grammar", "kind": "grammar", "checker": "slow_checker_for_cli_test:spans"}
        ],
    }
    path = root / "slow.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, {"PYTHONPATH": str(root), "ALARM_CACHE_DIR": str(root / "cache")}


def _finish(process: subprocess.Popen, timeout_s: float) -> tuple[int, float, str]:
    """(exit status, seconds waited, output); kills a process still running after timeout_s."""
    started = time.monotonic()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -999, time.monotonic() - started, process.stdout.read()
    return code, time.monotonic() - started, process.stdout.read()


def test_a_taken_port_exits_at_once_though_models_are_loading(slow_loading_config):
    config, env = slow_loading_config
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(["--config", str(config), "--port", str(port)], env)
        # Start-up (imports, app) takes a few seconds; the load would take ten minutes.
        code, waited, output = _finish(process, timeout_s=60)
    assert code > 0, f"exit {code} after {waited:.0f} s (waiting for the load?):\n{output}"
    assert "address already in use" in output.lower(), output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("front_ends", [0, 2], ids=["one-process", "front-ends"])
@pytest.mark.parametrize(
    ("stop", "codes"),
    [(signal.SIGTERM, (0, -signal.SIGTERM)), (signal.SIGINT, (130,))],
    ids=["sigterm", "ctrl-c"],
)
def test_a_stop_signal_while_models_load_exits_at_once(
    slow_loading_config, stop, codes, front_ends
):
    config, env = slow_loading_config
    port = free_port()
    env = {**env, "ALARM_FRONT_ENDS": str(front_ends)}
    process = start(["--config", str(config), "--port", str(port)], env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # /healthz answers during the load
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up")
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 503
        process.send_signal(stop)
        code, waited, output = _finish(process, timeout_s=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code in codes, f"exit {code} after {waited:.0f} s:\n{output}"
    assert "Traceback" not in output, output


def test_the_apps_shutdown_does_not_wait_for_a_load_in_progress(tmp_path):
    # The lifespan's side of the two tests above, in process: asyncio.run returns at once
    # (it would join a load run by asyncio.to_thread, on the default executor).
    release = threading.Event()

    def slow(config, cache_dir):
        release.wait(60)
        raise RuntimeError("released")

    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        load_reward_config(None),
        registry=CollectorRegistry(),
        load=slow,
    )

    async def start_and_stop() -> None:
        async with LifespanManager(app):
            await asyncio.sleep(0.2)  # the load is under way

    started = time.monotonic()
    try:
        asyncio.run(start_and_stop())
        waited = time.monotonic() - started
        assert app.state.alarm.loading  # still: nothing waited for it
    finally:
        release.set()
    assert waited < 10
    app.state.alarm.load_thread.join(timeout=10)
    assert not app.state.alarm.loading


def test_a_load_that_calls_sys_exit_is_a_failed_load(tmp_path):
    # A plugged-in module's sys.exit must not reach the event loop as itself (it would stop
    # the server without a word); it is reported as the load's failure.
    def exits(config, cache_dir):
        sys.exit(4)

    failures: list[str] = []
    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        load_reward_config(None),
        registry=CollectorRegistry(),
        load=exits,
        on_fatal=failures.append,
    )

    async def start_and_wait() -> None:
        async with LifespanManager(app):
            await asyncio.wait_for(app.state.alarm.loader, timeout=30)

    asyncio.run(start_and_wait())
    assert failures == ["RuntimeError: SystemExit while loading: 4"]


def test_a_load_before_serving_still_fails_the_start_up(tmp_path):
    def fail(config, cache_dir):
        raise OSError("no such model")

    app = create_app(
        ServiceSettings(cache_dir=tmp_path),
        load_reward_config(None),
        registry=CollectorRegistry(),
        load=fail,
        load_before_serving=True,
    )

    async def start() -> None:
        async with LifespanManager(app):
            pass

    with pytest.raises(RuntimeError, match="model loading failed: OSError: no such model"):
        asyncio.run(start())
    app.state.alarm.load_thread.join(timeout=10)  # it ends right after handing its error over
    assert not app.state.alarm.loading


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALARM_SERVE, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_a_config_that_is_not_utf8_is_a_configuration_error(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("holistic:\n  name: caf\xe9\n".encode("latin-1"))
    result = _cli("serve", "--config", str(config), "--port", str(free_port()))
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and str(config) in result.stderr
    assert "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_openapi_to_an_unwritable_path_is_one_line(tmp_path):
    out = tmp_path / "missing-folder" / "openapi.yaml"
    result = _cli("openapi", "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.startswith(f"alarm-serve: cannot write {out}: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_openapi_help_promises_only_what_it_does():
    result = _cli("--help")
    assert "print or check" not in result.stdout
    assert "openapi" in result.stdout


@pytest.mark.parametrize("level", ["INFO", "Warning", "debug"])
def test_log_levels_are_case_insensitive(level, monkeypatch):
    assert ServiceSettings(log_level=level).log_level == level.lower()
    monkeypatch.setenv("ALARM_LOG_LEVEL", level)
    assert ServiceSettings().log_level == level.lower()


def test_an_unknown_log_level_is_one_line(tmp_path):
    result = _cli("serve", "--log-level", "loud", "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.startswith("alarm-serve: configuration error: log_level: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "pydantic.dev" not in result.stderr


# Installed without extras: block the modules an extra brings, then run the entry point
# exactly as its console script does.
_WITHOUT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = {argv!r}
from {module} import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("blocked", "argv", "extra"),
    [
        (["yaml", "pydantic_settings"], ["alarm-serve", "serve"], "service"),
        (["torch", "uvicorn", "fastapi"], ["alarm-serve", "openapi"], "service"),
        (["ray"], ["alarm-serve", "ray"], "ray"),
        (["torch", "transformers"], ["alarm-ppo", "--help"], "ppo"),
    ],
    ids=["no-extras", "half-installed", "no-ray", "ppo"],
)
def test_missing_extras_name_the_extra(blocked, argv, extra):
    module = "trainer_client.ppo.cli" if argv[0] == "alarm-ppo" else "service.__main__"
    script = _WITHOUT.format(blocked=set(blocked), argv=argv, module=module)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{argv[0]}: ")
    assert f"alarm-serve[{extra}]" in result.stderr


def test_a_missing_module_no_extra_installs_is_not_blamed_on_the_extras():
    # pydantic is a base dependency: its absence is a broken install, not a missing extra.
    script = _WITHOUT.format(
        blocked={"pydantic_core"}, argv=["alarm-serve", "openapi"], module="service.__main__"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "pydantic_core" in result.stderr and "pip install" not in result.stderr
