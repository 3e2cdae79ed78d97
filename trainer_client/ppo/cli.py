"""`alarm-ppo`: train a causal LM with PPO against a running alarm-serve."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer_client._client import RewardClient

try:
    from trainer_client.ppo.run import load_prompts, train
    from trainer_client.ppo.trainer import PPOConfig, PPOTrainer
except ModuleNotFoundError as exc:  # installed without the extra: one line, not a traceback
    if (exc.name or "").partition(".")[0] not in {"torch", "transformers", "matplotlib", "tqdm"}:
        raise  # not one the `ppo` extra installs
    sys.exit(f"alarm-ppo: no module {exc.name!r}: pip install 'alarm-serve[ppo]'")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alarm-ppo", description=__doc__)
    parser.add_argument("--server", action="append", required=True, help="base URL (repeatable)")
    parser.add_argument(
        "--api-key", default=os.environ.get("ALARM_API_KEY"), help="(env ALARM_API_KEY)"
    )
    parser.add_argument("--policy", required=True, help="causal LM folder or hub id")
    parser.add_argument("--prompts", type=Path, required=True, help=".jsonl (prompt) or .txt")
    parser.add_argument("--out", type=Path, default=Path("runs/ppo"))
    parser.add_argument("--steps", type=_positive, default=20)
    parser.add_argument("--batch-size", type=_positive, default=PPOConfig.batch_size)
    parser.add_argument("--mini-batch-size", type=_positive, default=PPOConfig.mini_batch_size)
    parser.add_argument("--ppo-epochs", type=_positive, default=PPOConfig.ppo_epochs)
    parser.add_argument("--lr", type=float, default=PPOConfig.learning_rate)
    parser.add_argument("--max-new-tokens", type=_positive, default=PPOConfig.max_new_tokens)
    parser.add_argument("--max-prompt-tokens", type=_positive, default=PPOConfig.max_prompt_tokens)
    parser.add_argument("--init-kl-coef", type=float, default=PPOConfig.init_kl_coef)
    parser.add_argument("--mode", help="combination mode to request (default: server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = PPOConfig(
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        learning_rate=args.lr,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        init_kl_coef=args.init_kl_coef,
        mode=args.mode,
        seed=args.seed,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    lm = AutoModelForCausalLM.from_pretrained(args.policy)
    with RewardClient(args.server, api_key=args.api_key) as client:
        client.wait_until_ready()
        trainer = PPOTrainer(lm, tokenizer, client, config, device)
        history = train(
            trainer, load_prompts(args.prompts), args.steps, args.out, not args.no_progress
        )
    first, last = history[0]["reward_mean"], history[-1]["reward_mean"]
    print(f"reward {first:.4f} -> {last:.4f}; log and curves.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
