"""The reward models a reward definition may name: one pydantic entry per kind of model.

`service.config` validates the YAML reward definition against these; each adapter in
`service.models` reads its own entry. Every entry is strict and frozen (`StrictModel`).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.segmentation import SplitUnit


class StrictModel(BaseModel):
    """Unknown keys are errors, NaN and infinities too (a NaN weight would make every reward
    NaN), and parsed settings never change: a typo fails at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _TransformerSpec(StrictModel):
    """Fields shared by every model loaded with transformers' from_pretrained."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    path: str = Field(description="local folder, hub id, or packaged:<name>")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = Field(
        False,
        description="torch.compile the model (dynamic shapes) at load; for GPUs: on a "
        "2-core CPU it took ~54 s and gained nothing on MiniLM",
    )
    max_length: int = Field(512, ge=8)
    truncation_side: Literal["left", "right"] = "right"


class _RowPacking(StrictModel):
    pack_rows: bool = Field(
        True,
        description="pack a batch's rows end to end in one forward (each row attending to "
        "itself only) where the model allows it, checked at load; else length-sorted forwards",
    )
    trace_packed: bool = Field(
        True,
        description="run packed forwards as one traced TorchScript graph, which holds no "
        "GIL while it runs (eager forwards wait for it at every operator beside the event "
        "loop), where the traced graph matches the eager one at load; not with compile",
    )


class _HolisticNorm(StrictModel):
    mu: float = 0.0
    sigma: float = Field(1.0, gt=0)


# sequence: one value per response; segment: one per sentence or sub-sentence; span: one
# per smaller unit the aspect defines (grammar: per word, standing in for the paper's tokens).
Granularity = Literal["sequence", "segment", "span"]


class _AspectShaping(StrictModel):
    weight: float = 1.0
    scale: float = 1.0
    shift: float = 0.0
    sigmoid: bool = True
    # For aspect selection: which way is better (unset: the way the reward pushes, see
    # `selection_direction`), and how segments make one value per response.
    direction: Literal["higher", "lower"] | None = None
    aggregate: Literal["sum", "mean"] = "mean"
    # What one raw value covers; fixed by the kind, so not a setting.
    granularity: ClassVar[Granularity]

    @property
    def selection_direction(self) -> Literal["higher", "lower"]:
        """Selection asks whether an aspect prefers what the holistic RM prefers: the
        aspect's preference is the one its reward acts on, so unless set it is "lower"
        where weight x scale < 0 (a banned-phrase count's negative weight, easier text's
        negative scale)."""
        if self.direction is not None:
            return self.direction
        return "lower" if self.weight * self.scale < 0 else "higher"

    @model_validator(mode="after")
    def _direction_agrees_with_the_reward(self) -> Self:
        pull = self.weight * self.scale
        if (pull > 0 and self.direction == "lower") or (pull < 0 and self.direction == "higher"):
            rises = "rises" if pull > 0 else "falls"
            raise ValueError(
                f"direction is {self.direction!r}, but the reward {rises} with the raw value "
                "(the sign of weight x scale): selection would judge the aspect against the "
                "reward it gives; leave direction out to follow the reward"
            )
        return self


class _ScalarInput(StrictModel):
    """How a scalar RM sees a (prompt, response): a format template or the chat template."""

    template: str = "Human: {prompt}\nAssistant: {response}"
    use_chat_template: bool = False


class SequenceScalarHolistic(_TransformerSpec, _HolisticNorm, _ScalarInput, _RowPacking):
    kind: Literal["sequence_scalar"]


class LmLikelihoodHolistic(_TransformerSpec, _HolisticNorm, _RowPacking):
    kind: Literal["lm_likelihood"]
    # None = the tokenizer's chat template (user turn + generation prompt).
    prompt_template: str | None = None


class SequenceScalarAspect(_TransformerSpec, _AspectShaping, _ScalarInput, _RowPacking):
    granularity: ClassVar[Granularity] = "sequence"
    kind: Literal["sequence_scalar"]


class SegmentClassifierAspect(_TransformerSpec, _AspectShaping):
    granularity: ClassVar[Granularity] = "segment"
    kind: Literal["segment_classifier"]
    split: SplitUnit = SplitUnit.sentence
    prefix_template: str = "{prompt} answer:"
    separator: str | None = Field(None, description="None = the tokenizer's sep or eos token")
    # Label id -> raw value; the argmax is taken over these labels only.
    label_values: dict[int, float] = Field(default_factory=lambda: {0: -0.5, 1: 0.5})

    @model_validator(mode="after")
    def _two_labels_or_more(self) -> SegmentClassifierAspect:
        if len(self.label_values) < 2:
            raise ValueError("label_values needs at least two labels")
        return self


class EmbeddingSimilarityAspect(_TransformerSpec, _AspectShaping, _RowPacking):
    granularity: ClassVar[Granularity] = "segment"
    kind: Literal["embedding_similarity"]
    split: SplitUnit = SplitUnit.sentence


class RuleAspect(_AspectShaping):
    """Aspects computed from the text alone: raw value = count / mean.

    `length` counts chars, words or tokens (the paper's length pseudo-aspect); `regex`
    counts matches of `pattern` (citations, banned phrases with a negative weight, ...).
    """

    granularity: ClassVar[Granularity] = "sequence"
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    kind: Literal["rule"]
    rule: Literal["length", "regex"] = "length"
    unit: Literal["chars", "words", "tokens"] = "words"
    pattern: str | None = Field(None, description="regular expression, for rule 'regex'")
    mean: float = Field(gt=0, description="raw value = count / mean")
    tokenizer_path: str | None = Field(None, description="needed when unit is tokens")

    @model_validator(mode="after")
    def _rule_inputs(self) -> RuleAspect:
        if self.rule == "length" and self.unit == "tokens" and not self.tokenizer_path:
            raise ValueError("unit 'tokens' needs tokenizer_path")
        if self.rule == "regex":
            if not self.pattern:
                raise ValueError("rule 'regex' needs pattern")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"invalid pattern: {exc}") from exc
        return self


class _TextAspect(_AspectShaping):
    """An aspect computed on the host from the response text alone, with no weights."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


# proselint check groups that flag errors (repeated words, misspellings, malapropisms,
# wrong capitalisation, ...), leaving out its advice on style (clichés, hedging, typography).
DEFAULT_PROSELINT_CHECKS = (
    "lexical_illusions",
    "nonwords",
    "spelling",
    "malapropisms",
    "mondegreens",
    "uncomparables",
    "misc.capitalization",
    "misc.false_plurals",
    "misc.back_formations",
    "misc.illogic",
    "misc.preferred_forms",
)


class GrammarAspect(_TextAspect):
    """Errors per word: raw -1 on each word an error span touches, 0 on every other word.

    One value per word stands in for the paper's one per policy token, so the number of
    values is fixed by the text and errors can only lower them; a positive `scale` and a
    non-negative `weight` keep the shaping increasing, so more or longer errors never raise
    the reward. The default shaping is the paper's MT one (sigmoid: s(0) = 0.5 per clean
    word, s(-1) = 0.27 per word in error): every value is positive, so passing the gate never
    lowers the reward, and length pays 0.5 a word. `sigmoid: false` takes the pull on length
    away (minus the words in error), at the price of the gate: a response with errors then
    loses reward as its holistic score crosses the threshold.
    """

    granularity: ClassVar[Granularity] = "span"
    kind: Literal["grammar"]
    checker: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'package.module:callable', (text) -> [(start, end), ...] error spans; "
        "None = the built-in proselint checks",
    )
    proselint_checks: tuple[str, ...] = Field(
        DEFAULT_PROSELINT_CHECKS, min_length=1, description="proselint check paths or prefixes"
    )
    aggregate: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _checks_only_for_proselint(self) -> GrammarAspect:
        if self.checker and "proselint_checks" in self.model_fields_set:
            raise ValueError("proselint_checks applies only without a checker")
        return self

    @model_validator(mode="after")
    def _errors_never_pay(self) -> GrammarAspect:
        # A negative scale or weight would turn the shaping around: errors would earn reward.
        if self.scale <= 0:
            raise ValueError("scale must be positive for grammar: errors must never pay")
        if self.weight < 0:
            raise ValueError("weight must not be negative for grammar: errors must never pay")
        return self


class ReadabilityAspect(_TextAspect):
    """Flesch-Kincaid grade level of the whole response, z-normalised: raw = (grade - mu) /
    sigma, as the paper's MT code (textstat.flesch_kincaid_grade) with its statistics.

    Its sign is the paper's: a higher grade level (harder text) is a higher raw value and
    `direction: higher`; `scale: -1` rewards easier text instead (and selection then judges
    it `lower`).
    """

    granularity: ClassVar[Granularity] = "sequence"
    kind: Literal["readability"]
    mu: float = Field(11.19907, description="mean Flesch-Kincaid grade of typical responses")
    sigma: float = Field(6.04406, gt=0, description="its standard deviation")


class LanguageConfidenceAspect(_TextAspect):
    """Probability that the response is written in `language` (raw in [0, 1])."""

    granularity: ClassVar[Granularity] = "sequence"
    kind: Literal["language_confidence"]
    language: str = Field(pattern=r"^[a-z]{2,3}$", description="ISO 639 code, e.g. 'en'")


HolisticSpec = Annotated[SequenceScalarHolistic | LmLikelihoodHolistic, Field(discriminator="kind")]
AspectSpec = Annotated[
    SequenceScalarAspect
    | SegmentClassifierAspect
    | EmbeddingSimilarityAspect
    | RuleAspect
    | GrammarAspect
    | ReadabilityAspect
    | LanguageConfidenceAspect,
    Field(discriminator="kind"),
]
ModelSpec = SequenceScalarHolistic | LmLikelihoodHolistic | AspectSpec
