"""Faults and deadlines: expired work never reaches a model, out-of-memory batches are halved."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.batch_forming import BatchLimits
from service.batching import BatchStats, MicroBatcher
from service.config import RewardConfig
from service.errors import DeadlineExceeded, ModelFailure
from service.out_of_memory import is_out_of_memory, run_halving_on_oom
from tests.conftest import asgi_client, tiny_config_dict, wait_ready
from tests.server_process import running_server

PROMPT = "question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare."
ANSWER = "William Shakespeare wrote Hamlet. It is a tragedy. He wrote it around 1600."
ITEM = {"prompt": PROMPT, "response": ANSWER}


class RecordingModel:
    def __init__(self, delay_s: float = 0.0):
        self.seen: list[str] = []
        self.delay_s = delay_s

    async def __call__(self, payloads):
        self.seen.extend(payloads)
        await asyncio.sleep(self.delay_s)
        return [f"scored:{p}" for p in payloads]


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError (same name and base) without a GPU."""


# --- the batcher drops expired and abandoned work ------------------------------------------


async def test_expired_items_never_reach_the_model_and_fail_with_deadline_exceeded():
    model = RecordingModel()
    dropped: list[tuple[str, int]] = []
    batcher = MicroBatcher(
        model, BatchLimits(1000, 8, max_wait_s=0.05), on_dropped=lambda *d: dropped.append(d)
    )
    batcher.start()
    try:
        now = time.monotonic()
        late = batcher.submit("late", length=1, deadline=now + 0.001)  # expires while queued
        in_time = batcher.submit("in-time", length=1, deadline=now + 60)
        no_deadline = batcher.submit("no-deadline", length=1)
        gone = batcher.submit("gone", length=1)
        gone.cancel()
        results = await asyncio.gather(late, in_time, no_deadline, return_exceptions=True)
    finally:
        await batcher.stop()
    assert isinstance(results[0], DeadlineExceeded)
    assert results[0].http_status == 504 and results[0].error_type == "deadline_exceeded"
    assert results[1:] == ["scored:in-time", "scored:no-deadline"]
    assert model.seen == ["in-time", "no-deadline"]
    assert sorted(dropped) == [("cancelled", 1), ("deadline", 1)]


async def test_an_item_that_expires_behind_an_earlier_batch_is_dropped_before_its_own():
    model = RecordingModel(delay_s=0.1)
    dropped: list[tuple[str, int]] = []
    limits = BatchLimits(1000, max_batch_size=1, max_wait_s=0.001)
    batcher = MicroBatcher(model, limits, on_dropped=lambda *d: dropped.append(d))
    batcher.start()
    try:
        first = batcher.submit("first", length=1)
        second = batcher.submit("second", length=1, deadline=time.monotonic() + 0.03)
        results = await asyncio.gather(first, second, return_exceptions=True)
    finally:
        await batcher.stop()
    assert results[0] == "scored:first"
    assert isinstance(results[1], DeadlineExceeded)
    assert model.seen == ["first"]
    assert dropped == [("deadline", 1)]


async def test_an_exception_returned_for_one_item_fails_only_that_item():
    stats: list[BatchStats] = []

    async def fails_odd(payloads):
        return [ValueError(p) if p % 2 else p * 10 for p in payloads]

    batcher = MicroBatcher(fails_odd, BatchLimits(1000, 8, 0.01), on_batch=stats.append)
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(i, length=1) for i in range(4)), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert results[0] == 0 and results[2] == 20
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)
    assert [(s.size, s.failed, s.failed_items) for s in stats] == [(4, False, 2)]


# --- the engine halves batches that run out of memory --------------------------------------


class OutOfMemoryAbove:
    """A fake model that runs out of memory on batches larger than `max_items`."""

    def __init__(self, max_items: int, error: Exception):
        self.max_items = max_items
        self.error = error
        self.batches: list[list[int]] = []

    def __call__(self, batch):
        if len(batch) > self.max_items:
            raise self.error
        self.batches.append(list(batch))
        return [f"scored:{item}" for item in batch]


@pytest.mark.parametrize(
    ("size", "splits"),
    [(1, 0), (2, 0), (3, 1), (5, 2), (8, 3), (9, 4)],
)
@pytest.mark.parametrize(
    "error",
    [OutOfMemoryError("CUDA error: 2 GiB requested"), RuntimeError("CUDA out of memory.")],
    ids=["OutOfMemoryError", "RuntimeError-message"],
)
def test_an_out_of_memory_batch_is_halved_until_every_item_is_scored_in_order(size, splits, error):
    model = OutOfMemoryAbove(2, error)
    counted: list[None] = []
    results = run_halving_on_oom(model, list(range(size)), lambda: counted.append(None), "rm")
    assert results == [f"scored:{i}" for i in range(size)]
    assert len(counted) == splits
    assert all(len(b) <= 2 for b in model.batches)


def test_items_that_run_out_of_memory_alone_get_a_model_failure_each():
    model = OutOfMemoryAbove(0, RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB"))
    counted: list[None] = []
    results = run_halving_on_oom(model, list(range(6)), lambda: counted.append(None), "rm")
    assert len(results) == 6
    assert all(isinstance(r, ModelFailure) for r in results)
    assert "'rm' ran out of device memory" in results[0].message
    assert len(counted) == 5  # halving 6 items down to single items takes 5 splits


def test_other_errors_are_not_split_and_fail_the_batch():
    model = OutOfMemoryAbove(0, RuntimeError("CUDA error: device-side assert triggered"))
    with pytest.raises(RuntimeError, match="device-side assert"):
        run_halving_on_oom(model, [1, 2, 3], pytest.fail, "rm")


def test_out_of_memory_is_recognised_by_class_name_or_message():
    import torch

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(OutOfMemoryError("anything"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_out_of_memory(ValueError("out of memory"))


def allocate_past_the_host() -> None:
    """A real failed host allocation: 2^45 float32s (128 TiB), past any address space."""
    import torch

    torch.empty(2**45, dtype=torch.float32)


def raise_cuda_out_of_memory() -> None:
    raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")


def test_a_failed_host_allocation_is_out_of_memory():
    # torch's "DefaultCPUAllocator: can't allocate memory" is halved and retried too.
    with pytest.raises(RuntimeError) as failed:
        allocate_past_the_host()
    assert "DefaultCPUAllocator" in str(failed.value)
    assert is_out_of_memory(failed.value)
    assert not is_out_of_memory(RuntimeError("can't allocate a tensor of negative size"))


def metric(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize(
    "run_out_of_memory", [raise_cuda_out_of_memory, allocate_past_the_host], ids=["gpu", "host"]
)
async def test_a_model_out_of_memory_on_big_batches_still_scores_every_item(
    tiny_paths, tmp_path, monkeypatch, run_out_of_memory
):
    from service.models.segment_classifier import SegmentClassifierModel

    # No output cache: the second request must run the model again.
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths, cache={"max_items": 0}))
    items = [{"prompt": PROMPT, "response": f"{ANSWER} Item {i}."} for i in range(6)]
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        before = await client.post("/v1/rewards", json={"items": items})
        assert before.status_code == 200, before.text

        original = SegmentClassifierModel.run

        def out_of_memory_above_one(self, batch):
            if len(batch) > 1:
                run_out_of_memory()
            return original(self, batch)

        monkeypatch.setattr(SegmentClassifierModel, "run", out_of_memory_above_one)
        after = await client.post("/v1/rewards", json={"items": items})
        assert after.status_code == 200, after.text
        for old, new in zip(before.json()["results"], after.json()["results"], strict=True):
            assert new["reward"] == pytest.approx(old["reward"], abs=1e-4)
        text = (await client.get("/metrics")).text
        assert metric(text, 'alarm_oom_splits_total{model="factuality"}') >= 1
        assert metric(text, 'alarm_oom_splits_total{model="holistic"}') == 0

        def always_out_of_memory(self, batch):
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

        monkeypatch.setattr(SegmentClassifierModel, "run", always_out_of_memory)
        failed = await client.post("/v1/rewards", json={"items": items[:2]})
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "model_failure"
        assert "factuality" in failed.json()["error"]["message"]
        assert (await client.get("/readyz")).status_code == 200


# --- deadlines over HTTP against the real server process -----------------------------------


# 0: one process; 2: two HTTP front-end processes over one engine process (errors, deadlines
# and overload reach the client through the engine link as they do in one process).
@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "front-ends"])
def slow_queue_server(request, tiny_paths, tmp_path_factory):
    """A server where a 1 ms deadline expires before the items reach a model: tokenising
    and queueing take longer. No output cache, or a repeated item would skip both."""
    config = tiny_config_dict(tiny_paths, batching={"max_wait_ms": 200}, cache={"max_items": 0})
    folder = tmp_path_factory.mktemp("faults")
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {"ALARM_FRONT_ENDS": str(request.param)}
    with running_server(folder / "config.yaml", folder, env=env) as url:
        yield url


def dropped_for_deadline(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("alarm_dropped_items_total{") and 'reason="deadline"' in line
    )


@pytest.mark.parametrize(
    ("body", "headers"),
    [({"deadline_ms": 1}, {}), ({}, {"X-Request-Deadline-Ms": "1"})],
    ids=["body", "header"],
)
def test_a_request_past_its_deadline_gets_504_and_the_server_keeps_serving(
    slow_queue_server, body, headers
):
    dropped_before = dropped_for_deadline(slow_queue_server)
    reply = httpx.post(
        f"{slow_queue_server}/v1/rewards",
        json={"items": [ITEM, ITEM], **body},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 504, reply.text
    error = reply.json()["error"]
    assert error["type"] == "deadline_exceeded"
    assert "deadline" in error["message"]
    assert error["request_id"] == reply.headers["x-request-id"]
    assert dropped_for_deadline(slow_queue_server) >= dropped_before + 2

    normal = httpx.post(f"{slow_queue_server}/v1/rewards", json={"items": [ITEM]}, timeout=30)
    assert normal.status_code == 200, normal.text
    assert len(normal.json()["results"]) == 1


def test_get_reward_takes_a_deadline_header_too(slow_queue_server):
    """OpenRLHF's body has no deadline field; the header gives its route one."""

    def get_reward(deadline_ms: str) -> httpx.Response:
        return httpx.post(
            f"{slow_queue_server}/get_reward",
            json={"query": [PROMPT + ANSWER] * 2, "prompts": [PROMPT] * 2},
            headers={"X-Request-Deadline-Ms": deadline_ms},
            timeout=30,
        )

    dropped_before = dropped_for_deadline(slow_queue_server)
    reply = get_reward("1")
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["type"] == "deadline_exceeded"
    assert dropped_for_deadline(slow_queue_server) >= dropped_before + 2
    generous = get_reward("60000")
    assert generous.status_code == 200, generous.text
    assert len(generous.json()["rewards"]) == 2


def test_a_generous_deadline_scores_and_the_body_overrides_the_header(slow_queue_server):
    reply = httpx.post(
        f"{slow_queue_server}/v1/rewards",
        json={"items": [ITEM], "deadline_ms": 60_000},
        headers={"X-Request-Deadline-Ms": "1"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"deadline_ms": 0}, {}),
        ({"deadline_ms": -5}, {}),
        ({}, {"X-Request-Deadline-Ms": "soon"}),
        ({}, {"X-Request-Deadline-Ms": "nan"}),
    ],
    ids=["zero", "negative", "header-not-a-number", "header-nan"],
)
def test_an_invalid_deadline_is_refused_with_422(slow_queue_server, body, headers):
    reply = httpx.post(
        f"{slow_queue_server}/v1/rewards",
        json={"items": [ITEM], **body},
        headers=headers,
        timeout=30,
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["type"] == "invalid_request"


async def test_the_engine_gives_free_heap_pages_back_once_its_forwards_stop(
    tiny_paths, tmp_path, monkeypatch
):
    import service.heap_trimmer as trimmer_module
    from service.memory import release_free_heap

    calls: list[int] = []
    monkeypatch.setattr(trimmer_module.HeapTrimmer, "INTERVAL_S", 0.05)
    monkeypatch.setattr(trimmer_module.HeapTrimmer, "IDLE_BEFORE_TRIM_S", 0.2)
    monkeypatch.setattr(trimmer_module, "release_free_heap", lambda: calls.append(1) or True)
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths))
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        await asyncio.sleep(0.5)
        after_warm_up = len(calls)
        assert after_warm_up >= 1  # the warm-up's forwards are over
        reply = await client.post("/v1/rewards", json={"items": [ITEM]})
        assert reply.status_code == 200
        await asyncio.sleep(0.5)
        after_request = len(calls)
        assert after_request > after_warm_up  # the request's forwards are over
        await asyncio.sleep(0.3)
        assert len(calls) == after_request  # once per idle spell, not on every tick
    stopped_at = len(calls)
    await asyncio.sleep(0.2)
    assert len(calls) == stopped_at  # the trimmer stops with the engine
    assert release_free_heap()  # glibc (Linux): the real call works here


def test_the_heap_is_trimmed_when_idle_and_under_load_only_above_the_ceiling():
    from service.memory import HeapTrimPolicy

    policy = HeapTrimPolicy(headroom_bytes=100, resident_at_start=900)
    assert not policy.due(forwards_started=3, running=1, resident=950)  # busy, under it
    assert not policy.due(forwards_started=3, running=1, resident=950)  # one long forward
    assert policy.due(forwards_started=3, running=0, resident=950)  # none since: idle
    assert not policy.due(forwards_started=3, running=0, resident=950)  # the same idle spell
    assert policy.due(forwards_started=5, running=2, resident=1001)  # busy, above the ceiling
    policy.trimmed(resident=990)
    assert not policy.due(forwards_started=7, running=2, resident=1050)  # ceiling moved up
    assert policy.due(forwards_started=9, running=2, resident=None)  # unknown: trim
    unknown = HeapTrimPolicy(headroom_bytes=100, resident_at_start=None)
    assert unknown.due(forwards_started=1, running=1, resident=10)


def test_short_pauses_between_bursts_keep_the_heap():
    """A trainer's next step comes back within the idle spell: its forwards reuse the pages."""
    from service.memory import HeapTrimPolicy

    policy = HeapTrimPolicy(headroom_bytes=100, resident_at_start=900, idle_checks=3)
    assert not policy.due(forwards_started=4, running=0, resident=950)  # a burst
    assert not policy.due(forwards_started=4, running=0, resident=950)  # idle 1
    assert not policy.due(forwards_started=4, running=0, resident=950)  # idle 2
    assert not policy.due(forwards_started=6, running=1, resident=950)  # the next burst
    assert not policy.due(forwards_started=6, running=0, resident=950)  # idle 1, anew
    assert not policy.due(forwards_started=6, running=0, resident=950)  # idle 2
    assert policy.due(forwards_started=6, running=0, resident=950)  # idle 3: trim
    assert not policy.due(forwards_started=6, running=0, resident=950)  # once per spell


def test_resident_bytes_reads_this_process():
    from service.memory import resident_bytes

    resident = resident_bytes()
    if resident is None:
        pytest.skip("no /proc: resident memory unknown")
    assert 10 << 20 < resident < 64 << 30


def test_the_benchmark_counts_the_page_faults_a_server_takes():
    """What the benchmark's faults per item rest on: a child touching 64 MiB of new memory
    (16,384 pages) is seen to fault about that many pages, and nothing while it waits."""
    from benchmarks.servers import page_faults

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc: page faults unknown")
    huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if huge_pages.exists() and "[always]" in huge_pages.read_text():
        pytest.skip("transparent huge pages: 2 MiB per fault, not 4 KiB")
    touch = "import sys; sys.stdin.readline(); block = b'x' * (64 << 20); print(len(block))"
    child = subprocess.Popen(
        [sys.executable, "-c", f"print('ready', flush=True); {touch}; sys.stdin.readline()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        idle = page_faults({child.pid})
        time.sleep(0.2)
        idle = page_faults({child.pid}) - idle
        before = page_faults({child.pid})
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == str(64 << 20)
        touched = page_faults({child.pid}) - before
    finally:
        child.kill()
        child.wait()
    assert idle == 0
    assert 16_384 * 0.9 < touched < 16_384 * 4
    assert page_faults({child.pid}) == 0  # gone: counts nothing


async def test_the_engine_keeps_freed_memory_for_reuse_from_its_start(
    tiny_paths, tmp_path, monkeypatch
):
    import service.engine as engine_module

    calls: list[int] = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1) or True)
    config = RewardConfig.model_validate(tiny_config_dict(tiny_paths))
    async with asgi_client(config, tmp_path) as client:
        await wait_ready(client)
        assert calls == [1]


# Appended to each probe once its heap policy is set: `cycle(size)` allocates, fills and
# frees one block through glibc itself.
_BLOCK_CYCLE = """
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def cycle(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
"""

# Allocates, fills and frees a 48 MiB block (above glibc's largest automatic mmap
# threshold) five times, and prints the page faults of the last four rounds.
_FAULT_PROBE = (
    """
import resource, sys
from service.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
"""
    + _BLOCK_CYCLE
    + """
cycle(48 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle(48 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
)


def _probe_faults(probe: str, mode: str) -> int:
    """The page faults a probe script prints, run in a child whose heap policy is glibc's
    default unless the probe sets it; skips where glibc's faults cannot be counted so."""
    from service.memory import _glibc

    if _glibc() is None:
        pytest.skip("not glibc: the C library hands memory back its own way")
    huge_pages = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if huge_pages.exists() and "[always]" in huge_pages.read_text():
        pytest.skip("transparent huge pages: a fresh block faults in 2 MiB at a time")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"
    }
    run = subprocess.run(
        [sys.executable, "-c", probe, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
    )
    return int(run.stdout.strip())


def test_kept_freed_memory_is_reused_without_page_faults():
    def faults(mode: str) -> int:
        return _probe_faults(_FAULT_PROBE, mode)

    # By default each round maps the block afresh: 12,288 pages, each faulted in.
    assert faults("default") > 4 * 10_000
    assert faults("keep") < 1_000  # the freed block is reused as it is


# In a worker thread, as the engine's forwards run: allocates, fills and frees a 96 MiB
# block (larger than a thread arena's heap) five times, and prints the thread's page faults
# of the last four rounds. "one-heap" calls the CLI's first step before any thread starts.
_THREAD_FAULT_PROBE = (
    """
import resource, sys, threading
from service.memory import keep_freed_memory, share_one_heap
if sys.argv[1] == "one-heap":
    assert share_one_heap()
assert keep_freed_memory()
"""
    + _BLOCK_CYCLE
    + """
def forwards():
    cycle(96 << 20)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(4):
        cycle(96 << 20)
    print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=forwards)
thread.start()
thread.join()
"""
)


def test_worker_threads_reuse_large_freed_blocks_once_the_process_shares_one_heap():
    def faults(mode: str) -> int:
        return _probe_faults(_THREAD_FAULT_PROBE, mode)

    # In the thread's own arena the block is mapped and unmapped each round: 24,576 pages.
    assert faults("arena-per-thread") > 4 * 20_000
    assert faults("one-heap") < 1_000


def test_the_command_shares_one_heap_before_anything_else(monkeypatch):
    import service.__main__ as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "share_one_heap", lambda: calls.append("heap") or True)
    monkeypatch.setattr(cli, "render_openapi", lambda: calls.append("openapi") or "")
    assert cli.main(["openapi"]) == 0
    assert calls == ["heap", "openapi"]
