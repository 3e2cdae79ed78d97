"""Cancel a request's scoring when its client hangs up.

Starlette keeps running a handler after the client has gone, so a trainer that timed out
and retried would have its abandoned items scored anyway, ahead of live work. Cancelling
the handler's scoring cancels the items' futures; the batcher drops them before the model
and counts them in `alarm_dropped_items_total{reason="cancelled"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from service.errors import ClientDisconnected

T = TypeVar("T")


async def _client_gone(request: Request) -> None:
    # Only called once the body is read, so every further message is about the connection:
    # servers answer `http.disconnect` when the client hangs up or the response is done.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnected) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected("the client closed the connection; its work was dropped")
        return await task  # a watcher that failed tells nothing: keep working
    finally:
        watcher.cancel()
        task.cancel()
