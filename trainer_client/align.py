"""Put the service's character-keyed dense rewards onto the policy's own tokens.

The service keys every reward to a character end offset of the response; here each reward
moves to the token that holds the character just before that offset, so the holistic term
(at end == len(response)) lands on the last response token. Rows are aligned one by one
and right-padded afterwards, so unequal lengths in a batch can never shift a reward onto
padding (the pitfall of the released ALaRM PPO code).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from trainer_client._types import DenseReward

DenseLike = DenseReward | Mapping[str, Any]


def _end_and_reward(entry: DenseLike) -> tuple[int, float]:
    if isinstance(entry, DenseReward):
        return entry.end, entry.reward
    return int(entry["end"]), float(entry["reward"])


def align_to_offsets(dense: Sequence[DenseLike], offsets: Sequence[tuple[int, int]]) -> list[float]:
    """Per-token rewards for tokens with these (start, end) character offsets."""
    if not offsets:
        raise ValueError("the response has no tokens to carry its rewards")
    starts = [start for start, _ in offsets]
    rewards = [0.0] * len(offsets)
    for entry in dense:
        end, reward = _end_and_reward(entry)
        # The last token that starts before `end` holds character end - 1.
        index = max(bisect.bisect_left(starts, end) - 1, 0)
        rewards[index] += reward
    return rewards


def _shared_start(prefix: str, text: str) -> int:
    """How many characters `prefix` starts with that `text` starts with too."""
    if text.startswith(prefix):
        return len(prefix)
    return next(
        (i for i, (a, b) in enumerate(zip(prefix, text, strict=False)) if a != b),
        min(len(prefix), len(text)),
    )


def generated_token_offsets(token_ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int]]:
    """Character spans of generated tokens inside `tokenizer.decode(token_ids)`.

    Decoding prefixes gives each token's end: the characters its prefix shares with the
    whole text. A prefix that ends inside a multi-byte character decodes it as U+FFFD,
    which the whole text does not have there, so the token that completes the character
    holds it (and its reward), not the first of its bytes. Ends are clamped to stay
    monotonic.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    prefixes = (
        tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)
        for i in range(len(token_ids))
    )
    ends = [_shared_start(prefix, text) for prefix in prefixes]
    for i in range(len(ends) - 2, -1, -1):
        ends[i] = min(ends[i], ends[i + 1])
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, strict=True))


def response_offsets(response_text: str, tokenizer: Any) -> list[tuple[int, int]]:
    encoded = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(s), int(e)) for s, e in encoded["offset_mapping"]]


def align_rewards(dense: Sequence[DenseLike], response_text: str, tokenizer: Any) -> list[float]:
    """Per-token rewards for `tokenizer(response_text)` (a fast tokenizer with offsets)."""
    return align_to_offsets(dense, response_offsets(response_text, tokenizer))


def align_rewards_batch(
    dense_batch: Sequence[Sequence[DenseLike]],
    response_texts: Sequence[str],
    tokenizer: Any,
    width: int | None = None,
) -> Any:
    """A right-padded (B, width) float tensor of per-token rewards; padding gets 0."""
    import torch

    rows = [
        align_rewards(dense, text, tokenizer)
        for dense, text in zip(dense_batch, response_texts, strict=True)
    ]
    width = width or max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width)  # (B, L)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than width {width}")
        out[i, : len(row)] = torch.tensor(row)
    return out
