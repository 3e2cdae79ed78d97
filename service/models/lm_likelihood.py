"""A generative holistic reward: mean log p(response | prompt) under a causal LM.

Needs no trained head, so a packaged instruct model gives a meaningful reward offline.
The lm head is applied only at response positions, never to the whole (B, L, V) grid.
A batch's rows are packed end to end (`row_packing`: causal within each row) and the packed
backbone traced (`traced_forward`) where the load check allows; else rows are right-padded.
On SmolLM2-135M over 64 qa-feedback items in process, with the batcher's own length-sorted
cuts, packed and traced forwards did 1.17x and 1.00x the items/s of right-padded ones (16
and 64 items sorted at a time, medians of 3 alternating rounds: 1.16 to 1.27, 0.91 to
1.17); in the default config's server, 1.05x at one client sending 16 items and 1.09x at 8
single-item clients (paired rounds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.errors import ConfigError
from service.model_specs import LmLikelihoodHolistic
from service.models.base import HolisticScore, ModelOutput, Prepared, Role, run_scorable
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
    to_device,
    truncate_keeping_specials,
)
from service.models.row_packing import (
    PACKING_TOLERANCE,
    PAIR_PROBE,
    PackedLayout,
    RowPacker,
    narrower_sliding_window,
    packed_mask,
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


class LmLikelihoodModel:
    kind = "lm_likelihood"
    role: Role = "holistic"

    def __init__(
        self,
        spec: LmLikelihoodHolistic,
        resolved_path: str,
        device: str,
        overhead_tokens: int,  # what a forward call costs, in tokens: packed rows are cut by it
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.name, self.device = spec.name, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        self._model = load_pretrained(AutoModelForCausalLM, resolved_path, spec.dtype, device)
        check_max_length(spec.name, spec.max_length, self._model)
        if spec.prompt_template is None and not self._tokenizer.chat_template:
            raise ConfigError(f"{spec.name}: tokenizer has no chat template; set prompt_template")
        self._pad_id = ensure_pad_token(self._tokenizer, self._model)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        self._special_ids = set(self._tokenizer.all_special_ids)
        # Only the backbone runs on every token; the head runs on the response's positions.
        self._backbone = self._model.base_model
        self._packer = RowPacker.for_model(
            self._model.config, spec.max_length, overhead_tokens, self._pad_id
        )
        self._hidden: PackedForward = self._eager_hidden
        self.traced = False
        # Packed forwards pass a 4-D mask the compiled backbone was not compiled for.
        if (
            spec.pack_rows
            and not spec.compile
            and not narrower_sliding_window(self._model.config, spec.max_length)
        ):
            probe_rows = [self.prepare(p, r, EncodingMemo()).rows[0] for p, r in PAIR_PROBE]
            offset = self._packing_offset(probe_rows)
            self._packer = dataclasses.replace(self._packer, position_offset=offset)
            if offset is not None and spec.trace_packed:
                self._trace(probe_rows, offset)
        if spec.compile:
            self._backbone = compiled(self._backbone, resolved_path, device)
        self.fingerprint = fingerprint(resolved_path, spec.model_dump(exclude=PLACEMENT_FIELDS))

    def _prompt_text(self, prompt: str) -> str:
        if self._spec.prompt_template is not None:
            return self._spec.prompt_template.format(prompt=prompt)
        return self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    @property
    def _prompt_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens to the prompt: a chat template
        writes its own."""
        return self._spec.prompt_template is not None

    def _prompt_ids(self, prompt: str, memo: EncodingMemo) -> tuple[int, ...]:
        text = self._prompt_text(prompt)
        return memo.encode(self._shared_tokenizer, [text], self._prompt_special_tokens)[0].ids

    def encode_ahead(self, pairs: Sequence[tuple[str, str]], memo: EncodingMemo) -> None:
        # A PPO request repeats its prompt: each distinct one is templated once.
        prompts = [self._prompt_text(prompt) for prompt in dict.fromkeys(p for p, _ in pairs)]
        memo.encode_ahead(self._shared_tokenizer, prompts, self._prompt_special_tokens)
        memo.encode_ahead(self._shared_tokenizer, [r for _, r in pairs], add_special_tokens=False)

    def prepare(self, prompt: str, response: str, memo: EncodingMemo) -> Prepared:
        """Prompt then response ids. The prompt is cut first (the response is what is
        scored), from its left: its end (a chat template's generation header) stays against
        the response, and its leading special tokens (BOS) stay too, as `sequence_scalar`
        keeps them. A response too long alone keeps all but one token (a prompt token to
        condition on), cut at `truncation_side`."""
        prompt_ids = self._prompt_ids(prompt, memo)
        (response_encoding,) = memo.encode(
            self._shared_tokenizer, [response], add_special_tokens=False
        )
        response_ids = response_encoding.ids
        limit = self._spec.max_length
        kept_prompt: Sequence[int]
        kept_response: Sequence[int]
        if len(prompt_ids) + len(response_ids) <= limit:  # the usual case: nothing to cut
            kept_prompt, kept_response = prompt_ids, response_ids
        else:
            # Encoded without special tokens: no special token of its own to keep.
            kept_response, _ = truncate_keeping_specials(
                response_ids, set(), limit - 1, self._spec.truncation_side
            )
            kept_prompt, _ = truncate_keeping_specials(
                prompt_ids, self._special_ids, limit - len(kept_response), "left"
            )
        truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
        return Prepared(
            rows=(tuple(kept_prompt) + tuple(kept_response),),
            truncated=truncated,
            # Index of the first scored response token; with no prompt token to condition
            # on, the first response token cannot be scored.
            meta=max(len(kept_prompt), 1),
        )

    @property
    def packs_rows(self) -> bool:
        return self._packer.position_offset is not None

    # No `padded_tokens`, packed or not: the batcher cuts this model's length-sorted
    # batches by a forward call's cost, as for right-padded rows, and each cut batch then
    # runs packed. An LM is the costliest model of a typical config; handed a request's
    # items as one packed batch it held one CPU slot while the other idled once the
    # aspects were done (the default config, one client sending 16 items: 0.65x the
    # right-padded server), where cut batches run on both slots (1.05x; 8 single-item
    # clients 1.09x; scratch pair script, 3 rounds x 12 s).

    def _eager_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, W, H) from the packed tokens, the causal mask built on the device (in the
        graph when traced)."""
        mask_dtype = torch.bool if takes_boolean_mask(self._model.config) else self._model.dtype
        ids, positions, row_grid = tokens.unbind(0)
        return self._backbone(
            input_ids=ids,
            attention_mask=packed_mask(row_grid, mask_dtype, causal=True),
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state

    def _packed_inputs(
        self, rows: Sequence[Sequence[int]], layout: PackedLayout, position_offset: int
    ) -> PackedInputs:
        tokens, _ = packed_tokens(rows, layout, self._pad_id, position_offset)
        return (to_device(tokens, self.device),)

    def _response_log_probs(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        starts: np.ndarray,
        rows: Sequence[Sequence[int]],
        first_scored: Sequence[int],
    ) -> torch.Tensor:
        """(N, 2) float32: each row's summed log-probability of its tokens from
        `first_scored` on, and how many there are. `hidden` (..., H) and `ids` hold row r's
        tokens from flat cell `starts[r]` on, padded or packed alike. Position t predicts
        token t + 1, so the head reads each row from its first scored token's predecessor
        to its second-last token, all rows in one step on the device. The cells are found
        on the host: nothing here waits for the device."""
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        first = np.array(first_scored, dtype=np.int64)
        counts = np.maximum(lengths - first, 0)  # (N,)
        row_of = np.repeat(np.arange(len(rows)), counts)  # (T,)
        step = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        cells = to_device(np.repeat(starts + first - 1, counts) + step, self.device)  # (T,)
        logits = self._model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[cells])
        targets = ids.reshape(-1)[cells + 1]  # (T,)
        log_probs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
        sums = torch.zeros(len(rows), device=self.device)
        sums.index_add_(0, to_device(row_of, self.device), log_probs)
        return torch.stack([sums, to_device(counts, self.device).float()], dim=1)

    def _padded_log_probs(
        self, rows: Sequence[Sequence[int]], first_scored: Sequence[int]
    ) -> torch.Tensor:
        ids, mask = pad_right(rows, self._pad_id, self.device)
        hidden = self._backbone(
            input_ids=ids, attention_mask=mask, use_cache=False
        ).last_hidden_state  # (B, L, H)
        starts = np.arange(len(rows), dtype=np.int64) * ids.shape[1]
        return self._response_log_probs(hidden, ids, starts, rows, first_scored)

    def _packed_log_probs(
        self,
        rows: Sequence[Sequence[int]],
        first_scored: Sequence[int],
        layout: PackedLayout,
        position_offset: int,
    ) -> torch.Tensor:
        tokens, row_start = packed_tokens(rows, layout, self._pad_id, position_offset)
        tokens_on_device = to_device(tokens, self.device)
        hidden = self._hidden(tokens_on_device)  # (B, W, H)
        ids = tokens_on_device[0]
        return self._response_log_probs(hidden, ids, row_start, rows, first_scored)

    @torch.inference_mode()
    def _packing_offset(self, rows: Sequence[Sequence[int]]) -> int | None:
        """0 if `rows` packed score as they do alone, else None (packing off). The probe
        scores every token after the first: the prompt's as well as the response's."""

        def means(sums_and_counts: torch.Tensor) -> torch.Tensor:
            return sums_and_counts[:, 0] / sums_and_counts[:, 1].clamp(min=1)

        return packing_position_offset(
            lambda some, layout, offset: means(
                self._packed_log_probs(some, [1] * len(some), layout, offset)
            ),
            lambda some: means(self._padded_log_probs(some, [1] * len(some))),
            rows,
            offsets=(0,),  # rotary positions count from 0 (they would match at any offset)
            tolerance=PACKING_TOLERANCE[self._spec.dtype],
            max_positions=self._packer.max_width,
        )

    @torch.inference_mode()
    def _trace(self, rows: Sequence[Sequence[int]], position_offset: int) -> None:
        probes = probe_batches(
            rows,
            lambda some, layout: self._packed_inputs(some, layout, position_offset),
        )
        tolerance = PACKING_TOLERANCE[self._spec.dtype]
        traced = traced_forward(self._model, self._eager_hidden, probes, tolerance)
        if traced is not None:
            self._hidden, self.traced = traced, True

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        # An item with no response token to score (an empty response, an empty row) is
        # unscored (None) and runs no forward: alone, an empty row is a forward of no tokens.
        means = run_scorable(batch, lambda p: len(p.rows[0]) > p.meta, self._mean_log_probs)
        return [HolisticScore(mean, p.truncated) for mean, p in zip(means, batch, strict=True)]

    def _mean_log_probs(self, batch: Sequence[Prepared]) -> list[float]:
        """Each item's mean log-probability of its response tokens; every item has one."""
        rows = [p.rows[0] for p in batch]
        first_scored = [p.meta for p in batch]
        if self._packer.packs(rows):
            sums_and_counts = self._packer.run_indexed(
                [len(row) for row in rows],
                lambda indices, layout, offset: self._packed_log_probs(
                    [rows[i] for i in indices], [first_scored[i] for i in indices], layout, offset
                ),
            )
        else:
            sums_and_counts = self._padded_log_probs(rows, first_scored)
        # Read back once per batch, not once per item (on a GPU each read waits for it).
        pairs = sums_and_counts.double().cpu().tolist()
        return [total / count for total, count in pairs]

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "pad_token_id": self._pad_id,
            "packs_rows": self.packs_rows,
            "traced": self.traced,
        }
