"""`alarm-serve serve` runs on TCMalloc where the machine has it (ALARM_ALLOCATOR=auto),
on the C library's malloc when asked (system), and refuses a choice it cannot honour."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

import service.allocator as allocator
from tests.conftest import tiny_config_dict
from tests.server_process import ALARM_SERVE, free_port, start, wait_ready

TCMALLOC = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(
    TCMALLOC is None, reason="no TCMalloc library here (apt-get install libtcmalloc-minimal4)"
)
ITEM = {"prompt": "What is the capital of France?", "response": "Paris is the capital."}


@pytest.fixture(scope="module")
def config(tiny_paths, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("allocator") / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_paths)))
    return path


def _malloc_of_server(config: Path, cache_dir: Path, choice: str) -> str:
    """The malloc of a real `alarm-serve serve` process (its /proc maps; running itself again
    keeps its pid), once it has scored a request."""
    port = free_port()
    args = ["--config", str(config), "--port", str(port), "--cache-dir", str(cache_dir)]
    process = start(args, {"ALARM_ALLOCATOR": choice})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base_url, timeout_s=120)
        reply = httpx.post(f"{base_url}/v1/rewards", json={"items": [ITEM]}, timeout=30)
        assert reply.status_code == 200, reply.text
        return allocator.loaded_allocator(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@needs_tcmalloc
def test_serve_runs_on_tcmalloc_by_default_where_it_is_installed(config, tmp_path):
    assert _malloc_of_server(config, tmp_path, "auto") == "tcmalloc"


def test_serve_keeps_the_c_librarys_malloc_when_asked(config, tmp_path):
    assert _malloc_of_server(config, tmp_path, "system") == "system"


def test_an_unknown_allocator_is_a_configuration_error(config, tmp_path):
    result = subprocess.run(
        [ALARM_SERVE, "serve", "--config", str(config), "--cache-dir", str(tmp_path)],
        env={**os.environ, "ALARM_ALLOCATOR": "mimalloc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ALARM_ALLOCATOR='mimalloc'" in result.stderr


def test_tcmalloc_asked_for_but_not_installed_is_refused(monkeypatch):
    monkeypatch.setenv("ALARM_ALLOCATOR", "tcmalloc")
    monkeypatch.setattr(allocator, "loaded_allocator", lambda pid="self": "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("ran itself again"))
    with pytest.raises(allocator.AllocatorError, match="libtcmalloc-minimal4"):
        allocator.run_again_with_tcmalloc()
    monkeypatch.setenv("ALARM_ALLOCATOR", "auto")  # auto: the C library's malloc, silently
    allocator.run_again_with_tcmalloc()


def test_a_preload_that_did_not_take_is_not_tried_again(monkeypatch, caplog):
    """Run again with the library preloaded and still on the C library's malloc (the loader
    refused it): no third run; `auto` warns and serves, `tcmalloc` refuses."""
    monkeypatch.setattr(allocator, "loaded_allocator", lambda pid="self": "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: Path("/lib/libtcmalloc.so.4"))
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("ran itself a third time"))
    monkeypatch.setenv("ALARM_ALLOCATOR", "auto")
    monkeypatch.setenv("ALARM_ALLOCATOR_PRELOADED", "/lib/libtcmalloc.so.4")
    with caplog.at_level(logging.WARNING, logger="service.allocator"):
        allocator.run_again_with_tcmalloc()
    assert "did not take" in caplog.text
    assert "ALARM_ALLOCATOR_PRELOADED" not in os.environ  # children may try for themselves
    monkeypatch.setenv("ALARM_ALLOCATOR", "tcmalloc")
    monkeypatch.setenv("ALARM_ALLOCATOR_PRELOADED", "/lib/libtcmalloc.so.4")
    with pytest.raises(allocator.AllocatorError, match="did not take"):
        allocator.run_again_with_tcmalloc()


@needs_tcmalloc
def test_the_heap_trimmer_asks_tcmalloc_for_its_free_pages_where_it_serves():
    """`release_free_heap` calls TCMalloc's own release: glibc's malloc_trim gives none of
    TCMalloc's free pages back (checked by hand: 277 MiB resident before and after)."""
    child = (
        "from service.allocator import loaded_allocator\n"
        "from service.memory import release_free_heap, resident_bytes\n"
        "assert loaded_allocator() == 'tcmalloc'\n"
        "blocks = [bytearray(1 << 20) for _ in range(256)]\n"
        "del blocks\n"
        "before = resident_bytes()\n"
        "assert release_free_heap()\n"
        "print((before - resident_bytes()) >> 20)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child],
        env={**os.environ, "LD_PRELOAD": str(TCMALLOC)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 128  # MiB of the 256 freed went back


def test_without_tcmalloc_the_heap_trimmer_uses_glibc():
    child = (
        "from service.memory import _tcmalloc_release, release_free_heap\n"
        "assert _tcmalloc_release() is None\n"
        "assert release_free_heap()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_preload_environment_keeps_a_preload_already_there(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: Path("/lib/libtcmalloc.so.4"))
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so")
    monkeypatch.setenv("ALARM_ALLOCATOR", "tcmalloc")
    variables = allocator.preload_environment()
    assert variables["LD_PRELOAD"] == "/lib/libtcmalloc.so.4 /opt/libother.so"
    assert variables["ALARM_ALLOCATOR"] == "tcmalloc"  # so the new process knows to refuse
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(allocator.AllocatorError, match="libtcmalloc-minimal4"):
        allocator.preload_environment()
