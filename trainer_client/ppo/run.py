"""The training loop around PPOTrainer: prompts, progress bar, JSONL log, and a PNG plot."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trainer_client.ppo.trainer import PPOTrainer


def prompt_batches(prompts: Sequence[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless shuffled batches: each pass over a new shuffle yields its whole batches, so
    the few prompts left over from one pass (fewer than a batch) wait for a later one."""
    rng = random.Random(seed)
    order = list(prompts)
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        if len(order) < batch_size:
            yield [rng.choice(order) for _ in range(batch_size)]


def load_prompts(path: Path) -> list[str]:
    """JSONL with a `prompt` field per line, or plain text with one prompt per line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["prompt"]) for line in lines]
    return lines


def train(
    trainer: PPOTrainer,
    prompts: Sequence[str],
    steps: int,
    out_dir: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run `steps` PPO steps, logging each to out_dir/log.jsonl; plot to out_dir/curves.png."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    batches = prompt_batches(prompts, trainer.config.batch_size, trainer.config.seed)
    with (
        (out_dir / "log.jsonl").open("w") as log,
        tqdm(total=steps, disable=not progress, desc="ppo") as bar,
    ):
        for step in range(steps):
            stats = {"step": step, **trainer.step(next(batches))}
            history.append(stats)
            log.write(json.dumps(stats) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['kl']:.3f}")
            bar.update()
    plot_curves(history, out_dir / "curves.png")
    return history


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (reward_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    reward_ax.plot(steps, [h["reward_mean"] for h in history], color="tab:blue")
    reward_ax.set(title="mean reward (alarm-serve)", xlabel="PPO step", ylabel="reward")
    kl_ax.plot(steps, [h["kl"] for h in history], color="tab:red")
    kl_ax.set(title="KL to reference (per sequence)", xlabel="PPO step", ylabel="KL")
    for ax in (reward_ax, kl_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
