"""What the sync and async clients share: payloads, chunking, reply checks, retry decisions.

No I/O here, so both clients run exactly the same rules.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def normalize_items(items: Sequence[Item]) -> list[dict[str, Any]]:
    """Accept (prompt, response) pairs or dicts; give every item an id to check attribution."""
    payload = []
    for index, item in enumerate(items):
        if isinstance(item, tuple):
            prompt, response = item
            entry: dict[str, Any] = {"prompt": prompt, "response": response}
        else:
            entry = {"prompt": item["prompt"], "response": item["response"]}
            if item.get("id") is not None:
                entry["id"] = str(item["id"])
        for field in ("prompt", "response"):
            _check_text(entry[field], f"items.{index}.{field}")
        entry.setdefault("id", f"#{index}")
        payload.append(entry)
    return payload


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
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


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


def strip_client_ids(results: list[RewardResult], items: list[dict[str, Any]]) -> list[Any]:
    """Ids the client invented (#n) are not the caller's: report them as None."""
    return [
        r.model_copy(update={"id": None}) if str(item["id"]).startswith("#") else r
        for r, item in zip(results, items, strict=True)
    ]


@dataclass
class CallPlan:
    """Retry bookkeeping for one logical request: replica rotation, backoff and deadline."""

    urls: Sequence[str]
    first: int
    policy: RetryPolicy
    deadline: float
    rng: random.Random
    attempt: int = 0

    def url(self) -> str:
        return self.urls[(self.first + self.attempt) % len(self.urls)]

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def next_delay(self, error: RewardClientError, retry_after_s: float | None) -> float:
        """Delay before the next attempt, or raise `error` (or DeadlineExceeded) to give up."""
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
        delay = max(backoff, retry_after_s or 0.0)  # never sooner than the server asked
        if delay >= self.remaining_s():
            raise DeadlineExceeded(
                f"deadline passed after {self.attempt} attempts; last error: {error}",
                status=error.status,
                body=error.body,
            ) from error
        return delay


def transport_error(url: str, exc: Exception) -> ServerUnavailable:
    return ServerUnavailable(f"{type(exc).__name__} talking to {url}: {exc}")
