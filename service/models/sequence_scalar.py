"""A scalar-head reward model (UltraRM-, Skywork- or DeBERTa-style) on the whole response.

Works for encoders and decoders. A batch's rows are packed end to end (`row_packing`, read
by `packed_heads`) where the load check allows; else they are right-padded, and
transformers' sequence-classification heads read decoders at the last non-pad token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from service.combine import SegmentScore
from service.errors import ConfigError
from service.model_specs import SequenceScalarAspect, SequenceScalarHolistic
from service.models.base import (
    AspectScore,
    HolisticScore,
    ModelOutput,
    Prepared,
    Role,
    run_scorable,
)
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
    scalar_head_options,
    to_device,
    truncate_keeping_specials,
)
from service.models.packed_heads import packed_scalar_head
from service.models.row_packing import (
    PACKING_TOLERANCE,
    PAIR_PROBE,
    PackedBatch,
    PackedLayout,
    RowPacker,
    packed_tokens,
    packing_position_offset,
)
from service.models.traced_forward import (
    PackedForward,
    PackedInputs,
    probe_batches,
    traced_forward,
)


class SequenceScalarModel:
    kind = "sequence_scalar"

    def __init__(
        self,
        spec: SequenceScalarHolistic | SequenceScalarAspect,
        role: Role,
        resolved_path: str,
        device: str,
        overhead_tokens: int,  # what a forward call costs, in tokens: packed rows are cut by it
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        self.name, self.role, self.device = spec.name, role, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        head_options = scalar_head_options(resolved_path)
        self._model = load_pretrained(
            AutoModelForSequenceClassification, resolved_path, spec.dtype, device, **head_options
        )
        if self._model.config.num_labels != 1:
            raise ConfigError(f"{spec.name}: expected a single-output head (num_labels=1)")
        if head_options and not isinstance(getattr(self._model, "score", None), torch.nn.Linear):
            raise ConfigError(
                f"{spec.name}: the checkpoint's regression_head has no `score` head to load "
                f"into in {type(self._model).__name__}"
            )
        check_max_length(spec.name, spec.max_length, self._model)
        if spec.use_chat_template and not self._tokenizer.chat_template:
            raise ConfigError(f"{spec.name}: use_chat_template set but tokenizer has none")
        self._pad_id = ensure_pad_token(self._tokenizer, self._model)
        self._special_ids = set(self._tokenizer.all_special_ids)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        self._packer = RowPacker.for_model(
            self._model.config, spec.max_length, overhead_tokens, self._pad_id
        )
        # Packed forwards call the backbone apart from the model: not with a compiled model.
        self._head = (
            packed_scalar_head(self._model, spec.max_length)
            if spec.pack_rows and not spec.compile
            else None
        )
        self._packed_scores: PackedForward = self._eager_packed_scores
        self.traced = False
        if self._head is not None:
            probe_rows = [self.prepare(p, r, EncodingMemo()).rows[0] for p, r in PAIR_PROBE]
            offset = self._packing_offset(probe_rows)
            self._packer = dataclasses.replace(self._packer, position_offset=offset)
            if offset is not None and spec.trace_packed:
                self._trace(probe_rows, offset)
        if spec.compile:
            self._model = compiled(self._model, resolved_path, device)
        self.fingerprint = fingerprint(resolved_path, spec.model_dump(exclude=PLACEMENT_FIELDS))

    def _text(self, prompt: str, response: str) -> tuple[str, bool]:
        if self._spec.use_chat_template:
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            return self._tokenizer.apply_chat_template(turns, tokenize=False), False
        return self._spec.template.format(prompt=prompt, response=response), True

    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        texts = [self._text(prompt, response) for prompt, response in pairs]
        if texts:  # one model templates every item alike: one `add_special` for all
            memo.encode_ahead(self._shared_tokenizer, [text for text, _ in texts], texts[0][1])

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        text, add_special = self._text(prompt, response)
        (encoding,) = memo.encode(self._shared_tokenizer, [text], add_special)
        ids = encoding.ids
        kept, _ = truncate_keeping_specials(
            ids, self._special_ids, self._spec.max_length, self._spec.truncation_side
        )
        return Prepared(rows=(tuple(kept),), truncated=len(kept) < len(ids), meta=len(response))

    @property
    def packs_rows(self) -> bool:
        return self._packer.position_offset is not None

    @property
    def padded_tokens(self) -> Callable[[Sequence[Prepared]], int] | None:
        """For the batcher: packed rows' padded tokens. None when rows are not packed: the
        batcher then cuts length-sorted batches by the forward's call cost itself."""
        return self._packed_padded_tokens if self.packs_rows else None

    def _packed_padded_tokens(self, batch: Sequence[Prepared]) -> int:
        """The padded tokens `run` computes: packed, or one rectangle (rows it cannot pack);
        empty rows are not run."""
        rows = [p.rows[0] for p in batch if len(p.rows[0]) > 0]
        if self._packer.packs(rows):
            return self._packer.padded_tokens([len(row) for row in rows])
        return len(rows) * max((len(row) for row in rows), default=0)

    def _scores(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask = pad_right(rows, self._pad_id, self.device)
        return self._model(input_ids=ids, attention_mask=mask).logits[:, 0].float()  # (B,)

    def _packed_inputs(
        self, rows: Sequence[Sequence[int]], layout: PackedLayout, position_offset: int
    ) -> PackedInputs:
        """The packed forward's inputs on the device: tokens, and the cell the head reads
        in each row (found on the host: nothing waits for the device)."""
        head = self._head
        assert head is not None
        tokens, row_start = packed_tokens(rows, layout, self._pad_id, position_offset)
        cells = row_start + np.asarray(head.read_offsets(rows, self._pad_id), dtype=np.int64)
        return to_device(tokens, self.device), to_device(cells, self.device)

    def _eager_packed_scores(self, tokens: torch.Tensor, read_cells: torch.Tensor) -> torch.Tensor:
        """(N,) float32 scores from the packed inputs: the mask and the head on the device,
        in the graph when traced."""
        head = self._head
        assert head is not None
        mask_dtype = torch.bool if head.boolean_mask else self._model.dtype
        return head.scores(PackedBatch.on_device(tokens, read_cells, mask_dtype, head.causal))

    def _scores_packed(
        self, rows: Sequence[Sequence[int]], layout: PackedLayout, position_offset: int
    ) -> torch.Tensor:
        return self._packed_scores(*self._packed_inputs(rows, layout, position_offset))

    @torch.inference_mode()
    def _trace(self, rows: Sequence[Sequence[int]], position_offset: int) -> None:
        probes = probe_batches(
            rows, lambda some, layout: self._packed_inputs(some, layout, position_offset)
        )
        traced = traced_forward(
            self._model, self._eager_packed_scores, probes, PACKING_TOLERANCE[self._spec.dtype]
        )
        if traced is not None:
            self._packed_scores, self.traced = traced, True

    @torch.inference_mode()
    def _packing_offset(self, rows: Sequence[Sequence[int]]) -> int | None:
        """Whether (and with which position offset) this model scores `rows` packed as it
        scores them alone; packing is off where it does not."""
        return packing_position_offset(
            self._scores_packed,
            self._scores,
            rows,
            # Decoders count from 0 (rotary positions would match at any offset, to rounding).
            offsets=(0,) if self._head is not None and self._head.causal else (0, self._pad_id + 1),
            tolerance=PACKING_TOLERANCE[self._spec.dtype],
            max_positions=self._packer.max_width,
        )

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        # An empty row (empty text, no special token added) has no token for the head to
        # read: unscored (None), as the holistic floor and unscored aspects take it.
        rows = [p.rows[0] for p in batch]
        values = run_scorable(rows, lambda row: len(row) > 0, self._row_scores)
        if self.role == "holistic":
            return [HolisticScore(v, p.truncated) for v, p in zip(values, batch, strict=True)]
        return [
            AspectScore((SegmentScore(0, p.meta, v),), p.truncated)
            for v, p in zip(values, batch, strict=True)
        ]

    def _row_scores(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Each row's score, packed where the packer allows; every row has a token."""
        if self._packer.packs(rows):
            scores = self._packer.run(rows, self._scores_packed)  # on the device
        else:
            scores = self._scores(rows)
        values: list[float] = scores.cpu().tolist()
        return values

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "pad_token_id": self._pad_id,
            "packs_rows": self.packs_rows,
            "traced": self.traced,
        }
