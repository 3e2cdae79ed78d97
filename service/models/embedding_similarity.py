"""Relevance as cosine similarity between the prompt and each response segment.

A sentence-embedding encoder (e.g. all-MiniLM-L6-v2): mean pooling over real tokens and L2
normalisation, as sentence-transformers does. One item is several rows (prompt first,
then one per segment), so the batcher budgets it by rows x length. Rows are packed end to
end (`row_packing`) where the encoder allows it, else cut into length-sorted forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.combine import SegmentScore
from service.model_specs import EmbeddingSimilarityAspect
from service.models.base import AspectScore, ModelOutput, Prepared, Role
from service.models.encoding_memo import EncodingMemo, SharedTokenizer
from service.models.loading import (
    PLACEMENT_FIELDS,
    check_max_length,
    chunked_padded_tokens,
    compiled,
    fingerprint,
    length_sorted_chunks,
    load_pretrained,
    load_tokenizer,
    pad_right,
    runtime_details,
    to_device,
    truncate_keeping_specials,
)
from service.models.row_packing import (
    PACKING_TOLERANCE,
    PackedBatch,
    PackedLayout,
    RowPacker,
    mean_pooled,
    packed_tokens,
    packing_position_offset,
    takes_boolean_mask,
)
from service.models.traced_forward import (
    PackedForward,
    PackedInputs,
    probe_batches,
    traced_forward,
)
from service.segmentation import split_spans

# Rows whose packed embeddings must match their embeddings alone, at load.
_PACKING_PROBE = ("Where is it?", "It is here, by the door.", "Yes.", "Over there, on the left.")


class EmbeddingSimilarityModel:
    kind = "embedding_similarity"
    role: Role = "aspect"

    def __init__(
        self,
        spec: EmbeddingSimilarityAspect,
        resolved_path: str,
        device: str,
        overhead_tokens: int,  # what a forward call costs, in tokens: rows are cut by it
    ) -> None:
        from transformers import AutoModel

        self.name, self.device = spec.name, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        self._special_ids = set(self._tokenizer.all_special_ids)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        self._model = load_pretrained(AutoModel, resolved_path, spec.dtype, device)
        check_max_length(spec.name, spec.max_length, self._model)
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        if spec.compile:
            self._model = compiled(self._model, resolved_path, device)
        self._overhead_tokens = overhead_tokens
        self._packer = RowPacker.for_model(
            self._model.config, spec.max_length, overhead_tokens, self._pad_id
        )
        self._packed_forward: PackedForward = self._eager_packed_forward
        self.traced = False
        if spec.pack_rows:
            probe_rows = [self._tokenizer(text)["input_ids"] for text in _PACKING_PROBE]
            offset = self._packing_offset(probe_rows)
            self._packer = dataclasses.replace(self._packer, position_offset=offset)
            if offset is not None and spec.trace_packed and not spec.compile:
                self._trace(probe_rows, offset)
        self.fingerprint = fingerprint(resolved_path, spec.model_dump(exclude=PLACEMENT_FIELDS))

    def _texts(self, prompt: str, response: str) -> tuple[list[tuple[int, int]], list[str]]:
        """The response's segment spans, and the rows' texts: the prompt, then each segment."""
        spans = split_spans(response, self._spec.split)
        return spans, [prompt, *(response[s:e] for s, e in spans)]

    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        texts = [text for prompt, response in pairs for text in self._texts(prompt, response)[1]]
        memo.encode_ahead(self._shared_tokenizer, texts)

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        spans, texts = self._texts(prompt, response)
        full = [encoding.ids for encoding in memo.encode(self._shared_tokenizer, texts)]
        kept = [
            truncate_keeping_specials(
                ids, self._special_ids, self._spec.max_length, self._spec.truncation_side
            )[0]
            for ids in full
        ]
        truncated = any(len(k) < len(f) for k, f in zip(kept, full, strict=True))
        return Prepared(rows=tuple(map(tuple, kept)), truncated=truncated, meta=tuple(spans))

    @property
    def packs_rows(self) -> bool:
        return self._packer.position_offset is not None

    def padded_tokens(self, batch: Sequence[Prepared]) -> int:
        """The padded tokens `run` computes: packed, or (rows it cannot pack) sorted chunks."""
        rows = [row for p in batch for row in p.rows]
        lengths = [len(row) for row in rows]
        if self._packer.packs(rows):
            return self._packer.padded_tokens(lengths)
        return chunked_padded_tokens(lengths, self._overhead_tokens)

    def _embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask = pad_right(rows, self._pad_id, self.device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, H)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (N, H)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)  # on the device

    def _embed_sorted_chunks(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        # Rows, not items, are sorted by length: an item's short prompt row would otherwise
        # be padded to its longest sentence, and every row to the batch's longest.
        chunks = length_sorted_chunks([len(row) for row in rows], self._overhead_tokens)
        parts = [self._embed([rows[i] for i in chunk]) for chunk in chunks]
        embeddings = parts[0].new_empty((len(rows), parts[0].shape[-1]))
        for chunk, part in zip(chunks, parts, strict=True):
            embeddings[chunk] = part
        return embeddings

    def _packed_inputs(
        self,
        rows: Sequence[Sequence[int]],
        layout: PackedLayout,
        position_offset: int,
        partners: np.ndarray | None = None,
    ) -> PackedInputs:
        """Tokens, and (2, N) each row's first cell and the row its cosine is taken with
        (`partners`; itself if None): one copy each."""
        tokens, row_start = packed_tokens(rows, layout, self._pad_id, position_offset)
        partner = np.arange(len(rows)) if partners is None else partners
        row_pairs = np.stack([row_start, partner])
        return to_device(tokens, self.device), to_device(row_pairs, self.device)

    def _eager_packed_forward(
        self, tokens: torch.Tensor, row_pairs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) normalised float32 embeddings, and (N,) each row's cosine with its
        partner row: the mask, the pooling and the cosines on the device, in the graph
        when traced."""
        dtype = torch.bool if takes_boolean_mask(self._model.config) else self._model.dtype
        packed = PackedBatch.on_device(tokens, row_pairs[0], dtype, causal=False)
        hidden = self._model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        ).last_hidden_state  # (B, W, H)
        embeddings = torch.nn.functional.normalize(mean_pooled(hidden, packed), dim=-1)
        return embeddings, (embeddings * embeddings[row_pairs[1]]).sum(-1)

    def _embed_packed(
        self, rows: Sequence[Sequence[int]], layout: PackedLayout, position_offset: int
    ) -> torch.Tensor:
        embeddings, _ = self._packed_forward(*self._packed_inputs(rows, layout, position_offset))
        return embeddings

    @torch.inference_mode()
    def _trace(self, rows: Sequence[Sequence[int]], position_offset: int) -> None:
        def probe(some: Sequence[Sequence[int]], layout: PackedLayout) -> PackedInputs:
            partners = np.arange(len(some))[::-1].copy()  # not itself: the cosines vary
            return self._packed_inputs(some, layout, position_offset, partners)

        traced = traced_forward(
            self._model,
            self._eager_packed_forward,
            probe_batches(rows, probe),
            PACKING_TOLERANCE[self._spec.dtype],
        )
        if traced is not None:
            self._packed_forward, self.traced = traced, True

    @torch.inference_mode()
    def _packing_offset(self, rows: Sequence[Sequence[int]]) -> int | None:
        """Whether (and with which position offset) this encoder embeds `rows` packed as
        it embeds them alone; packing is off where it does not."""
        return packing_position_offset(
            self._embed_packed,
            self._embed,
            rows,
            offsets=(0, self._pad_id + 1),
            tolerance=PACKING_TOLERANCE[self._spec.dtype],
            max_positions=self._packer.max_width,
        )

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        all_rows = [row for p in batch for row in p.rows]
        rows_per_item = [len(p.rows) for p in batch]
        cosines = self._cosines_in_one_forward(all_rows, rows_per_item)
        if cosines is None:
            if self._packer.packs(all_rows):
                embeddings = self._packer.run(all_rows, self._embed_packed)
            else:
                embeddings = self._embed_sorted_chunks(all_rows)
            cosines = self._cosines_with_prompts(embeddings, rows_per_item)
        results: list[ModelOutput] = []
        first = 0
        for p in batch:
            segments = tuple(
                SegmentScore(s, e, c)
                for (s, e), c in zip(p.meta, cosines[first + 1 : first + len(p.rows)], strict=True)
            )
            results.append(AspectScore(segments, p.truncated))
            first += len(p.rows)
        return results

    def _cosines_in_one_forward(
        self, rows: Sequence[Sequence[int]], rows_per_item: list[int]
    ) -> list[float] | None:
        """Each row's cosine with its item's prompt row, from the packed forward itself,
        where every row runs in one (None elsewhere: an item's rows may run apart)."""
        if not rows or not self._packer.packs(rows):
            return None
        forwards = self._packer.forwards([len(row) for row in rows])
        if len(forwards) > 1 or forwards[0][0] != tuple(range(len(rows))):
            return None
        offset = self._packer.position_offset
        assert offset is not None  # `packs` says so
        inputs = self._packed_inputs(rows, forwards[0][1], offset, _prompt_rows(rows_per_item))
        _, cosines = self._packed_forward(*inputs)
        return cosines.tolist()  # (rows,)

    @staticmethod
    def _cosines_with_prompts(embeddings: torch.Tensor, rows_per_item: list[int]) -> list[float]:
        """Each row's cosine with its item's prompt row (the item's first; 1 for the prompt
        itself), for the whole batch in one step on the embeddings' device and one copy
        back: a step per item would call the GIL back after each of its ops, and on a GPU
        would copy every embedding to the host."""
        if not rows_per_item:
            return []
        prompt_of_row = to_device(_prompt_rows(rows_per_item), str(embeddings.device))
        return (embeddings * embeddings[prompt_of_row]).sum(-1).tolist()  # (rows,)

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "split": self._spec.split.value,
            "packs_rows": self.packs_rows,
            "traced": self.traced,
        }


def _prompt_rows(rows_per_item: Sequence[int]) -> np.ndarray:
    """(rows,) the index of each row's item's prompt row (the item's first)."""
    firsts = np.cumsum([0, *rows_per_item[:-1]])
    return np.repeat(firsts, rows_per_item)
