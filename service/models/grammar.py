"""Grammar errors as span rewards: -1 on each error's characters, 0 on the text between."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

from service.combine import SegmentScore
from service.model_specs import GrammarAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo
from service.models.grammar_checkers import ProselintChecker, Span, import_checker
from service.models.loading import fingerprint

ERROR_VALUE = -1.0
CLEAN_VALUE = 0.0


def _checked(span: Sequence[int], length: int) -> Span:
    # A plugged-in checker is someone else's code: a bad span fails the item loudly rather
    # than shifting rewards onto the wrong characters.
    if len(span) != 2:
        raise ValueError(f"checker returned {span!r}, not a (start, end) pair")
    start, end = operator.index(span[0]), operator.index(span[1])
    if not 0 <= start <= end <= length:
        raise ValueError(f"checker span {(start, end)} lies outside the text (0..{length})")
    return start, end


def error_segments(length: int, spans: Iterable[Sequence[int]]) -> tuple[SegmentScore, ...]:
    """Segments covering [0, length) in order: errors at -1 (overlaps merged), gaps at 0."""
    merged: list[Span] = []
    for start, end in sorted(_checked(span, length) for span in spans):
        if start == end:
            continue  # flags no character
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    segments: list[SegmentScore] = []
    cursor = 0
    for start, end in merged:
        if start > cursor:
            segments.append(SegmentScore(cursor, start, CLEAN_VALUE))
        segments.append(SegmentScore(start, end, ERROR_VALUE))
        cursor = end
    if cursor < length or not segments:
        segments.append(SegmentScore(cursor, length, CLEAN_VALUE))
    return tuple(segments)


class GrammarModel:
    kind = "grammar"
    role: Role = "aspect"
    device = "host"  # no tensors: scored in a tokenizer thread, never behind a forward

    def __init__(self, spec: GrammarAspect) -> None:
        self.name = spec.name
        self._spec = spec
        if spec.checker:
            self._check = import_checker(spec.checker)
            self._source = spec.checker
        else:
            proselint = ProselintChecker(spec.proselint_checks)
            self._check = proselint
            self._source = proselint.version
        self.fingerprint = fingerprint(self._source, spec.model_dump())

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        # Checking is the whole computation, so it happens here (run() only packs it).
        segments = error_segments(len(response), self._check(response))
        return Prepared(rows=((),), truncated=False, meta=segments)

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [AspectScore(p.meta, False) for p in batch]

    def describe(self) -> dict[str, Any]:
        return {
            "checker": self._source,
            "proselint_checks": None if self._spec.checker else list(self._spec.proselint_checks),
        }
