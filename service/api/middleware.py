"""Pure-ASGI middleware: request ids, a request-size cap, and per-route HTTP metrics."""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.errors import PayloadTooLarge
from service.metrics import ServiceMetrics


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        max_request_bytes: int,
        route_paths: frozenset[str] = frozenset(),
    ) -> None:
        self._app = app
        self._metrics = metrics
        self._max_request_bytes = max_request_bytes
        # Every route is a fixed path, so a request refused before routing (413 by its
        # Content-Length) is still counted under its route.
        self._route_paths = route_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        # A fresh dict per request: some servers share one lifespan-state dict across requests.
        scope["state"] = {
            **(scope.get("state") or {}),
            "request_id": request_id,
            "received_at": time.monotonic(),  # request deadlines count from here
        }
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The bytes the client sent, back as they came (latin-1 maps each to itself).
                echoed = request_id.encode("latin-1")
                message.setdefault("headers", []).append((b"x-request-id", echoed))
            await send(message)

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self._max_request_bytes:
                response = error_response(
                    413,
                    "payload_too_large",
                    f"request body of {length} bytes exceeds {self._max_request_bytes}",
                    request_id,
                )
                await response(scope, receive, send_with_id)
            else:
                await self._app(scope, _capped(receive, self._max_request_bytes), send_with_id)
        finally:
            route = _route_label(scope, self._route_paths)
            metrics = self._metrics
            metrics.labelled(metrics.requests, route, str(status)).inc()
            metrics.labelled(metrics.request_seconds, route).observe(time.perf_counter() - started)


def _capped(receive: Receive, limit: int) -> Receive:
    """Refuse chunked bodies that grow past the limit without a Content-Length."""
    received = 0

    async def receive_capped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return message

    return receive_capped


def _route_label(scope: Scope, route_paths: frozenset[str]) -> str:
    # Label by route template, never by raw path: unknown paths must not add label values.
    route: Any = scope.get("route")
    if route is not None:
        return str(route.path)
    path = str(scope.get("path", ""))
    if path in route_paths:
        return path  # a framework route (/docs, /openapi.json) or a request refused early
    return "unmatched"
