"""The `environment` reward: what a multi-turn environment's optional `reward()` returned (grpo.environments).

The rollout passes it as the column ``env_reward`` (None where the environment has no reward for the sample).
"""

from __future__ import annotations

from rewards.registry import register_reward


@register_reward("environment")
def environment(prompts: list[str], completions: list[str], env_reward: list, **columns) -> list[float | None]:
    """The environment's own reward of each episode; None (not applicable) where it gave none."""
    return [None if v is None else float(v) for v in env_reward]
