"""A light asyncio load generator (one process): C clients, each sending k-item requests."""

from __future__ import annotations

import asyncio
import itertools
import resource
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    items_per_request: int
    seconds: float
    requests: int
    items_per_s: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    generator_cpu_s: float  # CPU the load generator itself used (it shares the cores)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    url: str,
    path: str,
    items: list[dict[str, str]],
    concurrency: int,
    items_per_request: int,
    duration_s: float,
    payload_key: str = "items",
) -> LoadResult:
    """Closed loop for `duration_s`: each client sends its next request when one returns."""
    cursor = itertools.count()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        stop_at = time.perf_counter() + duration_s

        async def one_client() -> None:
            while time.perf_counter() < stop_at:
                start = next(cursor) * items_per_request
                chunk = [items[(start + i) % len(items)] for i in range(items_per_request)]
                sent = time.perf_counter()
                try:
                    reply = await client.post(path, json={payload_key: chunk})
                    if reply.status_code == 200:
                        latencies.append(time.perf_counter() - sent)
                        continue
                    key = f"http_{reply.status_code}"
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1

        cpu_before, started = _cpu_s(), time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu_before
    ordered = sorted(latencies) or [float("nan")]
    return LoadResult(
        concurrency=concurrency,
        items_per_request=items_per_request,
        seconds=elapsed,
        requests=len(latencies),
        items_per_s=len(latencies) * items_per_request / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        errors=errors,
        generator_cpu_s=cpu,
    )
