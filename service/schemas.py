"""Wire models (pydantic): what clients send and receive. They become openapi.yaml."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.combine import CombineMode
from service.errors import check_item_count

# The validation context's key for `limits.max_items_per_request` (service.api.lean_route).
MAX_ITEMS = "max_items"
# Unknown fields an object may have before they are refused with one error, not one each.
MAX_UNKNOWN_FIELDS = 16


def _require_valid_unicode(text: str) -> str:
    # JSON escapes can smuggle lone surrogates that no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode ({exc.reason})") from exc
    return text


def _item_limit(items_per_entry: int) -> Callable[[object, ValidationInfo], object]:
    """A before-validator refusing a list whose entries hold more items than the request
    limit, before any entry is validated: a body of 400,000 empty items (1.2 MB) took 12 s
    of the event loop to answer with its 800,000 errors, and a valid one 1.4 s to refuse."""

    def within_item_limit(entries: object, info: ValidationInfo) -> object:
        limit = (info.context or {}).get(MAX_ITEMS)
        if limit is not None and isinstance(entries, list):
            check_item_count(items_per_entry * len(entries), limit)
        return entries

    return within_item_limit


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Wire):
    """What clients send. Only these pay for the check below: response models are built
    per item on the event loop, where a Python validator each nearly doubled their cost."""

    @model_validator(mode="before")
    @classmethod
    def _few_unknown_fields(cls, data: object) -> object:
        """`extra="forbid"` reports each unknown field: an object with a million of them
        would be a million errors built on the event loop. Past a few, one error says so."""
        known = len(cls.model_fields)
        if isinstance(data, dict) and len(data) > known + MAX_UNKNOWN_FIELDS:
            raise ValueError(f"{len(data)} fields, of which at most {known} are known")
        return data


class RewardItem(_Request):
    prompt: str = Field(description="The prompt (question and any context) given to the policy.")
    response: str = Field(description="The policy's response to score.")
    id: str | None = Field(None, max_length=256, description="Echoed back in the result.")

    @field_validator("prompt", "response")
    @classmethod
    def _encodable(cls, text: str) -> str:
        return _require_valid_unicode(text)


class RewardRequest(_Request):
    items: list[RewardItem] = Field(min_length=1, description="Items to score, in order.")
    mode: CombineMode | None = Field(None, description="Combination mode; default from config.")
    deadline_ms: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        strict=True,  # a number: `true` is not 1 ms, nor "5000" 5 s
        description=(
            "The client's remaining budget in milliseconds, counted from when the server "
            "receives the request. Work not yet scored when it runs out is dropped and the "
            "request fails with 504 deadline_exceeded. Overrides the X-Request-Deadline-Ms "
            "header."
        ),
    )

    _items_within_limit = field_validator("items", mode="before")(_item_limit(1))


class HolisticResult(_Wire):
    raw: float | None = Field(description="Model output h (None when nothing to score).")
    normalized: float = Field(description="r_h = (h - mu) / sigma, or the degenerate floor.")


class SegmentResult(_Wire):
    start: int = Field(description="Start character offset in the response.")
    end: int = Field(description="End character offset (exclusive); the reward sits here.")
    raw: float | None = Field(description="Raw aspect value; None when unscored (truncated).")
    reward: float | None = Field(description="w * s(scale * (raw + shift)); None if unscored.")


class AspectResult(_Wire):
    value: float = Field(description="Sum of this aspect's segment rewards, before the gate.")
    segments: list[SegmentResult]


class DenseReward(_Wire):
    end: int = Field(description="Character end offset in the response.")
    reward: float


class RewardResult(_Wire):
    id: str | None
    reward: float = Field(description="Sequence-level total: the sum of `dense`.")
    holistic: HolisticResult
    gate_passed: bool = Field(description="r_h >= threshold.")
    aspects_applied: bool = Field(description="Whether aspect rewards are included in `dense`.")
    degenerate: bool = Field(description="Empty or too short: the holistic floor was used.")
    aspects: dict[str, AspectResult]
    dense: list[DenseReward] = Field(
        description="Rewards keyed to character end offsets; holistic at end == len(response)."
    )
    truncated: bool = Field(description="Some model saw a truncated input.")


class RewardResponse(_Wire):
    results: list[RewardResult]
    reward_definition: str = Field(
        description="sha256 of the models, their versions and every combination parameter."
    )


class OpenRLHFRequest(BaseModel):
    """OpenRLHF's remote reward-model request (`--remote_rm_url`)."""

    model_config = ConfigDict(extra="ignore")  # OpenRLHF versions add fields freely

    query: list[str] = Field(description="Full texts: prompt followed by response.")
    prompts: list[str] | None = Field(None, description="The prompt prefix of each query.")
    labels: list[Any] | None = Field(None, description="Accepted and ignored.")

    _lists_within_limit = field_validator("query", "prompts", mode="before")(_item_limit(1))

    @field_validator("query", "prompts")
    @classmethod
    def _encodable(cls, texts: list[str] | None) -> list[str] | None:
        for text in texts or []:
            _require_valid_unicode(text)
        return texts


class OpenRLHFResponse(_Wire):
    rewards: list[float] = Field(description="Sequence-level ALaRM reward of each query.")
    scores: list[float] = Field(description="Same as rewards (OpenRLHF filters on it).")
    extra_logs: dict[str, list[float]] = Field(
        description="Per-query holistic score, gate, and each aspect's value, for logging."
    )


class ModelInfo(_Wire):
    name: str
    role: str
    kind: str
    device: str
    fingerprint: str
    details: dict[str, Any]


class ModelsResponse(_Wire):
    models: list[ModelInfo]
    combination: dict[str, Any]
    batching: dict[str, Any]
    limits: dict[str, Any]
    reward_definitions: dict[str, str] = Field(description="reward_definition for each mode.")


class HealthResponse(_Wire):
    status: str


class ErrorDetail(_Wire):
    type: str = Field(description="Machine-readable error type, e.g. invalid_request.")
    message: str
    request_id: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(_Wire):
    """The body of every error reply, on any path: an unknown path's 404 and the 405 (with
    `Allow`) of a method a path does not serve included."""

    error: ErrorDetail


class ResponsePairIn(_Request):
    prompt: str
    response_1: str = Field(description="E.g. the SFT policy's greedy output.")
    response_2: str = Field(description="E.g. a sampled output for the same prompt.")

    @field_validator("prompt", "response_1", "response_2")
    @classmethod
    def _encodable(cls, text: str) -> str:
        return _require_valid_unicode(text)


class ConsistencyRequest(_Request):
    pairs: list[ResponsePairIn] = Field(min_length=1, description="Two responses per prompt.")
    max_inconsistency: float | None = Field(
        None, ge=0, le=1, description="Select every aspect at or under this inconsistency."
    )
    top_k: int | None = Field(None, ge=1, description="Select the k most consistent aspects.")

    _pairs_within_limit = field_validator("pairs", mode="before")(_item_limit(2))  # 2 a pair

    @field_validator("max_inconsistency", "top_k", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: object) -> object:
        # pydantic would read JSON true/false as 1/0; JSON Schema says they are not numbers.
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")
        return value


class AspectConsistencyResult(_Wire):
    name: str
    direction: str = Field(description="higher or lower is better.")
    inconsistency: float | None = Field(
        description="Share of holistic-untied pairs where the aspect prefers the other response."
    )
    disagreements: int
    pairs_counted: int = Field(
        description="Pairs the holistic reward does not tie, with this aspect scored on both "
        "responses (a pair missing a score on either side is left out, not counted as a tie)."
    )
    ties: int = Field(description="Counted pairs the aspect ties (consistent).")
    win_rate: float | None = Field(description="How often it prefers response 1 (untied pairs).")
    missing: int = Field(
        description="Pairs left out of this aspect's figures: it scored neither or only one of "
        "the two responses."
    )
    selected: bool


class ConsistencyResponse(_Wire):
    pairs: int
    holistic_ties: int = Field(description="Pairs with both holistic scores, and equal.")
    holistic_missing: int = Field(
        description="Pairs left out of every figure: a response without a holistic score."
    )
    holistic_win_rate: float | None
    aspects: list[AspectConsistencyResult]
    selected: list[str]
    reward_definition: str
