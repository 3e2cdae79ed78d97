"""What the sync and async clients share: payloads, chunking, reply checks, retry decisions.

No I/O here, so both clients run exactly the same rules.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from trainer_client._errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    RewardClientError,
    ServerError,
    ServerUnavailable,
    Unauthorized,
)
from trainer_client._types import RetryPolicy, RewardReply, RewardResult

Item = Mapping[str, Any] | tuple[str, str]


def normalize_items(items: Sequence[Item]) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Accept (prompt, response) pairs or dicts. Every item sent gets an id, to check
    attribution; the second list holds the caller's own ids (None where the client made one
    up), which the results carry back."""
    payload = []
    caller_ids: list[str | None] = []
    for index, item in enumerate(items):
        if isinstance(item, tuple):
            prompt, response = item
            entry: dict[str, Any] = {"prompt": prompt, "response": response}
        else:
            entry = {"prompt": item["prompt"], "response": item["response"]}
            if item.get("id") is not None:
                entry["id"] = str(item["id"])
        for text_field in ("prompt", "response"):
            _check_text(entry[text_field], f"items.{index}.{text_field}")
        caller_ids.append(entry.get("id"))
        entry.setdefault("id", f"#{index}")
        payload.append(entry)
    return payload, caller_ids


def _check_text(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{where} is not valid Unicode ({exc.reason})") from exc


def chunks(items: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class RetryableReply(Exception):
    """Internal: this attempt failed in a way worth retrying (maybe on another replica)."""

    def __init__(self, error: RewardClientError, retry_after_s: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date (as proxies send it)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):  # year 99999999999, offset +99999999999
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max((when - datetime.datetime.now(datetime.UTC)).total_seconds(), 0.0)


def _error_message(response: httpx.Response) -> tuple[str, object]:
    try:
        body = response.json()
        return str(body["error"]["message"]), body
    except (ValueError, KeyError, TypeError):
        return response.text[:500], response.text[:500]


def check_status(response: httpx.Response) -> None:
    """Raise the typed error for a non-2xx reply (RetryableReply for 429/503)."""
    status = response.status_code
    if status < 300:
        return
    message, body = _error_message(response)
    text = f"HTTP {status} from {response.request.url}: {message}"
    if status in (429, 503):
        error_type = Overloaded if status == 429 or "overloaded" in str(body) else ServerUnavailable
        raise RetryableReply(error_type(text, status=status, body=body), _retry_after(response))
    if status == 401:
        raise Unauthorized(text, status=status, body=body)
    if 400 <= status < 500:
        raise InvalidRequest(text, status=status, body=body)
    raise ServerError(text, status=status, body=body)


def parse_reply(response: httpx.Response, sent: list[dict[str, Any]]) -> RewardReply:
    """Validate a 200 reply: schema, one result per item, each at its own item."""
    check_status(response)
    try:
        reply = RewardReply.model_validate(json.loads(response.content))
    except (ValueError, ValidationError) as exc:
        raise ProtocolError(f"malformed reply from {response.request.url}: {exc}") from exc
    got_ids = [r.id for r in reply.results]
    want_ids = [item["id"] for item in sent]
    if got_ids != want_ids:
        raise ProtocolError(
            f"reply from {response.request.url} does not match the request: "
            f"{len(got_ids)} results for {len(want_ids)} items, or ids out of order"
        )
    return reply


def parse_models(response: httpx.Response) -> tuple[dict[str, Any], int]:
    """`/v1/models`'s reply and the items a request may hold, or ProtocolError."""
    check_status(response)
    try:
        info = json.loads(response.content)
        max_items = int(info["limits"]["max_items_per_request"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # int(1e999) overflows
        raise ProtocolError(f"malformed reply from {response.request.url}: {exc!r}") from exc
    if max_items < 1:
        raise ProtocolError(f"{response.request.url} allows {max_items} items per request")
    return info, max_items


def with_caller_ids(results: list[RewardResult], caller_ids: list[str | None]) -> list[Any]:
    """Each result under its caller's id: None where the client made the id up."""
    return [
        r if r.id == caller_id else r.model_copy(update={"id": caller_id})
        for r, caller_id in zip(results, caller_ids, strict=True)
    ]


@dataclass
class CallPlan:
    """Retry bookkeeping for one logical request: replica rotation, backoff and deadline.

    A replica's Retry-After holds back only the next attempt on that replica: a call whose
    next attempt goes to another replica tries it at once."""

    urls: Sequence[str]
    first: int
    policy: RetryPolicy
    deadline: float
    rng: random.Random
    attempt: int = 0
    not_before: dict[int, float] = field(default_factory=dict)  # replica -> monotonic time

    def _replica(self) -> int:
        return (self.first + self.attempt) % len(self.urls)

    def url(self) -> str:
        return self.urls[self._replica()]

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def next_delay(self, error: RewardClientError, retry_after_s: float | None) -> float:
        """Delay before the next attempt, or raise `error` (or DeadlineExceeded) to give up."""
        if retry_after_s:
            self.not_before[self._replica()] = time.monotonic() + retry_after_s
        self.attempt += 1
        if self.attempt >= self.policy.max_attempts:
            raise type(error)(
                f"gave up after {self.attempt} attempts: {error}",
                status=error.status,
                body=error.body,
            ) from error
        # A different replica can be tried at once; the same one gets exponential backoff.
        rounds = self.attempt // len(self.urls)
        backoff = (
            0.0
            if self.attempt % len(self.urls)
            else min(
                self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** max(rounds - 1, 0)
            )
        )
        backoff *= 1 + self.policy.jitter * (2 * self.rng.random() - 1)
        asked = self.not_before.get(self._replica(), 0.0) - time.monotonic()
        delay = max(backoff, asked, 0.0)  # never sooner than that replica asked
        if delay >= self.remaining_s():
            raise DeadlineExceeded(
                f"deadline passed after {self.attempt} attempts; last error: {error}",
                status=error.status,
                body=error.body,
            ) from error
        return delay


def transport_error(url: str, exc: Exception) -> ServerUnavailable:
    return ServerUnavailable(f"{type(exc).__name__} talking to {url}: {exc}")
