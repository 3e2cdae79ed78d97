"""The benchmarked reward definition: holistic + 2 aspects on real-size MiniLM encoders.

No packaged reward model exists, so the holistic RM is all-MiniLM-L6-v2's encoder with a
freshly initialised scalar head (random head, real backbone: right for speed, meaningless
as a reward). The relevance aspect is the real MiniLM embedding similarity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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
    }
    path.write_text(yaml.safe_dump(config))
    return config
