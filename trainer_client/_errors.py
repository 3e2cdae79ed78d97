"""The client's errors, in one hierarchy. A reward is never silently None or zero: when the
client cannot return every reward of a call, it raises one of these.

    RewardClientError
    ├── InvalidRequest        the server refused the input (4xx other than 429); not retried
    │   └── Unauthorized      401: missing or wrong API key
    ├── ServerError           the server failed (5xx other than 503 and 504, e.g. a model
    │                         failure)
    ├── ProtocolError         the reply is malformed, misordered or from mixed definitions
    └── ServerUnavailable     no replica answered in time (connection errors, 503 storms)
        ├── Overloaded        the last answer was 503 overloaded or 429 (after retries)
        └── DeadlineExceeded  the call's total deadline passed before an answer (here, or
                              at the server: its 504)
"""

from __future__ import annotations


class RewardClientError(Exception):
    """Base of every error the client raises."""

    def __init__(self, message: str, *, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class InvalidRequest(RewardClientError):
    pass


class Unauthorized(InvalidRequest):
    pass


class ServerError(RewardClientError):
    pass


class ProtocolError(RewardClientError):
    pass


class ServerUnavailable(RewardClientError):
    pass


class Overloaded(ServerUnavailable):
    pass


class DeadlineExceeded(ServerUnavailable):
    pass
