"""Build `data/qa_pairs_sample.jsonl` for `alarm-serve select-aspects` from the QA sample.

Per question: response_1 is the reference answer; response_2 is a degraded one, in turn
its first sentence only (incomplete) or the next question's reference (irrelevant).
Deterministic, so the file can be rebuilt and checked.

    python scripts/make_pairs.py
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def main() -> None:
    rows = [
        json.loads(line) for line in (DATA / "qa_feedback_sample.jsonl").read_text().splitlines()
    ]
    with (DATA / "qa_pairs_sample.jsonl").open("w") as out:
        for index, row in enumerate(rows):
            if index % 2 == 0:
                degraded = row["answer"].split(". ")[0].rstrip(".") + "."
            else:
                degraded = rows[(index + 1) % len(rows)]["answer"]
            pair = {"prompt": row["question"], "response_1": row["answer"], "response_2": degraded}
            out.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    main()
