"""The scoring engine: one micro-batcher per model, one worker thread per device slot.

A request's items are tokenised off the event loop (each distinct text once per tokenizer,
however many items and models ask for it), submitted to every model's batcher at once (so
all models of a request score concurrently), gathered, and combined per item. Host models
(rules, no tensors) compute while they prepare and gain nothing from batching: each scores
a request's items in one tokenizer-thread call, without a batcher.
Work whose deadline has passed is dropped before tokenising and again before a forward; a
batch that runs out of device memory is halved and retried (`run_halving_on_oom`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.admission import Admission
from service.batch_forming import BatchLimits
from service.batching import BatchStats, DropReason, MicroBatcher
from service.coalesced_calls import CoalescedCalls, Outcome
from service.combine import CombinedReward, CombineMode, combine_response
from service.config import RewardConfig
from service.device_turns import DeviceTurns
from service.errors import (
    AlarmError,
    DeadlineExceeded,
    ModelFailure,
    NotReady,
)
from service.gil_switch import SwitchInterval
from service.heap_trimmer import HeapTrimmer
from service.lone_request import LoneRun, lone_batch_stats, prepare_and_run
from service.memory import keep_freed_memory
from service.metrics import ServiceMetrics
from service.model_catalog import ModelCatalog
from service.models import (
    AspectScore,
    HolisticScore,
    ModelOutput,
    PrepareCall,
    Prepared,
    RewardModel,
    prepare_items,
    prepare_together,
)
from service.models.encoding_memo import EncodingMemo
from service.models.loading import call_overhead_tokens, intra_op_threads, set_intra_op_threads
from service.out_of_memory import run_halving_on_oom
from service.score_cache import ScoreCache, item_key
from service.thread_cpu import clock_seconds, own_cpu_clock
from service.worker_threads import WorkerThreads

HOST_DEVICE = "host"  # models without tensors: scored in a tokenizer thread, unbatched
log = logging.getLogger(__name__)


def batch_limits(config: RewardConfig, model: RewardModel) -> BatchLimits:
    """One model's batching limits. Batches are cut where padding costs more than a forward
    call, except for host models (no forward) and models that lay out their own rows
    (they cut inside `run`); those that pack their rows take their items oldest first."""
    batching = config.batching
    lays_out_rows = getattr(model, "padded_tokens", None) is not None
    overhead: int | None = None
    if model.device != HOST_DEVICE and not lays_out_rows:
        overhead = call_overhead_tokens(model.device, batching)
    return BatchLimits(
        max_batch_tokens=batching.max_batch_tokens,
        max_batch_size=batching.max_batch_size,
        max_wait_s=batching.max_wait_ms / 1000,
        min_padding_efficiency=batching.min_padding_efficiency,
        forward_overhead_tokens=overhead,
        fill_wait_s=batching.fill_wait_ms / 1000,  # acts in device batchers only
        # Packed rows pad little whatever lengths share a forward: oldest first.
        arrival_order=model.device != HOST_DEVICE
        and lays_out_rows
        and bool(getattr(model, "packs_rows", False)),
    )


def _raise_if_failed(model: RewardModel, outcome: object) -> None:
    """An item's outcome that is an exception, raised as the service's error for it: a
    dropped deadline or a failure with a reason as it is, anything else as a ModelFailure."""
    if isinstance(outcome, AlarmError):
        raise outcome
    if isinstance(outcome, BaseException):
        log.error("model %s failed on a batch: %r", model.name, outcome)
        raise ModelFailure(f"model {model.name!r} failed on this batch") from outcome


def device_slots(device: str, config: RewardConfig) -> int:
    """Forwards run at once on a device: `cpu_workers` on the CPU, `gpu_workers` on a GPU."""
    batching = config.batching
    return batching.cpu_workers if device == "cpu" else batching.gpu_workers


@dataclass(frozen=True)
class ScoreInput:
    prompt: str
    response: str


@dataclass(frozen=True)
class ScoredItem:
    combined: CombinedReward
    truncated: bool


class Catalog(Protocol):
    def reward_definition(self, mode: CombineMode) -> str: ...

    def describe_models(self) -> list[dict[str, Any]]: ...


class ScoringEngine(Protocol):
    """What the HTTP routes need of an engine: this process's `RewardEngine`, or a front-end's
    `service.engine_link.RemoteEngine` for one in another process."""

    @property
    def catalog(self) -> Catalog: ...

    async def score(
        self,
        items: Sequence[ScoreInput],
        mode: CombineMode | None = None,
        trainer: str = "anonymous",
        deadline: float | None = None,
    ) -> list[ScoredItem]: ...


class RewardEngine:
    """Owns the models' batchers and threads; `score` is safe to call concurrently."""

    def __init__(
        self, models: Sequence[RewardModel], config: RewardConfig, metrics: ServiceMetrics
    ) -> None:
        self._models = list(models)
        self._config = config
        self._metrics = metrics
        self._holistic_params = config.holistic_params()
        self._aspect_params = config.aspect_params()
        self._tokenize_pool = WorkerThreads(2, "tokenize")
        # Every model's inputs for the requests that arrive in one turn of the event loop:
        # one thread call, one batched call per tokenizer, forwards that start together; a
        # burst in groups of about one full batch per device model, worked through in order.
        device_models = sum(model.device != HOST_DEVICE for model in self._models)
        self._preparation: CoalescedCalls[PrepareCall, list[Prepared]] = CoalescedCalls(
            self._tokenize_pool,
            self._prepare_together,
            weight=lambda call: len(call[1]),
            max_weight=config.batching.max_batch_size * max(device_models, 1),
        )
        devices = sorted({m.device for m in self._models} - {HOST_DEVICE})
        slots = {device: device_slots(device, config) for device in devices}
        self._device_pools = {
            device: WorkerThreads(
                slots[device],
                f"device-{device}",
                functools.partial(set_intra_op_threads, intra_op_threads(slots[device])),
            )
            for device in devices
        }
        metrics.thread_cpu.watch("tokenize", self._tokenize_pool.cpu_seconds)
        for device, pool in self._device_pools.items():
            metrics.thread_cpu.watch(f"device:{device}", pool.cpu_seconds)
        turns = {device: DeviceTurns(slots[device]) for device in devices}
        self._device_turns = turns
        self._batchers: dict[str, MicroBatcher[Prepared, ModelOutput]] = {
            model.name: MicroBatcher(
                self._runner(model),
                batch_limits(config, model),
                self._observer(model.name),
                self._drop_observer(model.name),
                getattr(model, "padded_tokens", None),
                announced_arrivals=True,
                device_turns=turns[model.device],
                concurrent_batches=slots[model.device],
            )
            for model in self._models
            if model.device != HOST_DEVICE
        }
        self._caches: dict[str, ScoreCache[ModelOutput]] = {
            model.name: ScoreCache(config.cache.max_items) for model in self._models
        }
        self.catalog = ModelCatalog(self._models, config)  # identities, reward definition
        self._admission = Admission(config.batching.max_queue_items, config.limits, metrics)
        self._accepting = False
        self._heap_trimmer = HeapTrimmer(self._tokenize_pool.run)
        self._switch_interval = SwitchInterval()  # batching.gil_switch_interval_ms

    def _observer(self, name: str) -> Callable[[BatchStats], None]:
        """A batch's metrics, and its model's queue depth as the batch leaves it (set only
        at submission and completion, the gauge would stand still through long requests)."""
        depth = self._metrics.labelled(self._metrics.queue_depth, name)

        def observe(stats: BatchStats) -> None:
            self._metrics.observe_batch(name, stats)
            depth.set(self._batchers[name].depth)

        return observe

    def _drop_observer(self, name: str) -> Callable[[DropReason, int], None]:
        return lambda reason, count: self._metrics.observe_dropped(name, reason, count)

    def _runner(
        self, model: RewardModel
    ) -> Callable[[list[Prepared]], Awaitable[Sequence[ModelOutput | BaseException]]]:
        pool = self._device_pools[model.device]
        splits = self._metrics.oom_splits.labels(model.name)

        def run_splitting(batch: list[Prepared]) -> list[ModelOutput | ModelFailure]:
            return run_halving_on_oom(model.run, batch, splits.inc, model.name)

        async def run_on_device(batch: list[Prepared]) -> Sequence[ModelOutput | BaseException]:
            # The halves run in the same worker thread: on a one-slot device (a GPU, unless
            # gpu_workers > 1) nothing else interleaves with them.
            with self._heap_trimmer.forward():
                return await pool.run(run_splitting, batch)

        return run_on_device

    async def start(self) -> None:
        """Start the batchers and warm every model with one real item."""
        # This thread runs the event loop, which lives as long as the engine serves.
        loop_clock = own_cpu_clock()
        self._metrics.thread_cpu.watch("event_loop", lambda: clock_seconds(loop_clock))
        for batcher in self._batchers.values():
            batcher.start()
        self._accepting = True
        keep_freed_memory()  # for reuse by the next forwards; the trimmer gives it back
        self._switch_interval.apply(self._config.batching.gil_switch_interval_ms)
        self._heap_trimmer.start()
        try:
            # Not a trainer's request: bypasses admission, so trainer metrics stay clean.
            await self._score_admitted(
                [ScoreInput("Warm-up question?", "A warm-up answer.")], None, "warm-up"
            )
        except BaseException:  # no stop() follows a failed start: leave the process as found
            await self.stop()  # the batchers, the trimmer, the worker threads, the interval
            raise

    async def stop(self) -> None:
        self._accepting = False
        try:
            await self._heap_trimmer.stop()
            for batcher in self._batchers.values():
                await batcher.stop()
            for pool in (*self._device_pools.values(), self._tokenize_pool):
                pool.shutdown()
        finally:
            self._switch_interval.restore()

    def _prepare_together(self, calls: list[PrepareCall]) -> list[Outcome[list[Prepared]]]:
        """In a tokenizer thread: the calls queued in one turn of the event loop (every
        model's, of every request that arrived in it), their texts encoded together."""
        memo = EncodingMemo()
        outcomes = prepare_together(calls, memo)
        self._metrics.observe_encodings(memo.encoded, memo.reused)
        return outcomes

    async def _score_with(
        self,
        model: RewardModel,
        items: Sequence[ScoreInput],
        owner: str,
        deadline: float | None,
        keys: Sequence[bytes] | None,
        request: object,
    ) -> list[ModelOutput]:
        """One model's outputs for `items`: from the cache where it has them, the rest
        scored once per distinct item (`keys=None`: no cache, every item scored)."""
        if deadline is not None and time.monotonic() >= deadline:
            self._metrics.observe_dropped(model.name, "deadline", len(items))
            raise DeadlineExceeded("the request's deadline passed before scoring started")
        if keys is None:
            return await self._run_model(model, items, owner, deadline, request)
        cache = self._caches[model.name]
        outputs: list[ModelOutput | None] = [cache.get(key) for key in keys]
        misses: dict[bytes, list[int]] = {}
        for index, (key, output) in enumerate(zip(keys, outputs, strict=True)):
            if output is None:
                misses.setdefault(key, []).append(index)
        missed = sum(map(len, misses.values()))
        self._metrics.labelled(self._metrics.cache_lookups, model.name, "hit").inc(
            len(items) - missed
        )
        self._metrics.labelled(self._metrics.cache_lookups, model.name, "miss").inc(missed)
        if misses:
            missed_items = [items[indices[0]] for indices in misses.values()]
            fresh = await self._run_model(model, missed_items, owner, deadline, request)
            for (key, indices), output in zip(misses.items(), fresh, strict=True):
                cache.put(key, output)
                for index in indices:
                    outputs[index] = output
        return outputs  # type: ignore[return-value]  # every None was filled above

    async def _run_model(
        self,
        model: RewardModel,
        items: Sequence[ScoreInput],
        owner: str,
        deadline: float | None,
        request: object,  # the same for every model of one request: kept in one group
    ) -> list[ModelOutput]:
        if model.device == HOST_DEVICE:
            return await self._run_on_host(model, items)
        if self._runs_alone(model, items):
            return [await self._run_alone(model, items[0])]
        batcher = self._batchers[model.name]
        batcher.announce(len(items))  # so that a batch forming now waits for these
        try:
            prepared = await self._preparation.run(
                (model, [(item.prompt, item.response) for item in items]), key=request
            )
        except asyncio.CancelledError:  # the caller left while its items were tokenised
            batcher.withdraw(len(items))
            self._metrics.observe_dropped(model.name, "cancelled", len(items))
            raise
        except Exception as exc:
            batcher.withdraw(len(items))
            log.exception("model %s failed to prepare inputs", model.name)
            raise ModelFailure(f"model {model.name!r} could not tokenise the input") from exc
        futures = [
            batcher.submit(p, p.length, len(p.rows), p.tokens, owner, deadline) for p in prepared
        ]
        queue_depth = self._metrics.labelled(self._metrics.queue_depth, model.name)
        queue_depth.set(batcher.depth)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        queue_depth.set(batcher.depth)
        for outcome in outcomes:
            _raise_if_failed(model, outcome)
        return outcomes  # type: ignore[return-value]

    def _runs_alone(self, model: RewardModel, items: Sequence[ScoreInput]) -> bool:
        """Whether the model takes this one item straight to a device slot, skipping its
        batcher (`service.lone_request`): items come one at a time (none in flight could
        share its batch, and none came together lately: closed-loop clients sending
        together arrive one by one after each round, and the first would run alone), none
        is on its way to the batcher, a slot is free (taken here, when it is), and the
        config does not ask a batch to wait for company (`fill_wait_ms`)."""
        return (
            len(items) == 1
            and self._accepting  # stopping: the device threads may be gone
            and self._admission.one_at_a_time
            and not self._config.batching.fill_wait_ms
            and self._batchers[model.name].idle
            and self._device_turns[model.device].take_free_slot()  # last: it takes the slot
        )

    async def _run_alone(self, model: RewardModel, item: ScoreInput) -> ModelOutput:
        """The item tokenised and run in one device-thread call, on the slot `_runs_alone`
        took. The slot is held until the call ends, even when the caller leaves first, as a
        batch that has started holds its own."""
        turns = self._device_turns[model.device]
        splits = self._metrics.labelled(self._metrics.oom_splits, model.name)
        memo = EncodingMemo()  # the model's own: see `service.lone_request`
        forwarding = contextlib.ExitStack()

        def forward(batch: list[Prepared]) -> list[ModelOutput | ModelFailure]:
            return run_halving_on_oom(model.run, batch, splits.inc, model.name)

        def finished(call: asyncio.Future[LoneRun]) -> None:
            forwarding.close()
            turns.release_slot()
            self._metrics.observe_encodings(memo.encoded, memo.reused)
            if call.cancelled() or call.exception() is not None:  # only if the pool shut down
                return
            stats = lone_batch_stats(call.result(), getattr(model, "padded_tokens", None))
            if stats is not None:
                self._metrics.observe_batch(model.name, stats)

        pair = (item.prompt, item.response)
        try:
            forwarding.enter_context(self._heap_trimmer.forward())
            call = self._device_pools[model.device].run(
                prepare_and_run, model, pair, forward, memo, time.monotonic()
            )
        except BaseException:  # nothing will end the call: give its slot back now
            forwarding.close()
            turns.release_slot()
            raise
        call.add_done_callback(finished)
        run = await asyncio.shield(call)
        if run.prepared is None:
            log.error("model %s failed to prepare inputs", model.name, exc_info=run.error)
            raise ModelFailure(f"model {model.name!r} could not tokenise the input") from run.error
        _raise_if_failed(model, run.error)  # the forward's, as the batcher path raises it
        (output,) = run.outputs
        _raise_if_failed(model, output)
        return output  # type: ignore[return-value]  # not an exception: raised above

    def _score_on_host(
        self, model: RewardModel, items: Sequence[ScoreInput]
    ) -> tuple[list[ModelOutput], float, float]:
        """(outputs, started, finished): a host model's whole work, in a tokenizer thread."""
        started = time.monotonic()
        memo = EncodingMemo()
        outputs = model.run(prepare_items(model, [(i.prompt, i.response) for i in items], memo))
        self._metrics.observe_encodings(memo.encoded, memo.reused)
        return outputs, started, time.monotonic()

    async def _run_on_host(
        self, model: RewardModel, items: Sequence[ScoreInput]
    ) -> list[ModelOutput]:
        """A host model's outputs for `items`, reported to the metrics as one batch."""
        submitted = time.monotonic()
        try:
            outputs, started, finished = await self._tokenize_pool.run(
                self._score_on_host, model, items
            )
        except asyncio.CancelledError:
            self._metrics.observe_dropped(model.name, "cancelled", len(items))
            raise
        except Exception as exc:
            log.exception("model %s failed", model.name)
            # When the call started is unknown: no queue waits, and the time since submitted.
            elapsed = time.monotonic() - submitted
            self._observe_host_batch(model, len(items), (), elapsed, failed=True)
            raise ModelFailure(f"model {model.name!r} failed on this request") from exc
        if len(outputs) != len(items):
            raise ModelFailure(f"model {model.name!r} returned {len(outputs)} of {len(items)}")
        waits = (started - submitted,) * len(items)
        self._observe_host_batch(model, len(items), waits, finished - started)
        return outputs

    def _observe_host_batch(
        self,
        model: RewardModel,
        size: int,
        waits: tuple[float, ...],
        run_s: float,
        failed: bool = False,
    ) -> None:
        stats = BatchStats(size, size, 0, 0, waits, run_s, failed)
        self._metrics.observe_batch(model.name, stats)

    async def score(
        self,
        items: Sequence[ScoreInput],
        mode: CombineMode | None = None,
        trainer: str = "anonymous",
        deadline: float | None = None,
    ) -> list[ScoredItem]:
        """Score every item with every model and combine; results are in input order.

        `deadline` is on the `time.monotonic()` clock: work that has not reached a model by
        then is dropped and the call raises `DeadlineExceeded`.
        """
        if not self._accepting:
            raise NotReady("the service is not accepting work")
        self._admission.admit(trainer, len(items))
        keys = (
            [item_key(item.prompt, item.response) for item in items]
            if self._config.cache.max_items
            else None
        )
        try:
            return await self._score_admitted(items, mode, trainer, deadline, keys)
        finally:
            self._admission.release(trainer, len(items))

    async def _score_admitted(
        self,
        items: Sequence[ScoreInput],
        mode: CombineMode | None,
        owner: str,
        deadline: float | None = None,
        keys: Sequence[bytes] | None = None,
    ) -> list[ScoredItem]:
        request = object()  # its models' tokenising stays in one group (`_preparation`)
        per_model = await asyncio.gather(
            *(self._score_with(m, items, owner, deadline, keys, request) for m in self._models),
            return_exceptions=True,
        )
        outputs_by_model: list[list[ModelOutput]] = []
        for outputs in per_model:
            if isinstance(outputs, BaseException):
                raise outputs
            outputs_by_model.append(outputs)
        return [
            self._combine(item, [outputs[i] for outputs in outputs_by_model], mode)
            for i, item in enumerate(items)
        ]

    def _combine(
        self, item: ScoreInput, outputs: list[ModelOutput], mode: CombineMode | None
    ) -> ScoredItem:
        holistic, *aspects = outputs
        assert isinstance(holistic, HolisticScore)
        segments = {}
        for model, output in zip(self._models[1:], aspects, strict=True):
            assert isinstance(output, AspectScore)
            segments[model.name] = output.segments
        combined = combine_response(
            item.response,
            holistic.raw,
            segments,
            self._holistic_params,
            self._aspect_params,
            mode or self._config.combination.mode,
        )
        if not math.isfinite(combined.reward):  # e.g. fp16 overflow; JSON cannot carry it
            raise ModelFailure("a model produced a non-finite score")
        return ScoredItem(combined, truncated=any(o.truncated for o in outputs))
