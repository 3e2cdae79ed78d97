"""alarm-serve with networks that cost nothing: what the host alone allows.

On a GPU whose forward costs the same for 1 item as for 64 (session 10: a DeBERTa-large
batch, 39 ms either way), throughput is bound by what the host does per request: HTTP,
validation, tokenising, batching, padding, combining, JSON. Each network here returns
zeros of the shape its adapter reads, at once, and everything around it runs as served:
so the requests/s of this server bound the real one on any device, and its event loop's
CPU per request says what the host spends. Embeddings come back 8 wide, not 384: pooling
them is device work on a GPU, not host work. The packed forwards run eagerly here (a stand-in
network is not traced): the mask, the head's read and the pooling are a few dozen ops
called from Python per forward that the served server runs inside one graph call, so this
bound is a little low.

`python -m benchmarks.free_forwards --config C --port P --cache-dir D` serves it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from service.config import RewardConfig, ServiceSettings
from service.memory import share_one_heap
from service.models import RewardModel, load_models
from service.models.packed_heads import PackedScalarHead
from service.models.row_packing import PackedBatch

EMBEDDING_WIDTH = 8


class FreeNetwork:
    """Stands in for a transformers model: the output fields an adapter reads, as zeros."""

    def __init__(self, real: Any, output: str) -> None:
        self.config, self.dtype = real.config, real.dtype  # what adapters read of a model
        self._output = output

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> SimpleNamespace:
        rows, length = input_ids.shape
        if self._output == "logits":
            return SimpleNamespace(
                logits=torch.zeros(rows, self.config.num_labels, device=input_ids.device)
            )
        return SimpleNamespace(
            last_hidden_state=torch.ones(rows, length, EMBEDDING_WIDTH, device=input_ids.device)
        )


# Each adapter's packed forward (traced at load) and its eager form, which calls `_model`.
TRACED_FORWARDS = (
    ("_packed_scores", "_eager_packed_scores"),
    ("_packed_forward", "_eager_packed_forward"),
)

# What each adapter kind reads from its network's output.
OUTPUT_BY_KIND = {"sequence_scalar": "logits", "embedding_similarity": "last_hidden_state"}


def make_forwards_free(models: list[RewardModel]) -> list[RewardModel]:
    """Swap every model's network for a `FreeNetwork`; host models have none to swap."""
    for model in models:
        real = getattr(model, "_model", None)
        if real is None:
            continue
        if model.kind not in OUTPUT_BY_KIND:
            raise ValueError(f"no free stand-in for a {model.kind} model ({model.name})")
        model._model = FreeNetwork(real, OUTPUT_BY_KIND[model.kind])  # type: ignore[attr-defined]
        for traced, eager in TRACED_FORWARDS:  # back to the eager call, whose network is free
            if hasattr(model, traced):
                setattr(model, traced, getattr(model, eager))
        head: PackedScalarHead | None = getattr(model, "_head", None)
        if head is not None:  # packed rows: the backbone and the head are called apart
            model._head = dataclasses.replace(  # type: ignore[attr-defined]
                head,
                hidden=_free_packed_hidden,
                head=lambda read: torch.zeros(len(read), 1, device=read.device),
            )
    return models


def _free_packed_hidden(packed: PackedBatch) -> torch.Tensor:
    return torch.zeros(*packed.input_ids.shape, EMBEDDING_WIDTH, device=packed.input_ids.device)


def load_free_models(config: RewardConfig, cache_dir: Path) -> list[RewardModel]:
    return make_forwards_free(load_models(config, cache_dir))


def main() -> int:
    share_one_heap()  # the server's heap policy (service.memory)
    from service.serving import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--front-ends", type=int, default=0, help="as `alarm-serve serve`'s")
    args = parser.parse_args()
    settings = ServiceSettings(
        config=args.config,
        port=args.port,
        cache_dir=args.cache_dir,
        log_level="warning",
        front_ends=args.front_ends,
    )
    child_command = [sys.executable, "-m", "benchmarks.free_forwards", *sys.argv[1:]]
    return serve(settings, load=load_free_models, child_command=child_command)


if __name__ == "__main__":
    sys.exit(main())
