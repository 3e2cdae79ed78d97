"""How a scalar reward model's head reads packed rows: which token, through which layers.

transformers' sequence-classification models pool inside `forward`, at a fixed place of a
padded row: the first token (BERT, RoBERTa, DeBERTa) or the last non-pad one (decoders).
Packed rows (`row_packing`) put many rows in one, so the backbone runs packed and the head
runs here on each row's own token. Which head a model has is read from its modules; a
head not listed here leaves rows unpacked, and the load check in `SequenceScalarModel`
compares packed scores with unpacked ones before any is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.models.row_packing import PackedBatch, narrower_sliding_window, takes_boolean_mask


@dataclass(frozen=True)
class PackedScalarHead:
    """A backbone run on packed rows, and the head that scores each row's pooled token."""

    reads_last_token: bool  # decoders: the last non-pad token; encoders: the first token
    causal: bool
    boolean_mask: bool  # the backbone takes a True-may-attend mask (DeBERTa's, SDPA's)
    hidden: Callable[[PackedBatch], torch.Tensor]  # (B, W, H)
    head: Callable[[torch.Tensor], torch.Tensor]  # (N, 1, H) -> (N, 1) logits

    def read_offsets(self, rows: Sequence[Sequence[int]], pad_id: int) -> list[int]:
        """Where in each row the head reads: transformers reads a decoder at its rightmost
        token that is not the pad id (0 if every token is), an encoder at its first. An
        empty row has no such token: packed, its offset would read a neighbour's."""
        if any(len(row) == 0 for row in rows):
            raise ValueError("an empty row has no token for the head to read")
        if not self.reads_last_token:
            return [0] * len(rows)
        offsets = []
        for row in rows:
            last = len(row) - 1
            while last > 0 and row[last] == pad_id:
                last -= 1
            offsets.append(last)
        return offsets

    def scores(self, packed: PackedBatch) -> torch.Tensor:
        """(N,) each row's score, read at its own token (`row_cells`: each row's first
        cell plus its `read_offsets`, found on the host), in float32."""
        hidden = self.hidden(packed)  # (B, W, H)
        read = hidden.reshape(-1, hidden.shape[-1])[packed.row_cells]  # (N, H)
        return self.head(read[:, None, :])[:, 0].float()


def packed_scalar_head(model: Any, max_length: int) -> PackedScalarHead | None:
    """The packed head of a sequence-classification model, or None for heads not listed and
    for decoders with a sliding window narrower than a row may be (`max_length`): a custom
    4-D mask replaces the window, and the load check's short rows would not show it."""
    base = getattr(model, "base_model", None)
    if base is None:
        return None
    config = getattr(model, "config", None)
    if narrower_sliding_window(config, max_length):
        return None
    classifier = getattr(model, "classifier", None)
    score = getattr(model, "score", None)
    boolean = takes_boolean_mask(config)
    if isinstance(score, torch.nn.Linear):  # Llama, Qwen, Mistral, Gemma, GPT-2, ...
        return PackedScalarHead(
            reads_last_token=True,
            causal=True,
            boolean_mask=boolean,
            hidden=lambda p: (
                base(
                    input_ids=p.input_ids,
                    attention_mask=p.attention_mask,
                    position_ids=p.position_ids,
                    use_cache=False,
                ).last_hidden_state
            ),
            head=lambda h: score(h[:, 0]),
        )
    pooler = getattr(model, "pooler", None)
    if pooler is not None and isinstance(classifier, torch.nn.Linear):  # DeBERTa(-v2)
        if getattr(base, "z_steps", 0) > 1 or not hasattr(base, "encoder"):
            return None
        return _first_token_head(
            lambda p: _deberta_hidden(base, p), lambda h: classifier(pooler(h)), True
        )
    base_pooler = getattr(base, "pooler", None)
    if base_pooler is not None and isinstance(classifier, torch.nn.Linear):  # BERT
        return _first_token_head(
            lambda p: _encoder_hidden(base, p), lambda h: classifier(base_pooler(h)), boolean
        )
    if classifier is not None and hasattr(classifier, "out_proj"):  # RoBERTa, XLM-R, ELECTRA
        return _first_token_head(lambda p: _encoder_hidden(base, p), classifier, boolean)
    return None


def _first_token_head(
    hidden: Callable[[PackedBatch], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    boolean_mask: bool,
) -> PackedScalarHead:
    """An encoder's head: it pools the first token of each row, which attends both ways."""
    return PackedScalarHead(
        reads_last_token=False, causal=False, boolean_mask=boolean_mask, hidden=hidden, head=head
    )


def _encoder_hidden(base: Any, packed: PackedBatch) -> torch.Tensor:
    return base(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
    ).last_hidden_state


def _deberta_hidden(base: Any, packed: PackedBatch) -> torch.Tensor:
    """DeBERTa's model hands one mask to its embeddings (a (B, W) token mask) and to its
    encoder, so the two are called apart. Its relative positions depend on the distance
    between two tokens only, the same within a packed row as alone."""
    tokens = packed.row_of_token.view(packed.input_ids.shape) < packed.row_cells.shape[0]
    embedded = base.embeddings(
        input_ids=packed.input_ids, position_ids=packed.position_ids, mask=tokens.long()
    )
    return base.encoder(
        embedded, packed.attention_mask, output_hidden_states=False
    ).last_hidden_state
