"""Language confidence: the probability that a response is written in a target language.

py3langid ships its model in the wheel (no download), is plain numpy (deterministic), and
its normalised probabilities are temperature-scaled by text length, so they stay graded
rather than saturating at 0 or 1 the way langid.py's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.metadata import version
from typing import Any

from service.combine import SegmentScore
from service.errors import ConfigError
from service.model_specs import LanguageConfidenceAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo
from service.models.loading import fingerprint


@cache
def _identifier() -> Any:
    # About a second to load, read-only afterwards: one per process, shared by all aspects.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageConfidenceModel:
    kind = "language_confidence"
    role: Role = "aspect"
    device = "host"  # no tensors: scored in a tokenizer thread, never behind a forward

    def __init__(self, spec: LanguageConfidenceAspect) -> None:
        self.name = spec.name
        self._spec = spec
        self._identifier = _identifier()
        if spec.language not in self._identifier.labels:
            raise ConfigError(f"language: py3langid does not know {spec.language!r}")
        self._detector = f"py3langid=={version('py3langid')}"
        self.fingerprint = fingerprint(self._detector, spec.model_dump())

    def confidence(self, text: str) -> float | None:
        """P(language | text); None for a blank text, which has no language."""
        if not text.strip():
            return None
        return float(dict(self._identifier.rank(text))[self._spec.language])

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        # Detection is the whole computation; it runs here, off the event loop.
        raw = self.confidence(response)
        return Prepared(rows=((),), truncated=False, meta=SegmentScore(0, len(response), raw))

    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        return [AspectScore((p.meta,), False) for p in batch]

    def describe(self) -> dict[str, Any]:
        return {
            "language": self._spec.language,
            "detector": self._detector,
        }
