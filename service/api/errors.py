"""The single place where errors become HTTP responses with a machine-readable body."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.errors import AlarmError, ClientDisconnected

log = logging.getLogger(__name__)


def error_response(
    status: int,
    error_type: str,
    message: str,
    request_id: str | None,
    details: list[dict[str, Any]] | None = None,
    retry_after_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": error_type, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    if retry_after_s:
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after_s)))}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Keep only JSON-safe fields: pydantic's ctx may hold exception objects.
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e.get("type")}
        for e in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    async def on_alarm_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AlarmError)
        return error_response(
            exc.http_status,
            exc.error_type,
            exc.message,
            _request_id(request),
            retry_after_s=exc.retry_after_s,
            headers={"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None,
        )

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        details = _validation_details(exc)
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        message = f"{'.'.join(first['loc'])}: {first['msg']}"
        return error_response(422, "invalid_request", message, _request_id(request), details)

    async def on_client_gone(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's, raised while the body is read: the same hang-up as ClientDisconnected.
        gone = ClientDisconnected("the client closed the connection before its body arrived")
        return await on_alarm_error(request, gone)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        # Raised by the framework, never by our code: unknown routes and methods, and bodies
        # that FastAPI could not read, which it reports as a 400 chained to the cause.
        assert isinstance(exc, HTTPException)
        cause = exc.__cause__
        if isinstance(cause, AlarmError):  # the size cap on a chunked body (middleware)
            return await on_alarm_error(request, cause)
        if isinstance(cause, ClientDisconnect):
            return await on_client_gone(request, cause)
        if exc.status_code == 400:  # invalid UTF-8, nesting too deep: as malformed JSON
            reason = f"{type(cause).__name__}: {cause}" if cause else exc.detail
            message = f"body: cannot be parsed as JSON ({reason})"
            return error_response(422, "invalid_request", message, _request_id(request))
        error_type = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return error_response(
            exc.status_code, error_type, str(exc.detail), _request_id(request), headers=exc.headers
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error", _request_id(request))

    app.add_exception_handler(AlarmError, on_alarm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
