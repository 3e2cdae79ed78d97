"""Example trainer: wait for the reward service, score a few rollouts, print the rewards.

docker/compose.yaml runs it as the `trainer` service (same image as `reward`, reaching it at
http://reward:8000 on the compose network). A real PPO trainer would call `client.score` once
per rollout batch and log `reward_definition` with its run. With API keys on, its key comes
from ALARM_API_KEY (as for `alarm-ppo`; empty or unset: no key). Outside compose:

    REWARD_URL=http://127.0.0.1:8000 ALARM_API_KEY=... python docker/trainer_example.py
"""

from __future__ import annotations

import os
import sys

from trainer_client import RewardClient

PROMPT = "What is the capital of France?"
ROLLOUTS = [
    ("right", PROMPT, "The capital of France is Paris."),
    ("wrong", PROMPT, "The capital of France is Berlin."),
    ("gibberish", PROMPT, "Blorp zizzle fnord wub."),
]


def main(base_url: str, ready_timeout_s: float = 600.0, api_key: str | None = None) -> int:
    with RewardClient(base_url, api_key=api_key) as client:
        client.wait_until_ready(timeout_s=ready_timeout_s)
        batch = client.score([(prompt, response) for _, prompt, response in ROLLOUTS])
    for (name, _, response), result in zip(ROLLOUTS, batch.results, strict=True):
        print(
            f"{name:<10} reward={result.reward:8.3f} gate_passed={result.gate_passed!s:<5} "
            f"dense_terms={len(result.dense)} response={response!r}"
        )
    print(f"reward_definition={batch.reward_definition}")
    return 0


if __name__ == "__main__":
    url = os.environ.get("REWARD_URL", "http://reward:8000")
    timeout_s = float(os.environ.get("REWARD_READY_TIMEOUT_S", "600"))
    sys.exit(main(url, timeout_s, os.environ.get("ALARM_API_KEY") or None))
