"""The policy: a causal LM with a scalar value head on its last hidden state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PolicyWithValueHead(nn.Module):
    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, L, V) and values (B, L); positions count real tokens only."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
        )
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)  # (B, L)
        return out.logits.float(), values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits; logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_slice(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and values, for the policy) of the response tokens after the prompt, under
    the distribution they were sampled from: the logits divided by the sampling
    `temperature`, as `generate` divides them."""
    if isinstance(model, PolicyWithValueHead):
        logits, values = model(input_ids, attention_mask)
    else:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits.float()
        values = None
    # Position t predicts token t + 1: the response starts at prompt_width.
    response = input_ids[:, prompt_width:]  # (B, T)
    logp = token_logprobs(logits[:, prompt_width - 1 : -1] / temperature, response)
    return logp, None if values is None else values[:, prompt_width - 1 : -1]
