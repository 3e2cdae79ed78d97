"""The engine tokenises in its own threads: the tokenizers library starts no pool of its own
beside them, unless the user asks for one with TOKENIZERS_PARALLELISM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import tiny_config_dict

# In a fresh process (the test process may hold the library's pool already): models loaded,
# an engine started, requests scored whose items are tokenised in one batched call per
# tokenizer; prints how many OS threads Python does not know of (torch's, the library's)
# that last half a second.
_CHILD = """
import asyncio, json, os, sys, threading, time
from pathlib import Path
from prometheus_client import CollectorRegistry
from service.config import RewardConfig
from service.engine import RewardEngine, ScoreInput
from service.metrics import ServiceMetrics
from service.models import load_models

def foreign_threads():
    ours = {thread.native_id for thread in threading.enumerate()}
    return {int(task) for task in os.listdir("/proc/self/task")} - ours

config = RewardConfig.model_validate(json.loads(sys.argv[1]))
models = load_models(config, Path(sys.argv[2]))

async def score():
    engine = RewardEngine(models, config, ServiceMetrics(CollectorRegistry()))
    await engine.start()
    items = [ScoreInput(f"Question {i}?", f"First part {i}. Then more. End.") for i in range(8)]
    try:
        for _ in range(3):
            await engine.score(items)
    finally:
        await engine.stop()

asyncio.run(score())
lasting = foreign_threads()
time.sleep(0.5)  # a Python thread that has just ended may not have left the OS yet
print(len(lasting & foreign_threads()))
"""


def _foreign_threads_after_scoring(tiny_paths, tmp_path, parallelism: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if parallelism is not None:
        env["TOKENIZERS_PARALLELISM"] = parallelism
    config = json.dumps(tiny_config_dict(tiny_paths, cache={"max_items": 0}))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, config, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(child.stdout.strip().splitlines()[-1])


def test_scoring_starts_no_tokenizer_pool_unless_the_user_asks_for_one(tiny_paths, tmp_path):
    by_default = _foreign_threads_after_scoring(tiny_paths, tmp_path, None)
    asked_for = _foreign_threads_after_scoring(tiny_paths, tmp_path, "true")
    # The library's pool has a thread per core (two on this project's VM); none by default.
    assert asked_for > by_default
