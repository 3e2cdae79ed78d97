"""A batch that runs out of device memory is halved and retried, down to single items.

A GPU's memory is shared with whatever else runs there, a host's with every process on
it; a batch the token budget allows may still not fit. Failing the whole batch would fail
every request in it, so the halves are retried, and only an item that fails alone gets a
`ModelFailure`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from service.errors import ModelFailure

log = logging.getLogger(__name__)
In = TypeVar("In")
Out = TypeVar("Out")


# What torch's RuntimeErrors say when an allocation fails: CUDA's caching allocator (older
# torch), and the host's ("DefaultCPUAllocator: can't allocate memory: you tried to
# allocate N bytes"), which has no class of its own.
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (a RuntimeError), or a RuntimeError whose message says
    an allocation failed: an older "CUDA out of memory", or a CPU forward's.

    Matched by name and message so that this module never has to import torch.
    """
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in message for m in OUT_OF_MEMORY_MESSAGES)


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's free blocks back before a retry, if torch is in use."""
    torch: Any = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_halving_on_oom(
    run: Callable[[Sequence[In]], Sequence[Out]],
    batch: Sequence[In],
    on_split: Callable[[], None],
    model_name: str,
) -> list[Out | ModelFailure]:
    """`run(batch)`; on out-of-memory, halve the batch and retry each half, recursively.

    Results stay in input order. A single item that still runs out of memory gets a
    `ModelFailure` in place of its result; any other error fails the whole call.
    """
    try:
        return list(run(batch))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        reason = f"{type(exc).__name__}: {exc}"
    # Retried outside the `except` block: the error's traceback holds the failed forward's
    # tensors, which must be released before the cache is emptied and a half runs.
    release_cached_memory()
    if len(batch) <= 1:
        log.error("model %s ran out of memory on a single item: %s", model_name, reason)
        message = f"model {model_name!r} ran out of device memory on a single item"
        return [ModelFailure(message) for _ in batch]
    on_split()
    half = len(batch) // 2
    return run_halving_on_oom(run, batch[:half], on_split, model_name) + run_halving_on_oom(
        run, batch[half:], on_split, model_name
    )
