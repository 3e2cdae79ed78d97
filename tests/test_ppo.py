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
    clipped_value_loss,
    generalized_advantages,
    masked_whiten,
)
from trainer_client.ppo.trainer import cut_after_stop, stop_token_ids

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


def test_gae_discounts_by_gamma_and_lambda():
    """With gamma < 1 (the hand computation above has gamma 1, where dropping it passes)."""
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.3, 0.6, 0.9]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    advantages, _ = generalized_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    a2 = 2.0 - 0.9
    a1 = 0.0 + gamma * 0.9 - 0.6 + gamma * lam * a2
    a0 = 1.0 + gamma * 0.6 - 0.3 + gamma * lam * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2])


def test_whitening_scales_the_masked_positions_to_unit_variance():
    x = torch.tensor([[1.0, 2.0, 6.0, 100.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    white = masked_whiten(x, mask)
    kept = white[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)


def test_value_loss_takes_the_worse_of_the_clipped_and_unclipped_errors():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, -1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss = clipped_value_loss(values, old, returns, torch.ones(1, 3), clip_range=0.2)
    # Position 0: clipped 0.2 -> (0.2-2)^2 = 3.24 beats (1-2)^2 = 1; position 1: (-1-1)^2 = 4
    # beats (-0.2-1)^2 = 1.44; position 2: 0.1 is inside the clip, 0.01 both ways.
    assert loss.item() == pytest.approx(0.5 * (3.24 + 4.0 + 0.01) / 3)


def test_policy_loss_reports_the_old_to_new_kl_over_real_tokens_only():
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.1, -0.3, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    result = clipped_policy_loss(new, old, torch.zeros(1, 3), mask, clip_range=0.2)
    assert result.approx_kl == pytest.approx(0.5 * (0.1**2 + 0.3**2) / 2)


def test_the_ends_of_a_response_are_every_stop_id_generation_uses():
    """The audit: only the tokenizer's EOS ended a response; `generate` stops on every id of
    the generation config (Llama-3 Instruct: three) and fills the row with pad ids, which
    then took KL, rewards and gradients as if sampled."""
    lm = type("LM", (), {"generation_config": type("G", (), {"eos_token_id": [9, 3]})()})()
    tokenizer = type("Tok", (), {"eos_token_id": 2})()
    assert stop_token_ids(lm, tokenizer) == [2, 3, 9]
    pad = 0
    response = torch.tensor([[70, 71, 3, 0, 0, 0], [70, 71, 2, 0, 0, 0], [70, 71, 72, 73, 9, 0]])
    cut, mask = cut_after_stop(response, torch.tensor([2, 3, 9]), pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert cut.tolist() == response.tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_response_log_probs_are_the_sampled_distributions_at_each_response_token(
    tmp_path, temperature
):
    """Position t's logits score token t + 1 (left-padded prompt, right-padded response),
    divided by the sampling temperature as `generate` divides them (the audit: they were
    not, so the ratio and KL were not those of the distribution that sampled)."""
    from transformers import AutoModelForCausalLM

    from trainer_client.ppo.policy import PolicyWithValueHead, response_slice

    lm = AutoModelForCausalLM.from_pretrained(tiny_models.build_causal_lm(tmp_path / "lm"))
    lm.eval()
    prompt, reply = [5, 6, 7], [8, 9, 10, 11]
    pad = 0
    input_ids = torch.tensor([[pad, *prompt, *reply], [*prompt, 12, *reply[:3], pad]])
    attention = (input_ids != pad).long()
    attention[1, -1] = 0
    policy = PolicyWithValueHead(lm)
    with torch.no_grad():
        logp, values = response_slice(policy, input_ids, attention, 4, temperature)
        alone = lm(torch.tensor([[*prompt, *reply]])).logits[0]  # unpadded, one row
    expected = torch.log_softmax(alone[2:-1] / temperature, dim=-1)
    want = expected[torch.arange(4), torch.tensor(reply)]
    assert logp[0].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert values is not None and values.shape == (2, 4)


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
