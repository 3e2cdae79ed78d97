"""Rule aspects: text statistics over a configured mean (length, regex matches)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from service.combine import SegmentScore
from service.model_specs import RuleAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo, SharedTokenizer
from service.models.loading import fingerprint, load_tokenizer


class RuleModel:
    kind = "rule"
    role: Role = "aspect"
    device = "host"  # no tensors: scored in a tokenizer thread, never behind a forward

    def __init__(self, spec: RuleAspect, resolved_tokenizer: str | None) -> None:
        self.name = spec.name
        self._spec = spec
        self._pattern = re.compile(spec.pattern) if spec.pattern else None
        self._shared_tokenizer = (
            SharedTokenizer(load_tokenizer(resolved_tokenizer)) if resolved_tokenizer else None
        )
        self.fingerprint = fingerprint(resolved_tokenizer or "", spec.model_dump())

    def _count(self, response: str, memo: EncodingMemo) -> int:
        if self._pattern is not None:
            return sum(1 for _ in self._pattern.finditer(response))
        if self._spec.unit == "chars":
            return len(response)
        if self._spec.unit == "words":
            return len(response.split())
        assert self._shared_tokenizer is not None  # guaranteed by RuleAspect validation
        (encoding,) = memo.encode(self._shared_tokenizer, [response], add_special_tokens=False)
        return len(encoding.ids)

    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        if self._counts_tokens:
            assert self._shared_tokenizer is not None  # guaranteed by RuleAspect validation
            responses = [response for _, response in pairs]
            memo.encode_ahead(self._shared_tokenizer, responses, add_special_tokens=False)

    @property
    def _counts_tokens(self) -> bool:
        return self._pattern is None and self._spec.unit == "tokens"

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        # No model rows: the count is the whole computation.
        count = self._count(response, memo)
        return Prepared(rows=((),), truncated=False, meta=(len(response), count))

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [
            AspectScore((SegmentScore(0, end, count / self._spec.mean),), False)
            for end, count in (p.meta for p in batch)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "rule": self._spec.rule,
            "unit": self._spec.unit,
            "pattern": self._spec.pattern,
            "mean": self._spec.mean,
        }
