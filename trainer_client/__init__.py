"""trainer_client: call alarm-serve from a PPO trainer.

    from trainer_client import RewardClient
    with RewardClient("http://127.0.0.1:8000") as client:
        client.wait_until_ready()
        batch = client.score([(prompt, response), ...])   # results in input order
        batch.rewards, batch.results[0].dense, batch.reward_definition

Errors are documented in `trainer_client._errors`; the client never imports `service`.
"""

from trainer_client._client import AsyncRewardClient, RewardClient
from trainer_client._errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    RewardClientError,
    ServerError,
    ServerUnavailable,
    Unauthorized,
)
from trainer_client._types import (
    AspectReward,
    DenseReward,
    Holistic,
    RetryPolicy,
    RewardBatch,
    RewardResult,
    Segment,
    Timeouts,
)
from trainer_client.adapters import make_reward_func
from trainer_client.align import align_rewards, align_rewards_batch, align_to_offsets

__all__ = [
    "AspectReward",
    "AsyncRewardClient",
    "DeadlineExceeded",
    "DenseReward",
    "Holistic",
    "InvalidRequest",
    "Overloaded",
    "ProtocolError",
    "RetryPolicy",
    "RewardBatch",
    "RewardClient",
    "RewardClientError",
    "RewardResult",
    "Segment",
    "ServerError",
    "ServerUnavailable",
    "Timeouts",
    "Unauthorized",
    "align_rewards",
    "align_rewards_batch",
    "align_to_offsets",
    "make_reward_func",
]
