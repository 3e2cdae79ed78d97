"""The server's CPU split by thread group: worker pools' clocks, read at scrape time."""

import asyncio
import sys
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.thread_cpu import ThreadCpu, clock_seconds, own_cpu_clock
from service.worker_threads import WorkerThreads
from tests.server_process import free_port, start, wait_ready

needs_thread_clocks = pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clocks here"
)


def burn(seconds: float) -> float:
    """Spin on this thread's CPU for `seconds` of its own CPU time; returns what it used."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        sum(range(1000))
    return time.thread_time() - started


def thread_cpu_samples(metrics: str) -> dict[str, float]:
    samples = {}
    for line in metrics.splitlines():
        if line.startswith("alarm_thread_cpu_seconds_total{"):
            group = line.split('threads="', 1)[1].split('"', 1)[0]
            samples[group] = float(line.rsplit(" ", 1)[1])
    return samples


@needs_thread_clocks
def test_a_pool_reports_the_cpu_its_jobs_used_and_nothing_while_it_waits():
    async def main() -> None:
        pool = WorkerThreads(2, "burners")
        cpu = ThreadCpu()
        cpu.watch("burners", pool.cpu_clocks)
        try:
            await pool.run(lambda: None)  # both threads have started (one ran this)
            while len(pool.cpu_clocks()) < 2:
                await asyncio.sleep(0.01)
            before = cpu.seconds("burners")
            used = sum(await asyncio.gather(pool.run(burn, 0.3), pool.run(burn, 0.3)))
            after = cpu.seconds("burners")
            assert used <= after - before < used + 0.1
            await asyncio.sleep(0.3)  # idle threads block on their queue: no CPU
            assert cpu.seconds("burners") - after < 0.05
        finally:
            pool.shutdown()
        # The threads have ended: their clocks read as nothing, without an error.
        assert cpu.seconds("burners") == 0.0

    asyncio.run(main())


@needs_thread_clocks
def test_a_thread_clock_is_its_own_and_a_dead_threads_reads_zero():
    clocks: list[int | None] = []
    worker = threading.Thread(target=lambda: (clocks.append(own_cpu_clock()), burn(0.2)))
    worker.start()
    mine = own_cpu_clock()
    assert mine is not None
    before = clock_seconds(mine)
    worker.join()
    # The other thread's 0.2 s are not this thread's.
    assert clock_seconds(mine) - before < 0.1
    (theirs,) = clocks
    assert theirs is not None and theirs != mine
    if sys.platform == "linux":  # elsewhere an ended thread's clock id is not defined
        assert clock_seconds(theirs) == 0.0


def test_the_collector_exposes_one_counter_sample_per_group():
    registry = CollectorRegistry()
    cpu = ThreadCpu()
    registry.register(cpu)
    cpu.watch("tokenize", list)  # a group with no threads yet
    text = generate_latest(registry).decode()
    assert "# TYPE alarm_thread_cpu_seconds_total counter" in text
    assert thread_cpu_samples(text) == {"tokenize": 0.0}


@needs_thread_clocks
def test_a_live_server_splits_its_cpu_between_event_loop_tokenizers_and_device(
    tiny_config_file, tmp_path
):
    port = free_port()
    process = start(
        ["--port", str(port)],
        {"ALARM_CONFIG": str(tiny_config_file), "ALARM_CACHE_DIR": str(tmp_path)},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base_url, timeout_s=120)
        before = thread_cpu_samples(httpx.get(f"{base_url}/metrics").text)
        assert set(before) == {"event_loop", "tokenize", "device:cpu"}
        items = [{"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote it. " * 20}]
        for _ in range(20):
            reply = httpx.post(f"{base_url}/v1/rewards", json={"items": items * 16}, timeout=60)
            assert reply.status_code == 200, reply.text
        after = thread_cpu_samples(httpx.get(f"{base_url}/metrics").text)
        for group in before:
            assert after[group] > before[group], group
    finally:
        process.kill()
        process.wait()
