"""Recipe checks for the `rewards:` list, run by grpo/preflight.py before anything loads.

Each reward resolves (registered name, `package.module:function`, reward-model folder or `hf:` id,
or a folder an earlier `rm` stage of the pipeline writes); its recipe settings fit its signature
(built-ins: their keyword-only settings, as `**columns` would swallow a misspelt one); it takes
`**columns`; the dataset columns it reads exist; at most one `role: safety`, exactly one when
safety.enabled. Every problem is one line naming `rewards.<i>`.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from grpo.errors import UserError


def reward_problems(recipe, stage: str, earlier, columns: set | None, data_key: str) -> list[str]:
    specs = recipe.rewards
    p = []
    if stage == "train" and not specs:
        p.append("the recipe has no rewards: add e.g. `rewards: [{name: accuracy, weight: 1.0}]`")
    for i, spec in enumerate(specs):
        p += _one_reward(recipe, i, spec, earlier, columns, data_key)
    n_safety = sum(s.role == "safety" for s in specs)
    if n_safety > 1:
        p.append(f"{n_safety} rewards have role: safety; at most one may (the cost the safety constraint bounds)")
    if stage == "train" and recipe.safety.enabled and n_safety == 0:
        p.append("safety.enabled=true needs a reward with role: safety (a cost model, higher = less safe), e.g. "
                 "{name: runs/x/rm/safety, role: safety}; add one or set safety.enabled=false")
    return p


def _one_reward(recipe, i, spec, earlier, columns, data_key) -> list[str]:
    from rewards import REWARDS, RewardError, resolve_reward

    name = spec.name.replace("{output_dir}", str(recipe.run.output_dir))  # as grpo.scoring.build_rewards does
    if name not in REWARDS and (name.startswith("hf:") or Path(name, "config.json").is_file()):
        return _reward_model_problems(i, spec)
    if name not in REWARDS and ":" not in name and ("/" in name or name.startswith((".", "~"))):
        if "rm" in earlier and _inside(name, Path(recipe.run.output_dir) / "rm"):
            return _reward_model_problems(i, spec)  # the pipeline's rm stage writes it
        return [f"rewards.{i}: reward model folder '{name}' does not exist or holds no config.json; train it first "
                "(`python -m grpo rm RECIPE`, or put rm before train in run.stages) or fix the path"]
    try:
        fn = resolve_reward(name)
    except RewardError as e:
        return [f"rewards.{i}: {e}"]
    return _signature_problems(i, spec, fn, name in REWARDS, columns, data_key)


def _inside(path: str, folder: Path) -> bool:
    try:
        Path(path).expanduser().resolve().relative_to(folder.expanduser().resolve())
        return True
    except ValueError:
        return False


def _reward_model_problems(i: int, spec) -> list[str]:
    from rewards.models import SPEC_KWARGS, check_template

    if "trust_remote_code" in spec.kwargs:
        return [f"rewards.{i} ({spec.name}): trust_remote_code is not supported for reward models "
                "(only architectures that ship with transformers load); remove it"]
    unknown = [k for k in spec.kwargs if k not in SPEC_KWARGS]
    if unknown:
        return [f"rewards.{i} ({spec.name}): unknown reward-model setting(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KWARGS)}"]
    if "template" in spec.kwargs:
        try:
            check_template(str(spec.kwargs["template"]))
        except UserError as e:
            return [f"rewards.{i}: {e}"]
    return []


def _signature_problems(i, spec, fn, registered: bool, columns: set | None, data_key: str) -> list[str]:
    """Recipe settings accepted; dataset columns accepted (**columns); the columns it reads present."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    where = f"rewards.{i} ({spec.name})"
    named = [n for n, q in params.items() if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    var_kw = any(q.kind == q.VAR_KEYWORD for q in params.values())
    settings = [n for n, q in params.items() if q.kind == q.KEYWORD_ONLY]
    unknown = [k for k in spec.kwargs if k not in named[2:]]  # prompts, completions come first
    if unknown and (not var_kw or registered):
        valid = ", ".join(settings if var_kw else named[2:]) or "(none)"
        return [f"{where}: unknown setting(s) {', '.join(unknown)} in its recipe entry; it accepts {valid}; fix the spelling or remove them"]
    p = []
    if not var_kw and columns is not None:
        refused = sorted(c for c in columns if c not in named[2:] and c not in spec.kwargs)
        if refused:
            p.append(f"{where} does not accept the columns it is called with ({', '.join(refused)}): every dataset column and "
                     "completion_ids arrive as keyword arguments; give it a **columns parameter")
    if columns is not None:
        reads = [n for n in named[2:] if params[n].kind == params[n].POSITIONAL_OR_KEYWORD and n not in spec.kwargs
                 and (registered or params[n].default is params[n].empty)]
        missing = [n for n in reads if n not in columns]
        if missing:
            have = ", ".join(sorted(columns - {"completion_ids"}))
            p.append(f"{where} reads the column(s) {', '.join(missing)}, which {data_key} does not have (columns: {have}); "
                     "rename the column in the data or use another reward")
    return p
