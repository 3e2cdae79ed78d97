"""A scalar-head reward model (UltraRM-, Skywork- or DeBERTa-style) on the whole response.

Works for encoders and decoders: inputs are right-padded and transformers'
sequence-classification heads read decoders at the last non-pad token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from service.combine import SegmentScore
from service.config import SequenceScalarAspect, SequenceScalarHolistic
from service.errors import ConfigError
from service.models.base import AspectScore, HolisticScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo, SharedTokenizer
from service.models.loading import (
    PLACEMENT_FIELDS,
    compiled,
    ensure_pad_token,
    fingerprint,
    load_pretrained,
    load_tokenizer,
    pad_right,
    runtime_details,
    truncate_keeping_specials,
)


class SequenceScalarModel:
    kind = "sequence_scalar"

    def __init__(
        self,
        spec: SequenceScalarHolistic | SequenceScalarAspect,
        role: Role,
        resolved_path: str,
        device: str,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        self.name, self.role, self.device = spec.name, role, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        self._model = load_pretrained(
            AutoModelForSequenceClassification, resolved_path, spec.dtype, device
        )
        if self._model.config.num_labels != 1:
            raise ConfigError(f"{spec.name}: expected a single-output head (num_labels=1)")
        if spec.use_chat_template and not self._tokenizer.chat_template:
            raise ConfigError(f"{spec.name}: use_chat_template set but tokenizer has none")
        self._pad_id = ensure_pad_token(self._tokenizer, self._model)
        if spec.compile:
            self._model = compiled(self._model, resolved_path, device)
        self._special_ids = set(self._tokenizer.all_special_ids)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        self.fingerprint = fingerprint(resolved_path, spec.model_dump(exclude=PLACEMENT_FIELDS))

    def _text(self, prompt: str, response: str) -> tuple[str, bool]:
        if self._spec.use_chat_template:
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            return self._tokenizer.apply_chat_template(turns, tokenize=False), False
        return self._spec.template.format(prompt=prompt, response=response), True

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        text, add_special = self._text(prompt, response)
        (encoding,) = memo.encode(self._shared_tokenizer, [text], add_special)
        ids = encoding.ids
        kept, _ = truncate_keeping_specials(
            ids, self._special_ids, self._spec.max_length, self._spec.truncation_side
        )
        return Prepared(rows=(tuple(kept),), truncated=len(kept) < len(ids), meta=len(response))

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        ids, mask = pad_right([p.rows[0] for p in batch], self._pad_id, self.device)
        scores = self._model(input_ids=ids, attention_mask=mask).logits[:, 0]  # (B,)
        values = scores.float().cpu().tolist()
        if self.role == "holistic":
            return [HolisticScore(v, p.truncated) for v, p in zip(values, batch, strict=True)]
        return [
            AspectScore((SegmentScore(0, p.meta, v),), p.truncated)
            for v, p in zip(values, batch, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "pad_token_id": self._pad_id,
        }
