"""A small PPO for causal LMs that takes its per-token rewards from alarm-serve."""

from trainer_client.ppo.run import train
from trainer_client.ppo.trainer import PPOConfig, PPOTrainer

__all__ = ["PPOConfig", "PPOTrainer", "train"]
