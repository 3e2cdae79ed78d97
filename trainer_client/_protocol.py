"""What the sync and async clients share: payloads, chunking, reply checks, retry decisions.

No I/O here, so both clients run exactly the same rules.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import random
import re
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

Item = Mapping[str, Any] | tuple[str, str] | list[str]


def normalize_items(items: Sequence[Item]) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Accept (prompt, response) pairs (tuples, or lists as JSON gives them) or dicts. Every
    item sent gets an id, to check attribution; the second list holds the caller's own ids
    (None where the client made one up), which the results carry back. A caller's id must
    be a string, as the server's are: an int would come back as a str and match nothing."""
    payload = []
    caller_ids: list[str | None] = []
    for index, item in enumerate(items):
        entry = _entry(item, f"items.{index}")
        for text_field in ("prompt", "response"):
            _check_text(entry[text_field], f"items.{index}.{text_field}")
        caller_ids.append(entry.get("id"))
        entry.setdefault("id", f"#{index}")
        payload.append(entry)
    return payload, caller_ids


def _entry(item: object, where: str) -> dict[str, Any]:
    if isinstance(item, Mapping):
        missing = [key for key in ("prompt", "response") if key not in item]
        if missing:
            raise InvalidRequest(f"{where} has no {' or '.join(missing)}")
        entry: dict[str, Any] = {"prompt": item["prompt"], "response": item["response"]}
        item_id = item.get("id")
        if item_id is not None:
            if not isinstance(item_id, str):
                raise InvalidRequest(f"{where}.id must be a string, not {type(item_id).__name__}")
            entry["id"] = item_id
        return entry
    if isinstance(item, tuple | list) and len(item) == 2:
        prompt, response = item
        return {"prompt": prompt, "response": response}
    shape = type(item).__name__
    if isinstance(item, tuple | list):
        shape += f" of {len(item)}"
    raise InvalidRequest(
        f"{where} must be a (prompt, response) pair or a dict with prompt and response, not {shape}"
    )


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


def _error_type(body: object) -> object:
    try:
        return body["error"]["type"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None


def check_status(response: httpx.Response) -> None:
    """Raise the typed error for a non-2xx reply (RetryableReply for 429, 503 and a
    proxy's 504; the server's own 504 is the call's deadline, passed)."""
    status = response.status_code
    if status < 300:
        return
    message, body = _error_message(response)
    text = f"HTTP {status} from {response.request.url}: {message}"
    if status in (429, 503):
        error_type = Overloaded if status == 429 or "overloaded" in str(body) else ServerUnavailable
        raise RetryableReply(error_type(text, status=status, body=body), _retry_after(response))
    if status == 504:
        if _error_type(body) == "deadline_exceeded":  # the budget this call sent ran out there
            raise DeadlineExceeded(text, status=status, body=body)
        # A proxy's timeout: the server behind it may answer a later attempt.
        raise RetryableReply(ServerUnavailable(text, status=status, body=body), None)
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


@dataclass(frozen=True)
class ServerLimits:
    """What `/v1/models` says a call must stay within."""

    items_per_request: int
    items_in_flight: int | None  # one trainer's unanswered items (None: not reported)


def parse_models(response: httpx.Response) -> tuple[dict[str, Any], ServerLimits]:
    """`/v1/models`'s reply and the limits a call's chunks must keep to, or ProtocolError."""
    check_status(response)
    try:
        info = json.loads(response.content)
        limits = info["limits"]
        max_items = int(limits["max_items_per_request"])
        in_flight = limits.get("max_items_in_flight_per_trainer")
        in_flight = None if in_flight is None else int(in_flight)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        # int(1e999) overflows
        raise ProtocolError(f"malformed reply from {response.request.url}: {exc!r}") from exc
    if max_items < 1 or (in_flight is not None and in_flight < 1):
        raise ProtocolError(
            f"{response.request.url} allows {max_items} items per request and {in_flight} in flight"
        )
    return info, ServerLimits(max_items, in_flight)


_ITEM_POSITION = re.compile(r"\bitems\.(\d+)\b")


def positions_in_call(error: RewardClientError, start: int) -> RewardClientError:
    """A chunk's error with the server's item positions (`items.10.id`) counted in the
    caller's whole list, not in the chunk that began at `start`; the body stays the
    server's own."""
    message = _ITEM_POSITION.sub(lambda m: f"items.{int(m.group(1)) + start}", str(error))
    return type(error)(message, status=error.status, body=error.body)


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
