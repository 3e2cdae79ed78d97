"""A generative holistic reward: mean log p(response | prompt) under a causal LM.

Needs no trained head, so a packaged instruct model gives a meaningful reward offline.
The lm head is applied only at response positions, never to the whole (B, L, V) grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from service.config import LmLikelihoodHolistic
from service.errors import ConfigError
from service.models.base import HolisticScore, ModelOutput, Prepared, Role
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
)


class LmLikelihoodModel:
    kind = "lm_likelihood"
    role: Role = "holistic"

    def __init__(self, spec: LmLikelihoodHolistic, resolved_path: str, device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.name, self.device = spec.name, device
        self._spec = spec
        self._tokenizer = load_tokenizer(resolved_path)
        self._model = load_pretrained(AutoModelForCausalLM, resolved_path, spec.dtype, device)
        if spec.prompt_template is None and not self._tokenizer.chat_template:
            raise ConfigError(f"{spec.name}: tokenizer has no chat template; set prompt_template")
        self._pad_id = ensure_pad_token(self._tokenizer, self._model)
        self._shared_tokenizer = SharedTokenizer(self._tokenizer)
        # Only the backbone runs on every token; the head runs on the response's positions.
        self._backbone = self._model.base_model
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
        """Prompt then response ids; the prompt is cut from the left first (the response is
        what is scored), then the response from the right if it alone is too long."""
        prompt_ids = self._prompt_ids(prompt, memo)
        (response_encoding,) = memo.encode(
            self._shared_tokenizer, [response], add_special_tokens=False
        )
        response_ids = response_encoding.ids
        limit = self._spec.max_length
        kept_response = response_ids[: max(limit - 1, 0)]
        kept_prompt = prompt_ids[max(len(prompt_ids) - (limit - len(kept_response)), 0) :]
        truncated = len(kept_prompt) + len(kept_response) < len(prompt_ids) + len(response_ids)
        return Prepared(
            rows=(tuple(kept_prompt + kept_response),),
            truncated=truncated,
            # Index of the first scored response token; with no prompt token to condition
            # on, the first response token cannot be scored.
            meta=max(len(kept_prompt), 1),
        )

    @torch.inference_mode()
    def run(self, batch: Sequence[Prepared]) -> list[ModelOutput]:
        ids, mask = pad_right([p.rows[0] for p in batch], self._pad_id, self.device)
        hidden = self._backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        # hidden: (B, L, H)
        # Position t predicts token t + 1: select the states that predict response tokens,
        # from each row's first scored token (meta) to its end, in one step on the device.
        first = torch.tensor([p.meta for p in batch], device=self.device)  # (B,)
        positions = torch.arange(ids.shape[1], device=self.device)  # (L,)
        predicts_response = (positions >= first[:, None] - 1) & (
            positions < mask.sum(1, keepdim=True) - 1
        )  # (B, L)
        rows_t, pos_t = predicts_response.nonzero(as_tuple=True)  # (N,), (N,)
        if rows_t.numel() == 0:
            return [HolisticScore(None, p.truncated) for p in batch]
        logits = self._model.get_output_embeddings()(hidden[rows_t, pos_t])  # (N, V)
        targets = ids[rows_t, pos_t + 1]  # (N,)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
        sums = torch.zeros(len(batch), device=self.device).index_add_(0, rows_t, logp)  # (B,)
        counts = torch.bincount(rows_t, minlength=len(batch))  # (B,)
        # Read back once per batch, not once per item (on a GPU each read waits for it).
        means = (sums.double() / counts.clamp(min=1)).tolist()
        return [
            HolisticScore(mean if n else None, p.truncated)
            for mean, n, p in zip(means, counts.tolist(), batch, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **runtime_details(self._model.config, self._spec.compile),
            "pad_token_id": self._pad_id,
        }
