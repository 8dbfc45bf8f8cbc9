"""Recipe checks for the `rewards:` list, run by grpo/preflight.py before anything loads (moved from
rewards/checks.py: they read the recipe, the run's folders and the datasets, which `rewards/` never does).

Each reward resolves (registered name, `package.module:function`, reward-model folder or `hf:` id,
or a folder an earlier `rm` stage of the pipeline writes); its recipe settings fit its signature
(built-ins: their keyword-only settings, as `**columns` would swallow a misspelt one); it takes
`**columns`; the dataset columns it reads exist; at most one `role: safety`, exactly one when
safety.enabled. Every problem is one line naming `rewards.<i>`.
"""

from __future__ import annotations

from pathlib import Path

from grpo import rules
from grpo.errors import UserError


def reward_problems(recipe, stage: str, earlier, columns: set | None, data_key: str) -> list[str]:
    p = []
    for i, spec in enumerate(recipe.rewards):
        p += _one_reward(recipe, i, spec, earlier, columns, data_key)
    return (
        p
        + rules.reward_roles(recipe.rewards, stage=stage, safety_enabled=recipe.safety.enabled)
        + rules.constraints(recipe)
    )


def _one_reward(recipe, i, spec, earlier, columns, data_key) -> list[str]:
    from rewards import REWARDS, RewardError, resolve_reward, signature_problems

    name = spec.name.replace("{output_dir}", str(recipe.run.output_dir))  # as grpo.scoring.build_rewards does
    if name not in REWARDS and (name.startswith("hf:") or Path(name, "config.json").is_file()):
        return _reward_model_problems(i, spec)
    if name not in REWARDS and ":" not in name and ("/" in name or name.startswith((".", "~"))):
        if "rm" in earlier and _inside(name, Path(recipe.run.output_dir) / "rm"):
            return _reward_model_problems(i, spec)  # the pipeline's rm stage writes it
        return [
            f"rewards.{i}: reward model folder '{name}' does not exist or holds no config.json; train it first "
            "(`python -m grpo rm RECIPE`, or put rm before train in run.stages) or fix the path"
        ]
    try:
        fn = resolve_reward(name)
    except RewardError as e:
        return [f"rewards.{i}: {e}"]
    return signature_problems(
        fn,
        spec.kwargs,
        where=f"rewards.{i} ({spec.name})",
        registered=name in REWARDS,
        columns=columns,
        data_key=data_key,
    )


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).expanduser().resolve().relative_to(folder.expanduser().resolve())
        return True
    except ValueError:
        return False


def _reward_model_problems(i: int, spec) -> list[str]:
    from rewards.models import SPEC_KWARGS, check_template

    if "trust_remote_code" in spec.kwargs:
        return [
            f"rewards.{i} ({spec.name}): trust_remote_code is not supported for reward models "
            "(only architectures that ship with transformers load); remove it"
        ]
    unknown = [k for k in spec.kwargs if k not in SPEC_KWARGS]
    if unknown:
        return [
            f"rewards.{i} ({spec.name}): unknown reward-model setting(s) {', '.join(unknown)}; valid: "
            f"{', '.join(SPEC_KWARGS)}"
        ]
    if "template" in spec.kwargs:
        try:
            check_template(str(spec.kwargs["template"]))
        except UserError as e:
            return [f"rewards.{i}: {e}"]
    return []
