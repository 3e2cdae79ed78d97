"""The PPO loop: its math on hand-made numbers, and learning through a real service."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests import tiny_models
from tests.server_process import running_server
from trainer_client.ppo.losses import (
    AdaptiveKLController,
    clipped_policy_loss,
    generalized_advantages,
    masked_whiten,
)

ALARM_PPO = str(Path(sys.executable).with_name("alarm-ppo"))


def test_gae_matches_a_hand_computation_and_stops_at_the_mask():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    delta2 = 1.0 - 0.1
    delta1 = 0.0 + 0.1 - 0.2
    delta0 = 0.0 + 0.2 - 0.5
    a2 = delta2
    a1 = delta1 + 0.5 * a2
    a0 = delta0 + 0.5 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1])


def test_whitening_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = masked_whiten(x, mask)
    assert white[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white[0, 3].item() == 0.0


def test_policy_loss_clips_large_ratios():
    old = torch.zeros(1, 2)
    new = torch.tensor([[1.0, -1.0]])  # ratios e and 1/e, far outside 1 +- 0.2
    advantages = torch.tensor([[1.0, -1.0]])
    result = clipped_policy_loss(new, old, advantages, torch.ones(1, 2), clip_range=0.2)
    assert result.loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert result.clip_fraction == 1.0


def test_adaptive_kl_controller_moves_toward_the_target():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(current_kl=12.0, batch_size=10)
    assert controller.value == pytest.approx(0.1 * 1.02)
    controller.update(current_kl=0.0, batch_size=10)
    assert controller.value < 0.1 * 1.02


@pytest.mark.slow
def test_alarm_ppo_learns_a_verifiable_reward_through_the_service(tmp_path):
    """Reward = lowercase letters / 16 (a regex rule, aspect_only): a random tiny policy
    starts near 26/260 of its bytes and must clearly raise it within 30 PPO steps."""
    policy = tiny_models.build_causal_lm(tmp_path / "policy")
    config = {
        "holistic": {
            "name": "likelihood",
            "kind": "lm_likelihood",
            "path": str(policy),
            "device": "cpu",
            "max_length": 256,
        },
        "aspects": [
            {
                "name": "lowercase",
                "kind": "rule",
                "rule": "regex",
                "pattern": "[a-z]",
                "mean": 16,
                "sigmoid": False,
            },
        ],
        "combination": {"mode": "aspect_only"},
        "batching": {"max_wait_ms": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write something.\nSay hi.\nTell me a story.\nWhat is up?\n")
    out = tmp_path / "run"
    with running_server(tmp_path / "config.yaml", tmp_path) as url:
        result = subprocess.run(
            [
                ALARM_PPO,
                "--server",
                url,
                "--policy",
                str(policy),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--steps",
                "30",
                "--batch-size",
                "16",
                "--mini-batch-size",
                "8",
                "--lr",
                "1e-3",
                "--max-new-tokens",
                "16",
                "--init-kl-coef",
                "0.01",
                "--seed",
                "0",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30
    first = sum(s["reward_mean"] for s in log[:5]) / 5
    last = sum(s["reward_mean"] for s in log[-5:]) / 5
    assert last > first + 0.1, (first, last)
    assert {
        "kl",
        "kl_coef",
        "holistic_mean",
        "gate_rate",
        "aspect/lowercase",
        "policy_loss",
        "value_loss",
        "tokens_per_s",
    } <= set(log[-1])
    assert (out / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--max-prompt-tokens"])
def test_alarm_ppo_refuses_a_count_below_one_before_loading_anything(flag, capsys):
    from trainer_client.ppo.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--server", "http://x", "--policy", "p", "--prompts", "p.txt", flag, "0"])
    assert exited.value.code == 2
    assert f"argument {flag}: must be at least 1, not 0" in capsys.readouterr().err
