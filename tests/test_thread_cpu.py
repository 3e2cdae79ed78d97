"""The server's CPU split by thread group: worker pools' clocks, read at scrape time."""

import asyncio
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from benchmarks.scrape import thread_cpu_seconds
from service.thread_cpu import ThreadCpu, clock_seconds, own_cpu_clock
from service.worker_threads import WorkerThreads
from tests.server_process import running_server

needs_thread_clocks = pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clocks here"
)


def burn(seconds: float) -> float:
    """Spin on this thread's CPU for `seconds` of its own CPU time; returns what it used."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        sum(range(1000))
    return time.thread_time() - started


@needs_thread_clocks
def test_a_pool_reports_the_cpu_its_jobs_used_nothing_while_it_waits_and_keeps_it_after():
    async def main() -> None:
        pool = WorkerThreads(2, "burners")
        cpu = ThreadCpu("test_cpu_seconds", "test")
        cpu.watch("burners", pool.cpu_seconds)
        await asyncio.gather(pool.run(lambda: None), pool.run(lambda: None))
        before = cpu.seconds("burners")
        used = sum(await asyncio.gather(pool.run(burn, 0.3), pool.run(burn, 0.3)))
        after = cpu.seconds("burners")
        assert used <= after - before < used + 0.1
        await asyncio.sleep(0.3)  # idle threads block on their queue: no CPU
        idle = cpu.seconds("burners")
        assert idle - after < 0.05
        pool.shutdown()
        # The threads have ended: their seconds are kept, so the counter never goes down.
        assert idle <= cpu.seconds("burners") < idle + 0.05

    asyncio.run(main())


@needs_thread_clocks
def test_a_thread_clock_is_its_own():
    clocks: list[int | None] = []
    ready, done = threading.Event(), threading.Event()

    def other() -> None:
        clocks.append(own_cpu_clock())
        burn(0.2)
        ready.set()
        done.wait()

    worker = threading.Thread(target=other)
    worker.start()
    mine = own_cpu_clock()
    before = clock_seconds(mine)
    ready.wait()
    (theirs,) = clocks
    # Read while the other thread still lives: its 0.2 s are its own, not this thread's.
    assert clock_seconds(theirs) >= 0.2
    assert clock_seconds(mine) - before < 0.1
    done.set()
    worker.join()


def test_the_collector_exposes_one_counter_sample_per_group_and_reserves_its_name():
    registry = CollectorRegistry()
    cpu = ThreadCpu("test_cpu_seconds", "test")
    registry.register(cpu)
    cpu.watch("tokenize", lambda: 1.5)
    text = generate_latest(registry).decode()
    assert "# TYPE test_cpu_seconds_total counter" in text
    assert 'test_cpu_seconds_total{threads="tokenize"} 1.5' in text
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(ThreadCpu("test_cpu_seconds", "again"))


@needs_thread_clocks
def test_a_live_server_splits_its_cpu_between_event_loop_tokenizers_and_device(
    tiny_config_file, tmp_path
):
    with running_server(tiny_config_file, tmp_path) as base_url:
        before = thread_cpu_seconds(httpx.get(f"{base_url}/metrics").text)
        assert set(before) == {"event_loop", "tokenize", "device:cpu"}
        items = [{"prompt": "Who wrote Hamlet?", "response": "Shakespeare wrote it. " * 20}]
        for _ in range(20):
            reply = httpx.post(f"{base_url}/v1/rewards", json={"items": items * 16}, timeout=60)
            assert reply.status_code == 200, reply.text
        after = thread_cpu_seconds(httpx.get(f"{base_url}/metrics").text)
        # The event loop also served the scrapes; the other two only scoring.
        for group in ("tokenize", "device:cpu"):
            assert after[group] > before[group], group
