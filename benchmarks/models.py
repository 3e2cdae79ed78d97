"""The benchmarked reward definition: holistic + 2 aspects on real-size MiniLM encoders.

No packaged reward model exists, so the holistic RM is all-MiniLM-L6-v2's encoder with a
freshly initialised scalar head (random head, real backbone: right for speed, meaningless
as a reward). The relevance aspect is the real MiniLM embedding similarity.

`PeerScorer` is the one scoring path every peer server runs (naive, LitServe, Ray Serve),
so that peers differ only in how they schedule forwards, never in what they compute.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from service.combine import AspectParams, HolisticParams, combine_response
from service.config import load_reward_config
from service.models import AspectScore, HolisticScore, RewardModel, load_models


def prepare_holistic(cache_dir: Path) -> Path:
    """A MiniLM sequence-classification folder with one output (built once, seeded)."""
    target = cache_dir / "minilm-scalar-rm"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.models.packaged import MINILM, PACKAGED_PREFIX, resolve_model_path

    source = resolve_model_path(PACKAGED_PREFIX + MINILM, cache_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def write_config(
    cache_dir: Path, path: Path, max_wait_ms: float = 5.0, min_padding_efficiency: float = 0.0
) -> dict[str, Any]:
    config = {
        "holistic": {
            "name": "holistic",
            "kind": "sequence_scalar",
            "path": str(prepare_holistic(cache_dir)),
            "device": "auto",
            "max_length": 256,
            "template": "{prompt} [SEP] {response}",
        },
        "aspects": [
            {
                "name": "relevance",
                "kind": "embedding_similarity",
                "path": "packaged:all-minilm-l6-v2",
                "device": "auto",
                "max_length": 128,
            },
            {"name": "length", "kind": "rule", "unit": "words", "mean": 60},
        ],
        "batching": {
            "max_batch_tokens": 16384,
            "max_batch_size": 64,
            "max_wait_ms": max_wait_ms,
            "min_padding_efficiency": min_padding_efficiency,
        },
        "limits": {"max_items_per_request": 512},
        # The load repeats the workload's items: a cache would answer them without a model,
        # which no peer does. Measure scoring, not caching.
        "cache": {"max_items": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return config


class PeerItem(BaseModel):
    prompt: str
    response: str


class PeerRequest(BaseModel):
    """The body every peer accepts: alarm-serve's request without its options."""

    items: list[PeerItem]


@dataclass(frozen=True)
class PeerScorer:
    """The peers' hierarchical reward: every model over the items, then ALaRM combination."""

    models: list[RewardModel]
    holistic_params: HolisticParams
    aspect_params: tuple[AspectParams, ...]

    @classmethod
    def load(cls, config_path: Path, cache_dir: Path) -> PeerScorer:
        config = load_reward_config(config_path)
        return cls(load_models(config, cache_dir), config.holistic_params(), config.aspect_params())

    def rewards(
        self,
        items: Sequence[PeerItem],
        device_lock: AbstractContextManager[Any] | None = None,
    ) -> list[float]:
        """One forward per model over `items`; `device_lock` is held around forwards only."""
        lock = device_lock if device_lock is not None else nullcontext()
        outputs = []
        for model in self.models:
            prepared = [model.prepare(i.prompt, i.response) for i in items]
            with lock:
                outputs.append(model.run(prepared))
        rewards = []
        for index, item in enumerate(items):
            holistic = outputs[0][index]
            assert isinstance(holistic, HolisticScore)
            segments = {}
            for model, per_model in zip(self.models[1:], outputs[1:], strict=True):
                aspect = per_model[index]
                assert isinstance(aspect, AspectScore)
                segments[model.name] = aspect.segments
            combined = combine_response(
                item.response, holistic.raw, segments, self.holistic_params, self.aspect_params
            )
            rewards.append(combined.reward)
        return rewards

    def rewards_per_request(
        self, requests: Sequence[Sequence[PeerItem]], max_forward_items: int
    ) -> list[list[float]]:
        """A framework's batch of requests, scored in forwards of at most `max_forward_items`.

        The frameworks batch requests, not items: flattening and re-cutting keeps every
        forward under the same item cap as alarm-serve's batches, whatever k is.
        """
        flat = [item for request in requests for item in request]
        rewards: list[float] = []
        for start in range(0, len(flat), max_forward_items):
            rewards.extend(self.rewards(flat[start : start + max_forward_items]))
        ends = list(itertools.accumulate(len(request) for request in requests))
        return [
            rewards[end - len(request) : end] for request, end in zip(requests, ends, strict=True)
        ]


def peer_arguments() -> argparse.Namespace:
    """The command line of every peer server: `benchmarks.bench` starts them all alike."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()
