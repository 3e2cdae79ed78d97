"""A light asyncio load generator (one process): C clients, each sending k-item requests.

It shares the machine's cores with the server it measures, so it speaks HTTP/1.1 itself
over one keep-alive connection per client (a request is a few bytes written and a
response header parsed): a general-purpose client such as httpx costs several times more
CPU per request, which the server under test would lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import resource
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit


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


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads whole responses."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The open connection's streams, opening it first if it is not open."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        return self._streams

    async def post_json(self, path: str, payload: object) -> tuple[int, bytes]:
        """(status, body). Reconnects when the server closed the connection."""
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        reader, writer = await self.connect()
        try:
            writer.write(head + body)
            status, headers = self._parse_head(await reader.readuntil(b"\r\n\r\n"))
            if headers.get("transfer-encoding", "").lower() == "chunked":
                content = await self._read_chunked(reader)
            else:
                content = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    @staticmethod
    def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), headers

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the empty trailer
        return b"".join(parts)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run_load(
    url: str,
    path: str,
    items: list[dict[str, str]],
    concurrency: int,
    items_per_request: int,
    duration_s: float,
    timeout_s: float = 300.0,
) -> LoadResult:
    """Closed loop for `duration_s`: each client sends its next request when one returns.

    Every client connects before the clock starts, as trainers keep their connections (at
    C=256 k=1, 256 connects beside about 400 requests in a 4 s round). A connect that fails
    is counted as an error, and the client's first request connects again.
    """
    cursor = itertools.count()
    latencies: list[float] = []
    errors: dict[str, int] = {}

    def count(error: str) -> None:
        errors[error] = errors.get(error, 0) + 1

    async def connect(connection: HttpConnection) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await connection.connect()
        except (OSError, TimeoutError) as exc:
            count(type(exc).__name__)

    async def one_client(connection: HttpConnection) -> None:
        while time.perf_counter() < stop_at:
            start = next(cursor) * items_per_request
            chunk = [items[(start + i) % len(items)] for i in range(items_per_request)]
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(timeout_s):
                    status, _ = await connection.post_json(path, {"items": chunk})
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                count(type(exc).__name__)
                continue
            if status == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                count(f"http_{status}")

    connections = [HttpConnection(url) for _ in range(concurrency)]
    try:
        await asyncio.gather(*map(connect, connections))
        cpu_before, started = _cpu_s(), time.perf_counter()
        stop_at = started + duration_s
        await asyncio.gather(*map(one_client, connections))
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu_before
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
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
