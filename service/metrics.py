"""Every Prometheus metric of the service, declared once on an injected registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.batching import BatchStats, DropReason
from service.thread_cpu import ThreadCpu

# From 0.25 ms: queue waits sit under the default 5 ms max wait, GPU forwards and the
# service's own overhead per request are a few ms.
_LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class ServiceMetrics:
    """Named metrics with low-cardinality labels: route, status code, model name and the
    configured trainers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.thread_cpu = ThreadCpu(
            "alarm_thread_cpu_seconds",
            "CPU seconds of the server's threads by group: event_loop (request handling, "
            "JSON, batching), tokenize (tokenising, host-side rules), device:<device> (the "
            "forwards with their inputs' packing and outputs' copies); threads a library "
            "starts itself are in no group",
        )
        registry.register(self.thread_cpu)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "alarm_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "alarm_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "alarm_queue_wait_seconds",
            "Time an item waited before its batch ran",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "alarm_batch_size_items",
            "Items per executed batch",
            ["model"],
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "alarm_batch_padded_tokens",
            "Padded tokens per batch: what the forwards computed (rows x longest, or the packed "
            "rows' total)",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self.real_tokens = Counter(
            "alarm_real_tokens_total",
            "Unpadded tokens run through each model",
            ["model"],
            registry=registry,
        )
        self.padded_tokens = Counter(
            "alarm_padded_tokens_total",
            "Padded tokens run through each model",
            ["model"],
            registry=registry,
        )
        self.forward_seconds = Histogram(
            "alarm_forward_duration_seconds",
            "Batch forward latency (incl. device queue)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "alarm_queue_depth_items",
            "Items waiting to be batched",
            ["model"],
            multiprocess_mode="livesum",  # set by the engine process only
            registry=registry,
        )
        self.in_flight = Gauge(
            "alarm_in_flight_items",
            "Admitted items not yet answered",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.items_scored = Counter(
            "alarm_items_scored_total",
            "Items scored by each model",
            ["model"],
            registry=registry,
        )
        self.batch_failures = Counter(
            "alarm_batch_failures_total",
            "Batches whose forward raised",
            ["model"],
            registry=registry,
        )
        self.rejected = Counter(
            "alarm_rejected_items_total",
            "Items refused by admission control: queue_full (503) or trainer_limit (429)",
            ["reason"],
            registry=registry,
        )
        for reason in ("queue_full", "trainer_limit"):  # shown at zero from the start
            self.rejected.labels(reason)
        self.dropped = Counter(
            "alarm_dropped_items_total",
            "Admitted items dropped before a model ran them: deadline passed, or caller gone",
            ["model", "reason"],
            registry=registry,
        )
        self.oom_splits = Counter(
            "alarm_oom_splits_total",
            "Batches halved and retried after the device ran out of memory",
            ["model"],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "alarm_cache_lookups_total",
            "Items looked up in each model's output cache, by result (hit or miss)",
            ["model", "result"],
            registry=registry,
        )
        self.encoded_texts = Counter(
            "alarm_encoded_texts_total",
            "Texts the models asked to tokenise, by outcome: encoded, or reused (the same "
            "request, or one tokenised with it, had already encoded that text with an "
            "identical tokenizer)",
            ["outcome"],
            registry=registry,
        )
        # Bound once: observed by the tokenizer threads after every call.
        self._texts_encoded = self.encoded_texts.labels("encoded")
        self._texts_reused = self.encoded_texts.labels("reused")

        self.trainer_items = Counter(
            "alarm_trainer_items_total",
            "Items admitted, by trainer",
            ["trainer"],
            registry=registry,
        )
        self.trainer_rejected = Counter(
            "alarm_trainer_rejected_items_total",
            "Items refused, by trainer and reason",
            ["trainer", "reason"],
            registry=registry,
        )
        self.trainer_rate_limited = Counter(
            "alarm_trainer_rate_limited_requests_total",
            "Requests refused by the per-trainer request rate limit",
            ["trainer"],
            registry=registry,
        )
        self.trainer_in_flight = Gauge(
            "alarm_trainer_in_flight_items",
            "Admitted items not yet answered, by trainer",
            ["trainer"],
            multiprocess_mode="livesum",  # set by the engine process only
            registry=registry,
        )

    def labelled(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: `labels()` takes a lock and builds its
        key on every call, and the scoring path calls it per request and per batch. Label
        values are few (models, routes, statuses, configured trainers), so is this cache."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def register_trainers(self, trainers: list[str]) -> None:
        """Show every configured trainer at zero; no other label values are ever created."""
        for trainer in trainers:
            self.trainer_items.labels(trainer)
            self.trainer_in_flight.labels(trainer)
            self.trainer_rate_limited.labels(trainer)

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        self.labelled(self.batch_size, model).observe(stats.size)
        if stats.padded_tokens:  # host models (rules, grammar) run no tokens
            self.labelled(self.batch_tokens, model).observe(stats.padded_tokens)
            self.labelled(self.real_tokens, model).inc(stats.real_tokens)
            self.labelled(self.padded_tokens, model).inc(stats.padded_tokens)
        self.labelled(self.forward_seconds, model).observe(stats.run_s)
        wait = self.labelled(self.queue_wait_seconds, model)
        for seconds in stats.queue_wait_s:
            wait.observe(seconds)
        if stats.failed or stats.failed_items:
            self.labelled(self.batch_failures, model).inc()
        if not stats.failed:
            self.labelled(self.items_scored, model).inc(stats.size - stats.failed_items)

    def observe_dropped(self, model: str, reason: DropReason, count: int) -> None:
        self.labelled(self.dropped, model, reason).inc(count)

    def observe_encodings(self, encoded: int, reused: int) -> None:
        self._texts_encoded.inc(encoded)
        self._texts_reused.inc(reused)
