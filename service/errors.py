"""One error vocabulary for the service and the single table that maps it to HTTP.

Lower layers raise these domain errors; only `service.api` turns them into responses.
"""

from __future__ import annotations


class AlarmError(Exception):
    """Base of every error the service reports to a client."""

    error_type: str = "internal_error"
    http_status: int = 500
    retry_after_s: float | None = None  # sent as Retry-After when set

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidRequest(AlarmError):
    """The request is well-formed JSON but asks for something the service cannot do."""

    error_type = "invalid_request"
    http_status = 422


class PayloadTooLarge(AlarmError):
    """Too many items, or a text longer than the configured limit."""

    error_type = "payload_too_large"
    http_status = 413


def check_item_count(count: int, limit: int) -> None:
    """The request item limit, stated once for every place that counts items."""
    if count > limit:
        raise PayloadTooLarge(f"{count} items exceed max_items_per_request={limit}")


class Overloaded(AlarmError):
    """The bounded queue is full; the client should retry after a pause."""

    error_type = "overloaded"
    http_status = 503
    retry_after_s = 1.0


class Unauthorized(AlarmError):
    """A scoring route was called without a valid API key."""

    error_type = "unauthorized"
    http_status = 401


class TooManyRequests(AlarmError):
    """This trainer is over its own limit; other trainers are unaffected."""

    error_type = "too_many_requests"
    http_status = 429
    retry_after_s = 1.0


class NotReady(AlarmError):
    """Models are still loading or the service is shutting down."""

    error_type = "not_ready"
    http_status = 503
    retry_after_s = 2.0


class ModelFailure(AlarmError):
    """A model raised while scoring a batch; only that batch's items fail."""

    error_type = "model_failure"
    http_status = 500


class DeadlineExceeded(AlarmError):
    """The request's deadline passed before its items reached a model; the work was dropped."""

    error_type = "deadline_exceeded"
    http_status = 504


class ClientDisconnected(AlarmError):
    """The client hung up before its answer; nobody reads this status (nginx's 499)."""

    error_type = "client_disconnected"
    http_status = 499


class ConfigError(ValueError):
    """The configuration is invalid; raised at start-up, never while serving."""
