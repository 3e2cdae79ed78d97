"""The small protocol every reward-model adapter implements, and the values it returns.

An adapter has two hooks: `prepare` (tokenise one item; runs in a tokenizer thread) and
`run` (one padded forward over a batch of prepared items; runs in its device's thread; a
host model, device "host", computes in `prepare` and its `run` only packs the results).
A tokenising adapter may add a third, `encode_ahead`, so that a request's texts reach its
tokenizer in one batched call (`prepare_items`), and so do the texts of requests that
arrive together (`prepare_together`).
It never sees a queue or HTTP; it sees only an `EncodingMemo` (one request's, or that of
requests tokenised together), through which it encodes text so that no text is encoded
twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from service.combine import SegmentScore
from service.models.encoding_memo import EncodingMemo

Role = Literal["holistic", "aspect"]
Item = TypeVar("Item")
Value = TypeVar("Value")


@dataclass(frozen=True)
class Prepared:
    """One item, tokenised: `rows` token sequences plus adapter-specific bookkeeping."""

    rows: tuple[tuple[int, ...], ...]
    truncated: bool
    meta: Any = None  # adapter-private (segment spans, separator positions, ...)

    @property
    def length(self) -> int:
        return max((len(r) for r in self.rows), default=0)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


@dataclass(frozen=True)
class HolisticScore:
    raw: float | None  # None when the response gives the model nothing to score
    truncated: bool


@dataclass(frozen=True)
class AspectScore:
    segments: tuple[SegmentScore, ...]
    truncated: bool


ModelOutput = HolisticScore | AspectScore


def run_scorable(
    items: Sequence[Item],
    scorable: Callable[[Item], bool],
    run: Callable[[list[Item]], list[Value]],
) -> list[Value | None]:
    """`run` over the items with something to score, None (unscored) for the others, in
    order. An item with nothing to score (an empty row: empty text with a tokenizer that
    adds no special token) never reaches a forward: alone it is a forward of no tokens,
    which raises, and packed or padded beside others its head would read another row's
    token or padding. Its result so never depends on what it is batched with."""
    kept = [index for index, item in enumerate(items) if scorable(item)]
    values: list[Value | None] = [None] * len(items)
    if kept:
        for index, value in zip(kept, run([items[i] for i in kept]), strict=True):
            values[index] = value
    return values


@runtime_checkable
class RewardModel(Protocol):
    name: str
    role: Role
    kind: str
    device: str  # "cpu", "cuda:0", ...; one worker thread per device
    fingerprint: str  # identifies the weights and tokenizer files (part of reward_definition)

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared: ...

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class EncodesAhead(Protocol):
    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        """Encode, in one call per tokenizer, every text `prepare` will ask `memo` for."""


def prepare_items(
    model: RewardModel, pairs: Sequence[tuple[str, str]], memo: EncodingMemo
) -> list[Prepared]:
    """Every (prompt, response) prepared, in order. A model that encodes ahead lists its
    texts first: one batched tokenizer call for 16 to 64 items took 0.53 to 0.65 of the
    time of one call per item (the benchmark's two MiniLM models), and `prepare` then finds
    each text in the memo. A lone item's `prepare` makes its one call itself."""
    ((_, outcome),) = prepare_together([(model, pairs)], memo)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


# One model's (prompt, response) pairs for one request: what `prepare_together` prepares.
PrepareCall = tuple[RewardModel, Sequence[tuple[str, str]]]


def prepare_together(
    calls: Sequence[PrepareCall], memo: EncodingMemo
) -> list[tuple[bool, list[Prepared] | Exception]]:
    """Each call's items prepared, as `prepare_items` would, with every model's texts from
    all the calls (requests that arrived together) encoded ahead in one batched call per
    tokenizer; each call's outcome is (True, its items) or (False, its exception). Where
    encoding ahead fails (a text the tokenizer rejects), each call encodes its own texts,
    so that the failure reaches the request that sent the text and no other."""
    pairs_by_model: dict[int, tuple[RewardModel, list[tuple[str, str]]]] = {}
    for model, pairs in calls:
        pairs_by_model.setdefault(id(model), (model, []))[1].extend(pairs)
    for model, pairs in pairs_by_model.values():
        if len(pairs) > 1 and isinstance(model, EncodesAhead):
            # A failure here is met again below, by the call whose text caused it.
            with contextlib.suppress(Exception):
                model.encode_ahead(pairs, memo)
    outcomes: list[tuple[bool, list[Prepared] | Exception]] = []
    for model, pairs in calls:
        try:
            prepared = [model.prepare(prompt, response, memo) for prompt, response in pairs]
            outcomes.append((True, prepared))
        except Exception as exc:  # handed to that call's request
            outcomes.append((False, exc))
    return outcomes
