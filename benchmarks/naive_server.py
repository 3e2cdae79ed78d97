"""The one-forward-per-request peer (what OpenRLHF's reward server does), on the same models.

Each request tokenises its own items and runs every model on just those items, in
FastAPI's thread pool, with no batching across requests. Same adapters and combination
code as alarm-serve, so the difference measured is the scheduling.

    python -m benchmarks.naive_server --config FILE --port 8100
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from service.combine import combine_response
from service.config import load_reward_config
from service.models import AspectScore, HolisticScore, load_models


class Item(BaseModel):
    prompt: str
    response: str


class Request(BaseModel):
    items: list[Item]


def create_app(config_path: Path, cache_dir: Path) -> FastAPI:
    config = load_reward_config(config_path)
    models = load_models(config, cache_dir)
    holistic_params, aspect_params = config.holistic_params(), config.aspect_params()
    # One forward at a time per device, as a single-worker PyTorch server would run.
    device_lock = threading.Lock()
    app = FastAPI()

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/rewards")
    def score(body: Request) -> dict[str, list[float]]:
        outputs = []
        for model in models:
            prepared = [model.prepare(i.prompt, i.response) for i in body.items]
            with device_lock:
                outputs.append(model.run(prepared))
        rewards = []
        for index, item in enumerate(body.items):
            holistic = outputs[0][index]
            assert isinstance(holistic, HolisticScore)
            segments = {}
            for model, per_model in zip(models[1:], outputs[1:], strict=True):
                aspect = per_model[index]
                assert isinstance(aspect, AspectScore)
                segments[model.name] = aspect.segments
            combined = combine_response(
                item.response, holistic.raw, segments, holistic_params, aspect_params
            )
            rewards.append(combined.reward)
        return {"rewards": rewards}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app(args.config, args.cache_dir)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
