"""A single-item request that finds the engine idle: tokenised and run in one device call.

Through the batcher, a lone item's inputs go to a tokenizer thread (every device model's,
one after another), back to the event loop, through the batcher and on to a device
thread, and its result comes back through the loop again. With nothing else in flight no
other item can share its batch, so each device model tokenises and runs the item in its
own device thread, in one call on a free device slot: fewer thread hand-offs, and the
models tokenise side by side. Each model has a memo of its own: models that share a
tokenizer and a text encode it once each, side by side (one shared memo would make the
second wait for the first's tokenizer call), a price paid only while the engine is idle.
On the 2-core VM at one single-item client this took the time from `score` to the first
forward from 0.98 to 0.55 ms (medians) and served 1.5 % more items/s in paired rounds
(benchmarks/HISTORY.md, session 36).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.batching import BatchSizeMismatch, BatchStats
from service.models import ModelOutput, Prepared, RewardModel, prepare_items
from service.models.encoding_memo import EncodingMemo

Forward = Callable[[list[Prepared]], Sequence[ModelOutput | BaseException]]


@dataclass(frozen=True)
class LoneRun:
    """What one call did. `prepared` is None when tokenising failed; `error` is tokenising's
    or the forward's exception, and then `outputs` is empty."""

    prepared: Prepared | None
    outputs: Sequence[ModelOutput | BaseException]
    error: Exception | None
    waited_s: float  # from submission until a device thread took the call
    run_s: float  # the forward alone, tokenising not included


def prepare_and_run(
    model: RewardModel,
    pair: tuple[str, str],
    forward: Forward,
    memo: EncodingMemo,
    submitted: float,
) -> LoneRun:
    """In a device thread: `pair` tokenised, then `forward` on it. Never raises an
    `Exception`: the caller, on the event loop, decides what a failure means."""
    started = time.monotonic()
    waited_s = started - submitted
    try:
        (prepared,) = prepare_items(model, [pair], memo)
    except Exception as exc:
        return LoneRun(None, (), exc, waited_s, 0.0)
    forward_started = time.monotonic()
    try:
        outputs = forward([prepared])
        if len(outputs) != 1:
            raise BatchSizeMismatch(f"batch of 1 item returned {len(outputs)}")
    except Exception as exc:
        return LoneRun(prepared, (), exc, waited_s, time.monotonic() - forward_started)
    return LoneRun(prepared, outputs, None, waited_s, time.monotonic() - forward_started)


def lone_batch_stats(
    run: LoneRun, padded_count: Callable[[list[Prepared]], int] | None
) -> BatchStats | None:
    """The run as the batcher reports a batch of one; None when nothing reached a forward.
    `padded_count` is the model's own count of the tokens it computes, where it has one."""
    prepared = run.prepared
    if prepared is None:
        return None
    padded = padded_count([prepared]) if padded_count else len(prepared.rows) * prepared.length
    return BatchStats(
        size=1,
        rows=len(prepared.rows),
        real_tokens=prepared.tokens,
        padded_tokens=padded,
        queue_wait_s=(run.waited_s,),
        run_s=run.run_s,
        failed=run.error is not None,
        failed_items=sum(isinstance(output, BaseException) for output in run.outputs),
    )
