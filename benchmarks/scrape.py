"""alarm-serve's own figures between two scrapes of its `/metrics`, and the same batch
figures for an in-process limit, so that both sides of a load point read alike."""

from __future__ import annotations

from benchmarks.limit import LimitResult
from benchmarks.models import RULE_MODEL
from service.supervisor import FRONT_ENDS_GROUP


def _by_label(metrics_text: str, name: str, label: str) -> dict[str, float]:
    """A metric's samples by the value of its one label."""
    prefix = f'{name}{{{label}="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.split()[-1])
        for line in metrics_text.splitlines()
        if line.startswith(prefix)
    }


def _counter_sum(metrics_text: str, name: str) -> float:
    """A per-model counter summed over the device models (the host rule pads nothing)."""
    by_model = _by_label(metrics_text, name, "model")
    return sum(value for model, value in by_model.items() if model != RULE_MODEL)


def padding_efficiency(before: str, after: str) -> float:
    real = _counter_sum(after, "alarm_real_tokens_total") - _counter_sum(
        before, "alarm_real_tokens_total"
    )
    padded = _counter_sum(after, "alarm_padded_tokens_total") - _counter_sum(
        before, "alarm_padded_tokens_total"
    )
    return real / padded if padded else float("nan")


def thread_cpu_seconds(metrics_text: str) -> dict[str, float]:
    """alarm-serve's CPU seconds by thread group (`alarm_thread_cpu_seconds_total`)."""
    return _by_label(metrics_text, "alarm_thread_cpu_seconds_total", "threads")


BatchFigures = dict[str, dict[str, float]]  # model -> batches, items_per_batch, mean_forward_ms


def _batch_figures(
    batches: dict[str, float], items: dict[str, float], seconds: dict[str, float]
) -> BatchFigures:
    """Per device model (not the host rule, which runs no forward): batches run, items per
    batch and mean forward ms."""
    return {
        model: {
            "batches": count,
            "items_per_batch": items[model] / count,
            "mean_forward_ms": 1000 * seconds[model] / count,
        }
        for model, count in batches.items()
        if count and model != RULE_MODEL
    }


def batch_stats(before: str, after: str) -> BatchFigures:
    """Each model's batches between two scrapes, their mean size and forward time. A GPU
    bound by its host prices a forward by the call: fewer, fuller batches are what pays."""

    def grown(name: str) -> dict[str, float]:
        earlier = _by_label(before, name, "model")
        later = _by_label(after, name, "model")
        return {model: value - earlier.get(model, 0.0) for model, value in later.items()}

    return _batch_figures(
        grown("alarm_forward_duration_seconds_count"),
        grown("alarm_batch_size_items_sum"),
        grown("alarm_forward_duration_seconds_sum"),
    )


def limit_batch_stats(result: LimitResult) -> BatchFigures:
    """The same figures for an in-process limit's forwards."""
    return _batch_figures(
        {model: float(count) for model, count in result.batches_by_model.items()},
        {model: float(result.items) for model in result.batches_by_model},
        result.seconds_by_model,
    )


def batch_line(stats: BatchFigures) -> str:
    return ", ".join(
        f"{model} {s['items_per_batch']:.1f} items {s['mean_forward_ms']:.1f} ms"
        for model, s in stats.items()
    )


def host_cpu_share(before: str, after: str) -> float:
    """The host's share of the server's CPU between two scrapes: the event loop's (HTTP,
    JSON, batching), the tokenizer threads' and a split server's front-end processes'
    seconds over theirs plus the forwards' (NaN without per-thread clocks)."""
    start, end = thread_cpu_seconds(before), thread_cpu_seconds(after)
    used = {group: end[group] - start.get(group, 0.0) for group in end}
    host = sum(used.get(group, 0.0) for group in ("event_loop", "tokenize", FRONT_ENDS_GROUP))
    total = host + sum(seconds for group, seconds in used.items() if group.startswith("device:"))
    return host / total if total > 0 else float("nan")
