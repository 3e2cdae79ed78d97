"""Reward functions in the shapes that existing trainers call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trainer_client._client import RewardClient


def _text(value: Any, role: str) -> str:
    """TRL passes plain strings or conversations (lists of {"role", "content"})."""
    if isinstance(value, str):
        return value
    turns = [m for m in value if m.get("role") == role] or list(value)
    return str(turns[-1]["content"]) if turns else ""


def make_reward_func(
    client: RewardClient, *, mode: str | None = None
) -> Callable[..., list[float]]:
    """A TRL-style reward function `(prompts, completions, **kwargs) -> list[float]`.

    Usable as `reward_funcs=[make_reward_func(client)]` in TRL's GRPOTrainer; it raises
    the client's typed errors rather than ever returning a partial or padded list.
    """

    def alarm_reward(
        prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        items = [
            (_text(p, "user"), _text(c, "assistant"))
            for p, c in zip(prompts, completions, strict=True)
        ]
        return client.rewards(items, mode=mode)

    return alarm_reward
