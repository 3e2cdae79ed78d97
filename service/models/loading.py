"""Loading and placement shared by the transformers adapters: paths, dtypes, devices, ids."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.config import BatchingConfig
from service.errors import ConfigError
from service.padding_cuts import cheapest_cuts

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def place(device: str, model_index: int) -> str:
    """Map a configured device to a concrete one; `auto` spreads models over visible GPUs."""
    if device == "auto":
        count = torch.cuda.device_count()
        return f"cuda:{model_index % count}" if count else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but no CUDA device is visible")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist")
        return f"cuda:{index}"
    return device


def fingerprint(resolved_path: str, extra: dict[str, Any]) -> str:
    """Identify the model files (names, sizes, config) plus adapter settings, cheaply.

    Hashing every weight byte of a 13B model would take minutes at start-up; names, sizes
    and config.json change whenever the weights are replaced in practice.
    """
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    folder = Path(resolved_path)
    if resolved_path and folder.is_dir():  # Path("") is the working directory: never walk it
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}".encode())
        config = folder / "config.json"
        if config.exists():
            digest.update(config.read_bytes())
    else:
        digest.update(resolved_path.encode())
    return "sha256:" + digest.hexdigest()[:16]


def load_tokenizer(resolved_path: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer from {resolved_path!r}: {exc}") from exc


# Spec fields that change where and how fast a model runs, not what it scores (to float
# rounding): left out of the fingerprint, so moving a model to another GPU, compiling it or
# packing its rows keeps its definition.
PLACEMENT_FIELDS: set[str] = {"device", "compile", "pack_rows", "trace_packed"}


def load_pretrained(
    auto_class: Any, resolved_path: str, dtype: str, device: str, **options: Any
) -> Any:
    """`auto_class.from_pretrained` on `device`, in eval mode; `options` go to it as well
    (config overrides, `key_mapping`)."""
    try:
        model = auto_class.from_pretrained(resolved_path, dtype=DTYPES[dtype], **options)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model from {resolved_path!r}: {exc}") from exc
    if device.startswith("cuda"):
        attend_without_shape_plans()
    return model.to(device).eval()


def position_table_rows(model: Any) -> int | None:
    """The longest row a model's learned absolute position table admits, or None where no
    such table bounds a row (rotary or relative positions: Llama, DeBERTa-v3). RoBERTa-like
    tables (a `padding_idx`) count positions from the pad id + 1, and so hold that many
    fewer rows' positions than their size."""
    limits = [
        module.num_embeddings - (0 if module.padding_idx is None else module.padding_idx + 1)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
        and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe")  # BERT-likes, GPT-2
    ]
    return min(limits, default=None)


def check_max_length(name: str, max_length: int, model: Any) -> None:
    """Refuse, at load, a `max_length` longer than the model's position table: a row past
    it fails its whole forward, and with it every other item (other requests' too) batched
    with it, though each of them scores alone."""
    rows = position_table_rows(model)
    if rows is not None and max_length > rows:
        positions = getattr(model.config, "max_position_embeddings", rows)
        raise ConfigError(
            f"{name}: max_length {max_length} is longer than the model's position table "
            f"allows ({rows} tokens; max_position_embeddings {positions}): set max_length "
            f"to at most {rows}"
        )


# A checkpoint that stores its scalar head as `regression_head` on a `model.` backbone
# (UltraRM-13b's LlamaRewardModel: `regression_head(hidden)` read at the last token) is
# transformers' sequence classifier with its head named apart: loaded as one, head mapped.
REGRESSION_HEAD = "regression_head.weight"
REGRESSION_HEAD_AS_SCORE = {"num_labels": 1, "key_mapping": {r"^regression_head\.": "score."}}


def scalar_head_options(resolved_path: str) -> dict[str, Any]:
    """`load_pretrained` options for a sequence-classification RM: the regression head
    mapped onto `score` where the checkpoint has `regression_head.weight` and no
    `score.weight` (else transformers initialises `score` at random), none otherwise."""
    names = checkpoint_weight_names(resolved_path)
    if REGRESSION_HEAD in names and "score.weight" not in names:
        return dict(REGRESSION_HEAD_AS_SCORE)
    return {}


def checkpoint_weight_names(resolved_path: str) -> set[str]:
    """The weight names a checkpoint (folder or hub id) stores, read from its index, its
    safetensors header or its pickled state dict mapped to no memory (no weight is read);
    empty where none is found or read (`from_pretrained` then reports what it finds)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(
            resolved_path,
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )

    try:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if found := find(index):
                return set(json.loads(Path(found).read_text())["weight_map"])
        if found := find("model.safetensors"):
            with safe_open(found, framework="pt") as weights:
                return set(weights.keys())
        if found := find("pytorch_model.bin"):
            return set(torch.load(found, map_location="meta", weights_only=True, mmap=True))
    # A gated repo, a file torch cannot map (saved before torch 1.6), ...: loaded as it is.
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError):
        pass
    return set()


def attend_without_shape_plans() -> None:
    """Keep SDPA off cuDNN's attention, which builds an execution plan for every input
    shape it meets: a server's batches take a new shape almost every time (rows' lengths,
    packed widths, bin counts). On an H200 that plan cost a relevance batch tens of ms on
    each first visit (benchmarks/RESULTS.md, session 25). Process-wide, as PyTorch's
    backend switches are, and left so."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def compiled(model: Any, resolved_path: str, device: str) -> Any:
    """`torch.compile` with dynamic shapes (every batch is a new batch x length), compiled
    here at load so that no trainer's request waits for it. Call it once the model's config
    is final (pad token set): the compiled graph reads it.

    Dynamo specialises sizes 0 and 1, so single-row batches get a graph of their own: both
    are compiled, on one and on two rows. The compiled module forwards attribute reads
    (`config`, ...) to the model.
    """
    fast = torch.compile(model, dynamic=True)
    try:
        with torch.inference_mode():
            for rows in (1, 2):
                ids = torch.zeros((rows, 8), dtype=torch.long, device=device)
                fast(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as exc:  # inductor's errors have no common base (compiler, codegen, ...)
        raise ConfigError(f"cannot compile model from {resolved_path!r}: {exc}") from exc
    return fast


def runtime_details(model_config: Any, compile: bool) -> dict[str, Any]:
    """What /v1/models reports of how a transformers model runs (SDPA or eager attention)."""
    return {
        "architecture": model_config.architectures,
        "attention": getattr(model_config, "_attn_implementation", None),
        "compiled": compile,
    }


def ensure_pad_token(tokenizer: Any, model: Any) -> int:
    """Decoder RMs often ship without a pad token; reuse eos so batches can be padded."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return int(tokenizer.pad_token_id)


def to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """A host array on `device`; for a GPU through pinned memory, so the copy does not
    wait for the GPU's queue."""
    tensor = torch.from_numpy(array)
    if device.startswith("cuda"):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to one (B, L) id tensor and its attention mask, on `device`.

    The ids are laid into the mask's true cells in one step, not padded row by row in
    Python (1.6 ms for 64 rows of 30 to 300 tokens, against 0.5). For a GPU both tensors are
    built in pinned host memory, so their copies are asynchronous.
    """
    lengths = torch.tensor([len(r) for r in rows])  # (B,)
    flat = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())
    )
    real = torch.arange(int(lengths.max())) < lengths[:, None]  # (B, L)
    ids = torch.full(real.shape, pad_id, dtype=torch.long)
    ids[real] = torch.from_numpy(flat)  # row-major: each row's tokens, in order
    mask = real.long()
    if device.startswith("cuda"):
        ids, mask = ids.pin_memory(), mask.pin_memory()
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def intra_op_threads(workers: int) -> int:
    """torch threads for each of `workers` forwards running at once: a share of torch's
    default (the cores, or OMP_NUM_THREADS), at least one."""
    return max(1, torch.get_num_threads() // workers)


def set_intra_op_threads(threads: int) -> None:
    """Run in each device worker thread: OpenMP's thread count is per calling thread."""
    torch.set_num_threads(threads)


def tokenise_in_callers_threads() -> None:
    """Turn off the tokenizers library's own thread pool, unless TOKENIZERS_PARALLELISM is
    set: the engine tokenises in threads of its own beside forwards that keep every core
    busy, and the pool would wake more threads onto those cores for a request's few texts.
    One item's tokenising in process: 0.21 ms against 0.31. At one single-item client, per
    paired round 1.015x, 1.027x and 1.009x the items/s without the pool (medians of 16
    rounds, three runs); level at C=64 k=1, C=8 k=16, C=1 k=16 (HISTORY.md, session 29)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def forward_overhead_tokens(device: str) -> int:
    """What one extra forward call costs, in padded tokens of compute. Measured on MiniLM
    on a 2-core CPU: 12.5 ms for a 4-token call against 0.17 to 0.19 ms per token in batches
    of 64 x 32 to 64 x 64 tokens, so ~50 to 70 tokens. On one thread (two forwards at once)
    a token costs about twice as much, so ~26 to 46, but 38 in the server cost 13 % at 64
    single-item clients (3 paired rounds) for 6 % at 1 and 8: kept at 64. On an H100
    (`benchmarks/forward_overhead.py`, bf16) a call cost 4,631 tokens on a DeBERTa-large
    RM and 6,915 on MiniLM: kernel launches dwarf small batches' compute. 4096 was set
    before that measurement and is kept until the server is compared with a larger figure
    on a GPU (in-process, no cut beat this one by 1.28x at batch 64 and lost by 0.95x at 32)."""
    return 64 if device == "cpu" else 4096


def call_overhead_tokens(device: str, batching: BatchingConfig) -> int:
    """The configured `forward_overhead_tokens`, else the measured figure for `device`."""
    if batching.forward_overhead_tokens is not None:
        return batching.forward_overhead_tokens
    return forward_overhead_tokens(device)


def length_sorted_chunks(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Row indices, shortest first, cut into chunks run as separate forwards.

    Cut where padded tokens + `overhead_tokens` per forward call is least
    (`cheapest_cuts`). For adapters whose item is several rows of unequal length (a short
    prompt, long sentences), where one rectangle over the batch would pad every row to the
    longest.
    """
    by_length: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        by_length.setdefault(lengths[index], []).append(index)
    distinct = tuple(by_length)  # ascending: filled in sorted order
    counts = tuple(len(by_length[length]) for length in distinct)
    return [
        [index for length in distinct[start:end] for index in by_length[length]]
        for start, end in _cuts_of_length_counts(distinct, counts, overhead_tokens)
    ]


@functools.lru_cache(maxsize=256)
def _cuts_of_length_counts(
    distinct: tuple[int, ...], counts: tuple[int, ...], overhead_tokens: int
) -> tuple[tuple[int, int], ...]:
    """Cached: after a forward has cut its rows (device thread), the batcher counts that
    batch's padded tokens (event loop) from the same cuts, and need not find them again
    (1.6 ms of the event loop's time for 200 rows). A tuple: every caller shares it."""
    tokens = [n * length for n, length in zip(counts, distinct, strict=True)]
    return tuple(cheapest_cuts(distinct, counts, tokens, overhead_tokens))


def chunked_padded_tokens(lengths: Sequence[int], overhead_tokens: int) -> int:
    """Padded tokens of `length_sorted_chunks`: what the forward passes really compute."""
    return sum(
        len(chunk) * max(lengths[i] for i in chunk)
        for chunk in length_sorted_chunks(lengths, overhead_tokens)
    )


def truncate_keeping_specials(
    ids: Sequence[int], special_ids: set[int], max_length: int, side: str
) -> tuple[list[int], list[int]]:
    """Cut `ids` to `max_length` from `side`, keeping a leading/trailing special token.

    Returns the kept ids and, for each, its index in the original `ids`, so callers can map
    positions they care about (or learn that they were cut).
    """
    if len(ids) <= max_length:
        return list(ids), list(range(len(ids)))
    # The kept specials fit in `max_length` too (an LM's prompt may get one token of room).
    head = 1 if max_length > 0 and ids[0] in special_ids else 0
    tail = 1 if max_length > head and ids[-1] in special_ids else 0
    budget = max_length - head - tail
    lo = head if side == "right" else len(ids) - tail - budget
    origin = [*range(head), *range(lo, lo + budget), *range(len(ids) - tail, len(ids))]
    return [ids[i] for i in origin], origin
