"""A small, readable PPO for causal LMs whose per-token rewards come from alarm-serve.

One step: sample responses, score them over HTTP, put the character-keyed dense rewards
on the policy's own tokens, subtract a per-token KL penalty to a frozen reference, GAE,
then a few epochs of clipped PPO on minibatches with early stopping on a KL target.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer_client._client import RewardClient
from trainer_client._types import RewardBatch
from trainer_client.align import align_to_offsets, generated_token_offsets
from trainer_client.ppo.losses import (
    AdaptiveKLController,
    clipped_policy_loss,
    clipped_value_loss,
    generalized_advantages,
    masked_whiten,
)
from trainer_client.ppo.policy import PolicyWithValueHead, response_slice
from trainer_client.ppo.prompts import fit_prompt, templated


@dataclass(frozen=True)
class PPOConfig:
    batch_size: int = 8
    mini_batch_size: int = 4
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    max_prompt_tokens: int = 256
    max_new_tokens: int = 32
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_coef: float = 0.1
    init_kl_coef: float = 0.05
    target_kl: float | None = 6.0  # sequence KL to the reference; None = fixed coefficient
    kl_horizon: int = 10_000
    early_stop_kl: float = 0.1  # per-token KL old -> new policy that ends a step's epochs
    max_grad_norm: float = 1.0
    mode: str | None = None  # combination mode requested from the service
    seed: int = 0


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + T): left-padded prompts, then right-padded responses
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T): response tokens up to and including EOS
    prompt_width: int
    prompts: list[str]
    responses: list[str]
    response_tokens: list[list[int]] = field(default_factory=list)


def stop_token_ids(lm: Any, tokenizer: Any) -> list[int]:
    """Every id a response ends on: the generation config's (often several, e.g. Llama-3's
    end of turn and end of text) and the tokenizer's EOS."""
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None})


def cut_after_stop(
    response: torch.Tensor, stop_ids: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response ids with everything after the first stop id padded, and the mask of the
    tokens kept (the stop id included): `generate` fills a row that stopped early with pad
    ids, which no one sampled and which must get no reward, KL or gradient."""
    is_stop = torch.isin(response, stop_ids).int()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0
    return torch.where(after_stop, pad_id, response), (~after_stop).float()


class PPOTrainer:
    def __init__(
        self, lm: Any, tokenizer: Any, client: RewardClient, config: PPOConfig, device: str
    ) -> None:
        torch.manual_seed(config.seed)
        self.config = config
        self.client = client
        self.device = device
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.reference = copy.deepcopy(lm).to(device).eval().requires_grad_(False)
        self.policy = PolicyWithValueHead(lm).to(device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.learning_rate)
        self.kl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        self._rng = random.Random(config.seed)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        limit = self.config.max_prompt_tokens
        fitted = [fit_prompt(self.tokenizer, p, limit) for p in prompts]
        encoded = self.tokenizer(
            [templated(self.tokenizer, p) for p in fitted],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not self.tokenizer.chat_template,
        ).to(self.device)
        prompt_width = encoded["input_ids"].shape[1]
        stop_ids = stop_token_ids(self.policy.lm, self.tokenizer)
        generated = self.policy.lm.generate(
            **encoded,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=self.config.temperature,
            max_new_tokens=self.config.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # (B, P + T)
        response, response_mask = cut_after_stop(
            generated[:, prompt_width:],
            torch.tensor(stop_ids, device=generated.device),
            self.tokenizer.pad_token_id,
        )
        tokens = [
            row[: int(m.sum())].tolist() for row, m in zip(response, response_mask, strict=True)
        ]
        return Rollout(
            input_ids=torch.cat([encoded["input_ids"], response], dim=1),
            attention_mask=torch.cat([encoded["attention_mask"], response_mask.long()], dim=1),
            response_mask=response_mask,
            prompt_width=prompt_width,
            prompts=fitted,  # scored as the policy saw them
            responses=[self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
            response_tokens=tokens,
        )

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, RewardBatch]:
        """Per-token service rewards (B, T) aligned to the policy's own generated tokens."""
        batch = self.client.score(
            list(zip(rollout.prompts, rollout.responses, strict=True)), mode=self.config.mode
        )
        scores = torch.zeros_like(rollout.response_mask)
        for i, (result, tokens) in enumerate(
            zip(batch.results, rollout.response_tokens, strict=True)
        ):
            offsets = generated_token_offsets(tokens, self.tokenizer)
            row = align_to_offsets(result.dense, offsets)
            scores[i, : len(row)] = torch.tensor(row)
        return scores, batch

    def step(self, prompts: Sequence[str]) -> dict[str, Any]:
        started = time.perf_counter()
        c = self.config
        rollout = self.rollout(prompts)
        score_started = time.perf_counter()
        scores, batch = self.score(rollout)
        score_s = time.perf_counter() - score_started
        mask = rollout.response_mask

        with torch.no_grad():
            old_logp, old_values = response_slice(
                self.policy,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.prompt_width,
                c.temperature,
            )
            ref_logp, _ = response_slice(
                self.reference,
                rollout.input_ids,
                rollout.attention_mask,
                rollout.prompt_width,
                c.temperature,
            )
            assert old_values is not None
            kl = (old_logp - ref_logp) * mask  # (B, T)
            rewards = scores - self.kl.value * kl
            advantages, returns = generalized_advantages(
                rewards, old_values * mask, mask, c.gamma, c.lam
            )
            advantages = masked_whiten(advantages, mask)

        losses = self._optimize(rollout, old_logp, old_values, advantages, returns)
        sequence_kl = kl.sum(-1).mean().item()
        kl_coef = self.kl.value
        self.kl.update(sequence_kl, len(prompts))
        results = batch.results
        stats: dict[str, Any] = {
            "reward_mean": statistics.fmean(batch.rewards),
            "kl": sequence_kl,
            "kl_coef": kl_coef,
            "holistic_mean": statistics.fmean(r.holistic.normalized for r in results),
            "gate_rate": statistics.fmean(float(r.gate_passed) for r in results),
            "response_tokens_mean": mask.sum(-1).mean().item(),
            "score_s": score_s,
            "tokens_per_s": mask.sum().item() / (time.perf_counter() - started),
            "reward_definition": batch.reward_definition,
            **{
                f"aspect/{n}": statistics.fmean(r.aspects[n].value for r in results)
                for n in results[0].aspects
            },
            **losses,
        }
        return stats

    def _optimize(
        self,
        rollout: Rollout,
        old_logp: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> dict[str, float]:
        c = self.config
        mask = rollout.response_mask
        size = len(rollout.prompts)
        history: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clip_fraction": [],
            "approx_kl": [],
        }
        epochs_run = 0
        for _ in range(c.ppo_epochs):
            order = list(range(size))
            self._rng.shuffle(order)
            epoch_kl = []
            for start in range(0, size, c.mini_batch_size):
                idx = torch.tensor(order[start : start + c.mini_batch_size])
                logp, values = response_slice(
                    self.policy,
                    rollout.input_ids[idx],
                    rollout.attention_mask[idx],
                    rollout.prompt_width,
                    c.temperature,
                )
                assert values is not None
                policy = clipped_policy_loss(
                    logp, old_logp[idx], advantages[idx], mask[idx], c.clip_range
                )
                value_loss = clipped_value_loss(
                    values, old_values[idx], returns[idx], mask[idx], c.clip_range_value
                )
                loss = policy.loss + c.value_coef * value_loss
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)
                self.optimizer.step()
                history["policy_loss"].append(policy.loss.item())
                history["value_loss"].append(value_loss.item())
                history["clip_fraction"].append(policy.clip_fraction)
                history["approx_kl"].append(policy.approx_kl)
                epoch_kl.append(policy.approx_kl)
            epochs_run += 1
            if statistics.fmean(epoch_kl) > c.early_stop_kl:
                break
        summary = {k: statistics.fmean(v) for k, v in history.items()}
        summary["ppo_epochs_run"] = epochs_run
        return summary
