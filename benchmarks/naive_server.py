"""The one-forward-per-request peer (what OpenRLHF's reward server does), on the same models.

Each request tokenises its own items and runs every model on just those items, in
FastAPI's thread pool, with no batching across requests. Same adapters and combination
code as alarm-serve, so the difference measured is the scheduling.

    python -m benchmarks.naive_server --config FILE --port 8100
"""

from __future__ import annotations

import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from benchmarks.models import PeerRequest, PeerScorer, peer_arguments


def create_app(config_path: Path, cache_dir: Path) -> FastAPI:
    scorer = PeerScorer.load(config_path, cache_dir)
    # One forward at a time per device, as a single-worker PyTorch server would run.
    device_lock = threading.Lock()
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/rewards")
    def score(body: PeerRequest) -> dict[str, list[float]]:
        return {"rewards": scorer.rewards(body.items, device_lock)}

    return app


def main() -> None:
    args = peer_arguments()
    app = create_app(args.config, args.cache_dir)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
