"""A small PPO for causal LMs that takes its per-token rewards from alarm-serve."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer_client.ppo.run import train
    from trainer_client.ppo.trainer import PPOConfig, PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer", "train"]


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `alarm-ppo` (trainer_client.ppo.cli) can
    # then name the missing `ppo` extra instead of failing on `import torch` in a traceback.
    if name == "train":
        from trainer_client.ppo.run import train

        return train
    if name in ("PPOConfig", "PPOTrainer"):
        from trainer_client.ppo import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
