"""RewardClient (sync) and AsyncRewardClient: one pooled httpx client each, same rules."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import httpx

from trainer_client._errors import ProtocolError, RewardClientError, ServerUnavailable
from trainer_client._protocol import (
    CallPlan,
    Item,
    RetryableReply,
    ServerLimits,
    check_status,
    chunks,
    normalize_items,
    parse_models,
    parse_reply,
    positions_in_call,
    transport_error,
    with_caller_ids,
)
from trainer_client._types import RetryPolicy, RewardBatch, RewardReply, Timeouts


def _with_key(headers: dict[str, str] | None, api_key: str | None) -> dict[str, str]:
    """The server maps each API key to a trainer name (fairness, limits, metrics)."""
    merged = dict(headers or {})
    if api_key:
        merged["Authorization"] = f"Bearer {api_key}"
    return merged


# How the body came over the wire; the reply rebuilt from its decoded bytes has neither.
_BODY_FRAMING = {b"content-encoding", b"content-length", b"transfer-encoding"}


class _AttemptTimedOut(Exception):
    """Internal: one attempt's reply was still coming in when its time ran out."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no whole reply within {seconds} s")
        self.seconds = seconds


class _Abandoned(Exception):
    """Internal: another chunk of the same call failed, so this one stops."""


class _ClientBase:
    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        timeouts: Timeouts,
        retry: RetryPolicy,
        chunk_size: int | None,
        max_concurrency: int,
        mode: str | None,
        seed: int | None,
    ) -> None:
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.timeouts = timeouts
        self.retry = retry
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.mode = mode
        self._rng = random.Random(seed)
        self._next_replica = itertools.count(self._rng.randrange(len(self.base_urls)))
        self._server_limits: ServerLimits | None = None

    def _plan(self, deadline: float) -> CallPlan:
        first = next(self._next_replica) % len(self.base_urls)
        return CallPlan(self.base_urls, first, self.retry, deadline, self._rng)

    def _attempt_s(self, plan: CallPlan) -> float:
        """What one attempt may take, its whole reply read: `read_s`, or less near the end."""
        return max(0.001, min(self.timeouts.read_s, plan.remaining_s()))

    def _timeout(self, plan: CallPlan) -> httpx.Timeout:
        read = self._attempt_s(plan)
        return httpx.Timeout(read, connect=min(self.timeouts.connect_s, read))

    @staticmethod
    def _timed_out(url: str, seconds: float) -> ServerUnavailable:
        return ServerUnavailable(f"no whole reply from {url} within {seconds:.3g} s")

    @staticmethod
    def _deadline_header(plan: CallPlan) -> dict[str, str]:
        """The call's remaining budget, so the server drops work this call will not wait for."""
        return {"X-Request-Deadline-Ms": f"{max(plan.remaining_s(), 0.001) * 1000:.0f}"}

    def _chunk_size(self) -> int:
        limits = self._server_limits
        limit = limits.items_per_request if limits else 64
        if limits and limits.items_in_flight:
            limit = min(limit, limits.items_in_flight)
        return min(self.chunk_size or limit, limit)

    def _chunks_at_once(self, chunk_size: int) -> int:
        """Chunks of one call in flight together: `max_concurrency`, but no more items than
        the server lets one trainer have unanswered; beyond that it answers 429, and a large
        call would spend its retries waiting on its own chunks. Not that many per replica:
        rotation, retries and failover may send every chunk to one of them."""
        limits = self._server_limits
        if limits is None or limits.items_in_flight is None:
            return self.max_concurrency
        return min(self.max_concurrency, max(1, limits.items_in_flight // chunk_size))

    def _payload(self, chunk: list[dict[str, Any]], mode: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {"items": chunk}
        if mode or self.mode:
            payload["mode"] = mode or self.mode
        return payload

    @staticmethod
    def _assemble(caller_ids: list[str | None], replies: list[RewardReply]) -> RewardBatch:
        definitions = {r.reward_definition for r in replies}
        if len(definitions) > 1:
            raise ProtocolError(
                f"replicas served different reward definitions: {sorted(definitions)}"
            )
        results = [result for reply in replies for result in reply.results]
        return RewardBatch(with_caller_ids(results, caller_ids), definitions.pop())


async def _closed_at_loop_shutdown(pool: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """Started in a loop, then left suspended: the loop's shutdown (`asyncio.run` finalises
    every async generator before it closes its loop) runs this one's clean-up, which
    closes the pool's connections while their loop can still do it."""
    try:
        yield
    finally:
        await pool.aclose()


class AsyncRewardClient(_ClientBase):
    """Scores (prompt, response) items through one or several alarm-serve replicas."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        chunk_size: int | None = None,
        max_concurrency: int = 8,
        mode: str | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            base_urls,
            timeouts=timeouts,
            retry=retry,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            mode=mode,
            seed=seed,
        )
        limits = httpx.Limits(max_connections=max_concurrency * len(self.base_urls))
        self._new_pool = functools.partial(
            httpx.AsyncClient,
            headers=_with_key(headers, api_key),
            transport=transport,
            limits=limits,
        )
        self._pool = self._new_pool()
        self._pool_loop: asyncio.AbstractEventLoop | None = None  # the loop its connections use
        self._pool_closer: AsyncGenerator[None, None] | None = None
        self._own_transport = transport is None  # a transport of the caller's outlives pools
        self._closed = False

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client for good: later calls raise, in this loop or any other."""
        self._closed = True
        if self._pool_loop is None or self._pool_loop is asyncio.get_running_loop():
            await self._pool.aclose()
        # else: its loop has closed (the pool with it, or with the collector) or is still
        # open elsewhere, and only that loop can close its connections.

    async def _loop_pool(self) -> httpx.AsyncClient:
        """The connection pool of the running event loop. Pooled connections belong to the
        loop that opened them, and `asyncio.run` closes its loop when it returns: a trainer
        that calls `asyncio.run` once per step gets a pool of its own in each loop, closed
        as that loop shuts down, instead of "Event loop is closed" on its second step."""
        if self._closed:
            raise RuntimeError("this AsyncRewardClient is closed")
        loop = asyncio.get_running_loop()
        if self._pool_loop is loop:
            return self._pool
        if self._pool_loop is not None:
            if not self._pool_loop.is_closed():
                raise RuntimeError(
                    "this AsyncRewardClient's connections belong to another event loop that "
                    "is still open: use one client per event loop, or close the other loop"
                )
            if not self._pool.is_closed and not self._own_transport:
                # A loop closed without finalising its async generators (`loop.close()`
                # alone) left its connections in the caller's transport, which the next
                # pool would share: they would fail in this loop, after the request went out.
                raise RuntimeError(
                    "the event loop this AsyncRewardClient last used was closed without "
                    "shutting down its async generators, leaving its connections in the "
                    "transport you passed: run each loop with asyncio.run, or call "
                    "loop.run_until_complete(loop.shutdown_asyncgens()) before loop.close()"
                )
            # With the client's own transport the old connections close when the old pool
            # is collected.
            self._pool = self._new_pool()
        self._pool_loop = loop
        self._pool_closer = _closed_at_loop_shutdown(self._pool)
        await anext(self._pool_closer)
        return self._pool

    async def _request(
        self,
        method: str,
        path: str,
        deadline: float,
        sent: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        plan = self._plan(deadline)
        while True:
            url = plan.url() + path
            attempt_s = self._attempt_s(plan)
            try:
                async with asyncio.timeout(attempt_s):
                    response = await (await self._loop_pool()).request(
                        method,
                        url,
                        timeout=self._timeout(plan),
                        headers=self._deadline_header(plan),
                        **kwargs,
                    )
                if sent is not None:
                    return parse_reply(response, sent)
                check_status(response)
                return response
            except httpx.TransportError as exc:
                delay = plan.next_delay(transport_error(url, exc), None)
            except TimeoutError:  # the reply was still coming in when the attempt's time ran out
                delay = plan.next_delay(self._timed_out(url, attempt_s), None)
            except RetryableReply as retry:
                delay = plan.next_delay(retry.error, retry.retry_after_s)
            await asyncio.sleep(delay)

    async def models(self) -> dict[str, Any]:
        """The server's `/v1/models`: models, combination parameters and limits."""
        deadline = time.monotonic() + self.timeouts.total_s
        response = await self._request("GET", "/v1/models", deadline)
        info, self._server_limits = parse_models(response)
        return info

    async def score(self, items: Sequence[Item], *, mode: str | None = None) -> RewardBatch:
        """Every item's reward, in input order, or a typed error: never a partial result."""
        deadline = time.monotonic() + self.timeouts.total_s
        payload, caller_ids = normalize_items(items)
        if not payload:
            return RewardBatch([], "")
        if self._server_limits is None:
            await self.models()
        size = self._chunk_size()
        gate = asyncio.Semaphore(self._chunks_at_once(size))

        async def bounded(start: int, chunk: list[dict[str, Any]]) -> RewardReply:
            async with gate:
                try:
                    return await self._request(
                        "POST", "/v1/rewards", deadline, chunk, json=self._payload(chunk, mode)
                    )
                except RewardClientError as error:
                    if not start:
                        raise
                    raise positions_in_call(error, start) from error

        tasks = [
            asyncio.ensure_future(bounded(i * size, c)) for i, c in enumerate(chunks(payload, size))
        ]
        try:
            replies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        return self._assemble(caller_ids, list(replies))

    async def rewards(self, items: Sequence[Item], *, mode: str | None = None) -> list[float]:
        return (await self.score(items, mode=mode)).rewards

    async def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """Block until at least one replica answers `/readyz` with 200."""
        deadline = time.monotonic() + timeout_s
        while True:
            for url in self.base_urls:
                try:
                    response = await (await self._loop_pool()).get(f"{url}/readyz", timeout=2.0)
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"no replica ready after {timeout_s} s: {self.base_urls}")
            await asyncio.sleep(0.2)


class RewardClient(_ClientBase):
    """The synchronous twin of AsyncRewardClient; chunks go out on a small thread pool."""

    def __init__(
        self,
        base_urls: str | Sequence[str],
        *,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        chunk_size: int | None = None,
        max_concurrency: int = 8,
        mode: str | None = None,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            base_urls,
            timeouts=timeouts,
            retry=retry,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            mode=mode,
            seed=seed,
        )
        limits = httpx.Limits(max_connections=max_concurrency * len(self.base_urls))
        self._http = httpx.Client(
            headers=_with_key(headers, api_key), transport=transport, limits=limits
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="reward")

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        deadline: float,
        sent: list[dict[str, Any]] | None = None,
        abandoned: threading.Event | None = None,
        **kwargs: Any,
    ) -> Any:
        """One logical request, retried; `abandoned` set: stop at the next read or retry."""
        abandoned = abandoned or threading.Event()
        plan = self._plan(deadline)
        while True:
            url = plan.url() + path
            try:
                response = self._attempt(method, url, plan, abandoned, **kwargs)
                if sent is not None:
                    return parse_reply(response, sent)
                check_status(response)
                return response
            except httpx.TransportError as exc:
                delay = plan.next_delay(transport_error(url, exc), None)
            except _AttemptTimedOut as timed_out:
                delay = plan.next_delay(self._timed_out(url, timed_out.seconds), None)
            except RetryableReply as retry:
                delay = plan.next_delay(retry.error, retry.retry_after_s)
            if abandoned.wait(delay):
                raise _Abandoned

    def _attempt(
        self, method: str, url: str, plan: CallPlan, abandoned: threading.Event, **kwargs: Any
    ) -> httpx.Response:
        """One HTTP attempt, its whole reply read within `_attempt_s`: httpx's own timeout
        bounds each read, so a reply that trickles in would otherwise hold the call. The
        clock is read between reads, so a read that stalls can still end one read timeout
        later (a thread cannot interrupt a blocked socket read; the async client can)."""
        if abandoned.is_set():
            raise _Abandoned
        attempt_s = self._attempt_s(plan)
        give_up_at = time.monotonic() + attempt_s
        headers = self._deadline_header(plan)
        timeout = self._timeout(plan)
        with self._http.stream(method, url, timeout=timeout, headers=headers, **kwargs) as reply:
            body = bytearray()
            for part in reply.iter_bytes():  # decoded, as a plain request's content is
                body += part
                if abandoned.is_set():
                    raise _Abandoned
                if time.monotonic() > give_up_at:
                    raise _AttemptTimedOut(attempt_s)
        # As bytes: a header that is not ASCII (an echoed X-Request-ID) must not break it.
        kept = [(k, v) for k, v in reply.headers.raw if k.lower() not in _BODY_FRAMING]
        return httpx.Response(
            reply.status_code, headers=kept, content=bytes(body), request=reply.request
        )

    def models(self) -> dict[str, Any]:
        """The server's `/v1/models`: models, combination parameters and limits."""
        deadline = time.monotonic() + self.timeouts.total_s
        info, self._server_limits = parse_models(self._request("GET", "/v1/models", deadline))
        return info

    def score(self, items: Sequence[Item], *, mode: str | None = None) -> RewardBatch:
        """Every item's reward, in input order, or a typed error: never a partial result."""
        deadline = time.monotonic() + self.timeouts.total_s
        payload, caller_ids = normalize_items(items)
        if not payload:
            return RewardBatch([], "")
        if self._server_limits is None:
            self.models()
        abandoned = threading.Event()  # one chunk failed: the others stop, not retry on
        size = self._chunk_size()
        gate = threading.Semaphore(self._chunks_at_once(size))
        futures = [
            self._pool.submit(self._send_chunk, gate, i * size, c, deadline, abandoned, mode)
            for i, c in enumerate(chunks(payload, size))
        ]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:  # the first failure in input order among those done
                if future in done and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
            replies = [f.result() for f in futures]
        finally:
            abandoned.set()
            for future in futures:
                future.cancel()
        return self._assemble(caller_ids, replies)

    def _send_chunk(
        self,
        gate: threading.Semaphore,
        start: int,
        chunk: list[dict[str, Any]],
        deadline: float,
        abandoned: threading.Event,
        mode: str | None,
    ) -> RewardReply:
        """One chunk of a call, sent once `gate` lets it out (`_chunks_at_once`)."""
        while not gate.acquire(timeout=0.05):  # returns at once when a chunk ends
            if abandoned.is_set():
                raise _Abandoned
        try:
            return self._request(
                "POST", "/v1/rewards", deadline, chunk, abandoned, json=self._payload(chunk, mode)
            )
        except RewardClientError as error:
            if not start:
                raise
            raise positions_in_call(error, start) from error
        finally:
            gate.release()

    def rewards(self, items: Sequence[Item], *, mode: str | None = None) -> list[float]:
        return self.score(items, mode=mode).rewards

    def wait_until_ready(self, timeout_s: float = 300.0) -> None:
        """Block until at least one replica answers `/readyz` with 200."""
        deadline = time.monotonic() + timeout_s
        while True:
            for url in self.base_urls:
                try:
                    if self._http.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"no replica ready after {timeout_s} s: {self.base_urls}")
            time.sleep(0.2)
