"""One validator per recipe rule, shared by preflight and the stages.

Preflight (`grpo.preflight`) collects every problem of a recipe before anything loads; a stage called
in-process (`run_grpo`, `run_sft`, ...) checks the same rules itself with `raise_first`. Each function
returns problems as one line each (what, where, how to fix), so the two can never word or decide a rule
differently.
"""

from __future__ import annotations

import dataclasses

from grpo.config import constraint_list, constraint_rewards, reward_label, where_matches
from grpo.environments import environment_problems
from grpo.errors import UserError

DATA_FOR_STAGE = {
    "sft": ("sft_train", "the sft stage needs data.sft_train (a JSONL of prompt/completion or messages rows)"),
    "train": ("train", "the train stage needs data.train (a JSONL of prompts, plus any columns your rewards read)"),
    "eval": ("eval", "the eval stage needs data.eval (a JSONL of held-out prompts with an answer column)"),
}


def raise_first(problems: list[str]) -> None:
    """Raise the first problem as a UserError (a stage's own check; preflight lists them all)."""
    if problems:
        raise UserError(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))


def stage_data(data, stage: str) -> list[str]:
    """The dataset a stage reads is set (`train_unconstrained` reads what `train` reads)."""
    field, message = DATA_FOR_STAGE["train" if stage.startswith("train") else stage]
    return [] if getattr(data, field) else [message]


def grpo_geometry(grpo, world: int) -> list[str]:
    """Batch geometry: whole groups per process, at least 2 completions per group, a positive micro-batch."""
    p = []
    if grpo.prompts_per_step < 1:
        p.append(f"grpo.prompts_per_step={grpo.prompts_per_step} must be >= 1")
    elif grpo.prompts_per_step % world:
        up = -(-grpo.prompts_per_step // world) * world
        p.append(
            f"grpo.prompts_per_step={grpo.prompts_per_step} must be divisible by the {world} processes: each prompt's "
            f"group stays on one process; use e.g. grpo.prompts_per_step={up}"
        )
    if grpo.num_generations < 2:
        p.append(
            f"grpo.num_generations={grpo.num_generations}: GRPO needs at least 2 completions per prompt "
            "(advantages compare a prompt's completions with each other); use e.g. 8"
        )
    if grpo.micro_batch_size < 1:
        p.append(f"grpo.micro_batch_size={grpo.micro_batch_size} must be >= 1")
    if grpo.micro_batch_tokens is not None and grpo.micro_batch_tokens < 1:
        p.append(f"grpo.micro_batch_tokens={grpo.micro_batch_tokens} must be >= 1 (or null: micro_batch_size rows)")
    if not grpo.rollout_is_cap > 0:
        p.append(f"grpo.rollout_is_cap={grpo.rollout_is_cap} must be > 0")
    return p


def run_management(grpo, data) -> list[str]:
    """In-training eval needs held-out data; the best checkpoint needs an eval metric to rank by."""
    p = []
    if grpo.eval_every < 0:
        p.append(f"grpo.eval_every={grpo.eval_every} must be >= 0 (0 = no eval during training)")
    if (grpo.eval_every or grpo.eval_before_train) and not data.eval:
        p.append("grpo.eval_every / eval_before_train need data.eval (a JSONL of held-out prompts)")
    if grpo.keep_best and not (grpo.keep_best.startswith("eval/") and grpo.eval_every):
        p.append(
            f"grpo.keep_best={grpo.keep_best!r} ranks checkpoints by an in-training eval metric: name one as "
            "eval/<metric> "
            "(e.g. eval/accuracy) and set grpo.eval_every"
        )
    if grpo.final_from == "best" and not grpo.keep_best:
        p.append("grpo.final_from=best needs grpo.keep_best (the eval metric that picks the best model)")
    return p


def sampling(rollout, *, train: bool) -> list[str]:
    """Sampling settings in range; training samples (temperature > 0)."""
    from grpo.rollout.base import sampling_problems

    r, p = rollout, sampling_problems(rollout, "rollout.")
    if train and r.temperature <= 0:  # instead of the generic temperature line
        p = [x for x in p if not x.startswith("rollout.temperature=")]
        p.insert(
            0,
            f"rollout.temperature={r.temperature}: GRPO samples its G completions, it needs a temperature > 0 (e.g. "
            "1.0)",
        )
    if isinstance(r.static_decode, str) and r.static_decode != "auto":
        p.append(f"rollout.static_decode={r.static_decode!r}: use true, false or auto (on with CUDA)")
    if r.max_batch < 1:
        p.append(f"rollout.max_batch={r.max_batch} must be >= 1")
    return p


def rm_inputs(rm, kinds: tuple[str, ...]) -> list[str]:
    """The rm stage: a concrete classifier template and at least one model to train."""
    from rewards.models import check_template

    p = []
    try:
        check_template(rm.template)
        if rm.template == "auto":
            p.append("rm.template must be concrete for training: concat, chat, pair, completion or a format string")
    except UserError as e:
        p.append(f"rm.template: {e}")
    if not any(getattr(rm, f"{k}_train") for k in kinds):
        p.append(
            "the rm stage needs rm.usefulness_train and/or rm.safety_train (JSONL of preference pairs, see "
            "data/README.md)"
        )
    return p


def reward_roles(specs, *, stage: str, safety_enabled: bool) -> list[str]:
    """Training needs a reward; at most one `role: safety`, exactly one when the constraint is on."""
    p = []
    if stage == "train" and not specs:
        p.append("the recipe has no rewards: add e.g. `rewards: [{name: accuracy, weight: 1.0}]`")
    n_safety = sum(s.role == "safety" for s in specs)
    if n_safety > 1:
        p.append(f"{n_safety} rewards have role: safety; at most one may (the cost the safety constraint bounds)")
    if stage == "train" and safety_enabled and n_safety == 0:
        p.append(
            "safety.enabled=true needs a reward with role: safety (a cost model, higher = less safe), e.g. "
            "{name: runs/x/rm/safety, role: safety}; add one or set safety.enabled=false"
        )
    return p


def where_shape(where, at: str) -> list[str]:
    """A constraint's `where`: null, or a non-empty mapping of dataset column -> a value or a non-empty list of
    values (strings, numbers, booleans)."""
    if where is None:
        return []
    scalar = (str, int, float, bool)
    ok = bool(where) and all(
        isinstance(v, scalar) or (isinstance(v, list) and v and all(isinstance(x, scalar) for x in v))
        for v in where.values()
    )
    if ok:
        return []
    return [
        f"{at}.where={where!r}: give the prompts the constraint is about as dataset column: value (or a list of "
        "values), e.g. where: {category: harmful}"
    ]


def where_rows(recipe, rows: list[dict], what: str) -> list[str]:
    """Each constraint's `where` selects at least one row of the training data (a typo would leave it unmeasured)."""
    p = []
    for i, c in enumerate(constraint_list(recipe)):
        if not c.where or where_shape(c.where, "") or any(where_matches(c.where, row) for row in rows):
            continue
        col = next((k for k in c.where if not any(where_matches({k: c.where[k]}, row) for row in rows)), None)
        seen = sorted({repr(row.get(col)) for row in rows})[:8] if col else []
        p.append(
            f"constraints.{i}.where={c.where!r} selects none of the {len(rows)} rows of {what}"
            + (f" ('{col}' there: {', '.join(seen)})" if col else " (no row matches every column)")
            + "; fix the column or its values, or drop where to measure every prompt"
        )
    return p


def constraints(recipe) -> list[str]:
    """Each constraint names exactly one reward and has settings in range; names are distinct; the old `safety`
    section's settings and `constraints` are not mixed; the scalarized scheme combines raw rewards (reward_mode sum)."""
    p = []
    legacy = [f.name for f in dataclasses.fields(recipe.safety) if f.name != "enabled"]
    changed = [k for k in legacy if getattr(recipe.safety, k) != getattr(type(recipe.safety)(), k)]
    if recipe.constraints and changed and recipe.safety.enabled is not False:
        p.append(
            f"safety.{changed[0]} is set and a constraints: list is given: the safety section's settings define the "
            "one constraint of recipes without constraints:; set them on the constraint instead, e.g. constraints: "
            "[{reward: safety, kind: rate, threshold: 0.02, lambda_lr: 0.2}]"
        )
        return p
    names, rewards = [], recipe.rewards
    known = ", ".join(dict.fromkeys(reward_label(r.name) for r in rewards)) or "none"
    for i, c in enumerate(constraint_list(recipe)):
        at = f"constraints.{i}" if recipe.constraints else "safety"
        hits = constraint_rewards(rewards, c.reward) if c.reward else []
        if not c.reward:
            p.append(f"{at} needs reward: the name of the constrained entry of rewards (rewards: {known})")
        elif not hits:
            p.append(f"{at}.reward={c.reward!r} names no reward of the recipe; rewards: {known}")
        elif len(hits) > 1:
            p.append(
                f"{at}.reward={c.reward!r} names {len(hits)} rewards (rewards.{hits[0]}, rewards.{hits[1]}); use the "
                "name as "
                "written in rewards, or make the rewards' names distinct"
            )
        names.append(c.name or (reward_label(rewards[hits[0]].name) if len(hits) == 1 else c.reward))
        if (
            c.kind == "rate" and not 0 <= c.threshold <= 1 and recipe.constraints
        ):  # (the old safety section never checked it)
            p.append(f"{at}: threshold={c.threshold} bounds a rate P(cost > 0): give a fraction in [0, 1]")
        if c.kind == "mean" and c.signal == "indicator":
            p.append(
                f"{at}: signal=indicator puts P(cost > 0) into the advantage while lambda follows the mean cost (kind "
                "mean); "
                "use kind: rate, or signal: auto"
            )
        if not 0 < c.lambda_init <= c.lambda_max:
            p.append(f"{at}: lambda_init={c.lambda_init} must be > 0 and <= lambda_max={c.lambda_max}")
        if not 0 <= c.smoothing < 1:
            p.append(f"{at}: smoothing={c.smoothing} must be in [0, 1) (the moving average's weight on the past)")
        for key in ("lambda_lr", "delay", "std_floor"):
            if (getattr(c, key) or 0) < 0:
                p.append(f"{at}: {key}={getattr(c, key)} must be >= 0")
        p += where_shape(c.where, at)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        p.append(
            f"constraints: the name {dup[0]!r} is used twice; give each constraint a distinct name: (e.g. name: "
            f"{dup[0]}_rate)"
        )
    if names and recipe.grpo.constraint_scheme == "scalarized" and recipe.grpo.reward_mode != "sum":
        p.append(
            f"grpo.constraint_scheme=scalarized combines raw rewards and costs before one normalisation: it needs "
            f"grpo.reward_mode=sum (got {recipe.grpo.reward_mode}); or use constraint_scheme=separate"
        )
    return p


def environment(recipe) -> list[str]:
    """Multi-turn settings in range; the environment and its tools resolve and fit their contracts
    (grpo.environments)."""
    e, p = recipe.environment, []
    if e.name:
        if e.max_turns < 1:
            p.append(f"environment.max_turns={e.max_turns} must be >= 1 (model turns per episode)")
        if e.max_tokens_per_turn is not None and e.max_tokens_per_turn < 1:
            p.append(
                f"environment.max_tokens_per_turn={e.max_tokens_per_turn} must be >= 1 (or null: the rest of "
                "rollout.max_new_tokens)"
            )
        if e.max_observation_tokens < 1:
            p.append(f"environment.max_observation_tokens={e.max_observation_tokens} must be >= 1")
        if e.tool_timeout_s is not None and not e.tool_timeout_s > 0:
            p.append(f"environment.tool_timeout_s={e.tool_timeout_s} must be > 0 (or null: no limit)")
        if any(not s for s in e.stop_strings):
            p.append("environment.stop_strings holds an empty string; remove it")
    return p + environment_problems(e)


def finite_numbers(recipe) -> list[str]:
    """Every number in the recipe is finite: `grpo.lr=.inf`, `rewards.0.weight=.nan` (YAML's inf/nan) are refused.

    A NaN reward weight makes every advantage NaN, an infinite learning rate every weight; both used to end
    in a run that exits 0 with the model unchanged or broken. Reward kwargs are walked too.
    """
    import dataclasses
    import math

    p = []

    def walk(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            p.append(
                f"{path}={value} is not a finite number; give a real value (YAML .inf / .nan are not allowed in a "
                "recipe)"
            )
        elif dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}")

    walk(recipe, "")
    return [x.replace(".kwargs.", ".") for x in p]  # a reward's kwargs are keys of its entry: rewards.1.scale


def prompt_length(data) -> list[str]:
    """data.max_prompt_length >= 1 (0 used to mean "no truncation at all": ids[-0:] is the whole prompt)."""
    if data.max_prompt_length < 1:
        return [
            f"data.max_prompt_length={data.max_prompt_length} must be >= 1 (tokens kept of each prompt; "
            "longer prompts are handled per data.prompt_overflow); e.g. data.max_prompt_length=256"
        ]
    return []
