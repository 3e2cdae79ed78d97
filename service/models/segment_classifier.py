"""Fine-Grained RLHF-style segment rewards (docs/method.md section 4).

Input: "{prefix} <sep> s1 <sep> s2 ..."; the token classifier's logits at each separator
decide that segment's label. Separators are located by character offset, so a separator
string inside the prompt can never be mistaken for a segment, and a segment whose
separator falls outside the truncation window is reported unscored, never misaligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from service.combine import SegmentScore
from service.errors import ConfigError
from service.model_specs import SegmentClassifierAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo, SharedTokenizer
from service.models.loading import (
    PLACEMENT_FIELDS,
    check_max_length,
    compiled,
    ensure_pad_token,
    fingerprint,
    load_pretrained,
    load_tokenizer,
    pad_right,
    runtime_details,
    truncate_keeping_specials,
)
from service.segmentation import split_spans


class SegmentClassifierModel:
    kind = "segment_classifier"
    role: Role = "aspect"

    def __init__(self, spec: SegmentClassifierAspect, resolved_path: str, device: str) -> None:
        from transformers import AutoModelForTokenClassification

        self.name, self.device = spec.name, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        self._model = load_pretrained(
            AutoModelForTokenClassification, resolved_path, spec.dtype, device
        )
        check_max_length(spec.name, spec.max_length, self._model)
        self._separator = spec.separator or self._tokenizer.sep_token or self._tokenizer.eos_token
        self._separator_id = self._tokenizer.convert_tokens_to_ids(self._separator)
        if self._separator_id is None or self._separator_id == self._tokenizer.unk_token_id:
            raise ConfigError(f"{spec.name}: separator {self._separator!r} is not a token")
        num_labels = self._model.config.num_labels
        if "label_values" not in spec.model_fields_set and num_labels != 2:
            # The default {0, 1} silently reads the wrong classes of Fine-Grained RLHF's
            # three-label RMs (theirs: {0, 2} for factuality, {1, 2} for relevance).
            raise ConfigError(
                f"{spec.name}: the model has {num_labels} labels: set label_values (label id "
                "-> raw value, for the labels the argmax is taken over); the default "
                "{0: -0.5, 1: 0.5} is for two-label models"
            )
        bad = [label for label in spec.label_values if not 0 <= label < num_labels]
        if bad:
            raise ConfigError(f"{spec.name}: label_values {bad} outside 0..{num_labels - 1}")
        self._labels = torch.tensor(sorted(spec.label_values))
        self._label_values = [spec.label_values[int(i)] for i in self._labels]
        self._pad_id = ensure_pad_token(self._tokenizer, self._model)
        if spec.compile:
            self._model = compiled(self._model, resolved_path, device)
        self._special_ids = set(self._tokenizer.all_special_ids)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        self.fingerprint = fingerprint(resolved_path, spec.model_dump(exclude=PLACEMENT_FIELDS))

    def _text(self, prompt: str, response: str) -> tuple[str, list[tuple[int, int]], list[int]]:
        """The one row's text (the prefix, then a separator before each segment), the
        response's segment spans, and where each separator starts in the text."""
        text = self._spec.prefix_template.format(prompt=prompt)
        spans = split_spans(response, self._spec.split)
        separator_chars: list[int] = []
        for start, end in spans:
            text += " "
            separator_chars.append(len(text))
            text += f"{self._separator} {response[start:end]}"
        return text, spans, separator_chars

    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        texts = [self._text(prompt, response)[0] for prompt, response in pairs]
        memo.encode_ahead(self._shared_tokenizer, texts, offsets=True)

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        text, spans, separator_chars = self._text(prompt, response)
        (encoding,) = memo.encode(self._shared_tokenizer, [text], offsets=True)
        ids, offsets = encoding.ids, encoding.offsets
        assert offsets is not None  # asked for above
        token_at_char = {
            start: i for i, (start, _) in enumerate(offsets) if ids[i] == self._separator_id
        }
        positions = [token_at_char.get(c) for c in separator_chars]
        if any(p is None for p in positions):
            raise ConfigError(
                f"{self.name}: separator {self._separator!r} is not tokenised as one token"
            )
        kept, origin = truncate_keeping_specials(
            ids, self._special_ids, self._spec.max_length, self._spec.truncation_side
        )
        new_index = {old: new for new, old in enumerate(origin)}
        kept_positions = tuple(new_index.get(p) for p in positions if p is not None)
        return Prepared(
            rows=(tuple(kept),),
            truncated=len(kept) < len(ids),
            meta=(tuple(spans), kept_positions),
        )

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        ids, mask = pad_right([p.rows[0] for p in batch], self._pad_id, self.device)
        logits = self._model(input_ids=ids, attention_mask=mask).logits  # (B, L, C)
        label_logits = logits[..., self._labels.to(self.device)]  # (B, L, K)
        choice = label_logits.argmax(-1)  # (B, L): index into sorted labels
        # Only the separators' choices come back, in one copy for the whole batch.
        scored = [(i, pos) for i, p in enumerate(batch) for pos in p.meta[1] if pos is not None]
        picked = choice[[i for i, _ in scored], [pos for _, pos in scored]].tolist()  # (K,)
        label_at = {at: self._label_values[c] for at, c in zip(scored, picked, strict=True)}
        results: list[ModelOutput] = []
        for i, p in enumerate(batch):
            spans, positions = p.meta
            segments = tuple(
                SegmentScore(start, end, label_at.get((i, pos)))
                for (start, end), pos in zip(spans, positions, strict=True)
            )
            results.append(AspectScore(segments, p.truncated))
        return results

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "separator": self._separator,
            "label_values": self._spec.label_values,
            "split": self._spec.split.value,
        }
