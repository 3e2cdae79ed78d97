"""Reward-model adapters behind one protocol, and their construction from the config."""

from __future__ import annotations

from pathlib import Path

from service.config import BatchingConfig, RewardConfig
from service.model_specs import (
    EmbeddingSimilarityAspect,
    GrammarAspect,
    LanguageConfidenceAspect,
    LmLikelihoodHolistic,
    ModelSpec,
    ReadabilityAspect,
    RuleAspect,
    SegmentClassifierAspect,
    SequenceScalarAspect,
    SequenceScalarHolistic,
)
from service.models.base import (
    AspectScore,
    HolisticScore,
    ModelOutput,
    PrepareCall,
    Prepared,
    RewardModel,
    Role,
    prepare_items,
    prepare_together,
)
from service.models.encoding_memo import EncodingMemo
from service.models.loading import call_overhead_tokens, place, tokenise_in_callers_threads
from service.models.packaged import resolve_model_path

__all__ = [
    "AspectScore",
    "EncodingMemo",
    "HolisticScore",
    "ModelOutput",
    "PrepareCall",
    "Prepared",
    "RewardModel",
    "load_models",
    "prepare_items",
    "prepare_together",
]


def _build(spec: ModelSpec, index: int, cache_dir: Path, batching: BatchingConfig) -> RewardModel:
    if isinstance(spec, RuleAspect):
        from service.models.rules import RuleModel

        tokenizer = spec.tokenizer_path
        return RuleModel(spec, resolve_model_path(tokenizer, cache_dir) if tokenizer else None)
    if isinstance(spec, GrammarAspect):
        from service.models.grammar import GrammarModel

        return GrammarModel(spec)
    if isinstance(spec, ReadabilityAspect):
        from service.models.readability import ReadabilityModel

        return ReadabilityModel(spec)
    if isinstance(spec, LanguageConfidenceAspect):
        from service.models.language_confidence import LanguageConfidenceModel

        return LanguageConfidenceModel(spec)
    path = resolve_model_path(spec.path, cache_dir)
    device = place(spec.device, index)
    if isinstance(spec, SequenceScalarHolistic | SequenceScalarAspect):
        from service.models.sequence_scalar import SequenceScalarModel

        overhead = call_overhead_tokens(device, batching)
        role: Role = "holistic" if isinstance(spec, SequenceScalarHolistic) else "aspect"
        return SequenceScalarModel(spec, role, path, device, overhead)
    if isinstance(spec, LmLikelihoodHolistic):
        from service.models.lm_likelihood import LmLikelihoodModel

        return LmLikelihoodModel(spec, path, device, call_overhead_tokens(device, batching))
    if isinstance(spec, SegmentClassifierAspect):
        from service.models.segment_classifier import SegmentClassifierModel

        return SegmentClassifierModel(spec, path, device)
    if isinstance(spec, EmbeddingSimilarityAspect):
        from service.models.embedding_similarity import EmbeddingSimilarityModel

        overhead = call_overhead_tokens(device, batching)
        return EmbeddingSimilarityModel(spec, path, device, overhead)
    raise TypeError(f"no adapter for {type(spec).__name__}")


def load_models(config: RewardConfig, cache_dir: Path) -> list[RewardModel]:
    """Load the holistic model first, then every aspect, in config order."""
    tokenise_in_callers_threads()  # before any tokenizer can start the library's pool
    specs: list[ModelSpec] = [config.holistic, *config.aspects]
    return [_build(spec, i, cache_dir, config.batching) for i, spec in enumerate(specs)]
