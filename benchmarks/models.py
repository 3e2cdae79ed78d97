"""The benchmarked reward definition: holistic + 2 aspects on real-size models.

No packaged reward model exists, so the holistic RM is all-MiniLM-L6-v2's encoder with a
freshly initialised scalar head (random head, real backbone: right for speed, meaningless
as a reward), or, for GPUs (`--holistic`), a random-weight RM built from a config at the
size of DeBERTa-v3-large or of a Llama-2-7B RM. The relevance aspect is the real MiniLM
embedding similarity.

`PeerScorer` is the one scoring path every peer server runs (naive, LitServe, Ray Serve),
so that peers differ only in how they schedule forwards, never in what they compute.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from service.combine import AspectParams, HolisticParams, combine_response
from service.config import RewardConfig, load_reward_config
from service.models import (
    AspectScore,
    EncodingMemo,
    HolisticScore,
    RewardModel,
    load_models,
    prepare_items,
)


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


# Random-weight holistic RMs at real sizes, for speed only: the dimensions of
# DeBERTa-v3-large (OpenAssistant's RM, 24 x 1024) and of a Llama-2-7B RM (32 x 4096).
# Both read MiniLM's tokenizer (vocabulary 30,522), the only one on hand offline.
HOLISTIC_SIZES: dict[str, dict[str, Any]] = {
    "deberta-large": {
        "model_type": "deberta-v2",
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "max_position_embeddings": 512,
        "relative_attention": True,
        "position_buckets": 256,
        "pos_att_type": ["p2c", "c2p"],
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "position_biased_input": False,
    },
    "llama-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "max_position_embeddings": 4096,
    },
}


def random_holistic_config(dimensions: dict[str, Any], tokenizer: Any) -> Any:
    """A one-output sequence-classification config of `dimensions` for `tokenizer`."""
    from transformers import AutoConfig

    settings = dict(dimensions)
    return AutoConfig.for_model(
        settings.pop("model_type"),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        **settings,
    )


def prepare_random_holistic(
    cache_dir: Path, name: str, dimensions: dict[str, Any], dtype: str
) -> Path:
    """A seeded random-weight RM folder of `dimensions`, saved in `dtype` (built once).

    Built on the GPU where there is one: a 7B model's initialisation takes minutes on a CPU.
    """
    target = cache_dir / f"random-{name}-rm-{dtype}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.models.loading import DTYPES
    from service.models.packaged import MINILM, PACKAGED_PREFIX, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(PACKAGED_PREFIX + MINILM, cache_dir)
    )
    config = random_holistic_config(dimensions, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=DTYPES[dtype])
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


RELEVANCE_PATH = "packaged:all-minilm-l6-v2"
RULE_MODEL = "length"  # the host rule: no forward, so no batch figures or padding


def write_config(
    cache_dir: Path,
    path: Path,
    max_wait_ms: float = 5.0,
    fill_wait_ms: float = 0.0,
    gil_switch_interval_ms: float | None = None,
    min_padding_efficiency: float = 0.0,
    holistic: str = "minilm",
    dtype: str = "float32",
    compile: bool = False,
    relevance_path: str = RELEVANCE_PATH,
    cpu_workers: int | None = None,
    gpu_workers: int | None = None,
    forward_overhead_tokens: int | None = None,
    trace_packed: bool = True,
    max_batch_size: int = 64,
    max_batch_tokens: int = 16384,
) -> dict[str, Any]:
    """The benchmark's config: `holistic` is `minilm` or a key of HOLISTIC_SIZES; `dtype`,
    `compile` and `trace_packed` apply to both transformer models."""
    holistic_path = (
        prepare_holistic(cache_dir)
        if holistic == "minilm"
        else prepare_random_holistic(cache_dir, holistic, HOLISTIC_SIZES[holistic], dtype)
    )
    runtime = {"device": "auto", "dtype": dtype, "compile": compile, "trace_packed": trace_packed}
    config = {
        "holistic": {
            "name": "holistic",
            "kind": "sequence_scalar",
            "path": str(holistic_path),
            **runtime,
            "max_length": 256,
            "template": "{prompt} [SEP] {response}",
        },
        "aspects": [
            {
                "name": "relevance",
                "kind": "embedding_similarity",
                "path": relevance_path,
                **runtime,
                "max_length": 128,
            },
            {"name": RULE_MODEL, "kind": "rule", "unit": "words", "mean": 60},
        ],
        "batching": {
            "max_batch_tokens": max_batch_tokens,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "fill_wait_ms": fill_wait_ms,
            **(
                {}
                if gil_switch_interval_ms is None
                else {"gil_switch_interval_ms": gil_switch_interval_ms}
            ),
            "min_padding_efficiency": min_padding_efficiency,
            **({} if cpu_workers is None else {"cpu_workers": cpu_workers}),
            **({} if gpu_workers is None else {"gpu_workers": gpu_workers}),
            **(
                {}
                if forward_overhead_tokens is None
                else {"forward_overhead_tokens": forward_overhead_tokens}
            ),
        },
        "limits": {"max_items_per_request": 512},
        # The load repeats the workload's items: a cache would answer them without a model,
        # which no peer does. Measure scoring, not caching.
        "cache": {"max_items": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return config


def load_benchmark_models(
    cache_dir: Path, **settings: Any
) -> tuple[RewardConfig, list[RewardModel]]:
    """The benchmark's reward definition (`write_config`'s keyword settings) and its
    models, loaded in this process; the config file lives only while they load."""
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.yaml"
        write_config(cache_dir, config_path, **settings)
        config = load_reward_config(config_path)
        return config, load_models(config, cache_dir)


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
            # One batched tokenizer call per batch, as a plain user's `tokenizer(texts)`,
            # through the adapters' own encoder (the Rust pipeline where it matches).
            pairs = [(i.prompt, i.response) for i in items]
            prepared = prepare_items(model, pairs, EncodingMemo())
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
