"""The benchmark's inputs: real qa-feedback questions with short and long answers.

Half the items answer with the reference's first sentence, half with the whole reference
(up to ~700 characters), so lengths are long-tailed as in PPO rollouts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data" / "qa_feedback_sample.jsonl"


def load_items(count: int, seed: int = 0) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    items = []
    for index in range(count):
        row = rows[index % len(rows)]
        answer = row["answer"]
        if rng.random() < 0.5:
            answer = answer.split(". ")[0].rstrip(".") + "."
        items.append({"prompt": row["question"], "response": answer})
    return items
