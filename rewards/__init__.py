"""Reward functions: protocol, registry and built-ins (see `rewards.registry`).

Importing this package registers the built-in rewards of `rewards.verifiable` and `rewards.environment`.
"""

from rewards import environment, verifiable  # noqa: F401  (registers the built-ins)
from rewards.registry import (
    REWARDS,
    RewardError,
    call_reward,
    check_reward_output,
    register_reward,
    resolve_reward,
    signature_problems,
)
from rewards.verifiable import REFUSAL_TEXT, is_refusal

__all__ = [
    "REFUSAL_TEXT",
    "REWARDS",
    "RewardError",
    "call_reward",
    "check_reward_output",
    "is_refusal",
    "register_reward",
    "resolve_reward",
    "signature_problems",
]
