"""The benchmark's own HTTP client reads every response framing a server may send."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from benchmarks.load import HttpConnection, LoadResult, run_load


async def serve(replies: list[bytes]) -> tuple[asyncio.Server, list[int]]:
    """A raw HTTP server answering each request with the next canned reply, in turn;
    records how many connections it accepted."""
    connections: list[int] = []
    turn = iter(range(10_000))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                reply = replies[next(turn) % len(replies)]
                writer.write(reply)
                await writer.drain()
                if b"connection: close" in reply.lower():
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


CHUNKED = (
    b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n'
)
SIZED_THEN_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
SIZED = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
OVERLOADED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


async def test_chunked_and_sized_bodies_and_a_closed_connection_are_all_read_whole():
    server, connections = await serve([CHUNKED, SIZED_THEN_CLOSE])
    port = server.sockets[0].getsockname()[1]
    connection = HttpConnection(f"http://127.0.0.1:{port}")
    try:
        assert await connection.post_json("/x", {"q": 1}) == (200, b'{"a": 1}')
        assert await connection.post_json("/x", {"q": 2}) == (200, b"{}")
        # The server closed after the second reply: the third request reconnects.
        assert await connection.post_json("/x", {"q": 3}) == (200, b'{"a": 1}')
    finally:
        await connection.close()
        server.close()
    assert len(connections) == 2


async def test_the_load_counts_answers_and_errors_by_status():
    server, _ = await serve([CHUNKED, OVERLOADED])
    port = server.sockets[0].getsockname()[1]
    try:
        result = await run_load(
            f"http://127.0.0.1:{port}", "/x", [{"prompt": "p", "response": "r"}], 2, 3, 0.2
        )
    finally:
        server.close()
    answered, overloaded = result.requests, result.errors.get("http_503", 0)
    assert answered > 0 and overloaded > 0
    assert abs(answered - overloaded) <= 2  # the two replies alternate
    assert set(result.errors) == {"http_503"}
    assert result.items_per_s == answered * 3 / result.seconds


Opener = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def load_connecting_through(
    monkeypatch: pytest.MonkeyPatch, make_opener: Callable[[Opener], Opener], concurrency: int
) -> tuple[LoadResult, list[int]]:
    """A 0.1 s load of a server that answers every request, its clients connecting through
    `make_opener(asyncio.open_connection)`: the result, and the connections accepted."""
    server, connections = await serve([SIZED])
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(asyncio, "open_connection", make_opener(asyncio.open_connection))
    try:
        result = await run_load(
            f"http://127.0.0.1:{port}",
            "/x",
            [{"prompt": "p", "response": "r"}],
            concurrency,
            1,
            0.1,
        )
    finally:
        server.close()
    return result, connections


async def test_the_clock_starts_once_every_client_is_connected(monkeypatch):
    """Trainers keep their connections: opening C of them is not part of a measured load."""
    connect_s = 1.0

    def slowed(open_connection: Opener) -> Opener:
        async def slow(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
            await asyncio.sleep(connect_s)
            return await open_connection(*args, **kwargs)

        return slow

    result, connections = await load_connecting_through(monkeypatch, slowed, 16)
    assert len(connections) == 16 and result.requests >= 16 and not result.errors
    assert result.seconds < connect_s


async def test_a_connect_that_fails_before_the_clock_is_counted_and_made_again(monkeypatch):
    calls = []

    def refused_once(open_connection: Opener) -> Opener:
        async def refuse_first(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionRefusedError("refused once")
            return await open_connection(*args, **kwargs)

        return refuse_first

    result, connections = await load_connecting_through(monkeypatch, refused_once, 4)
    assert result.errors == {"ConnectionRefusedError": 1}
    assert len(calls) == 5 and len(connections) == 4 and result.requests >= 4
