"""Preflight: every check that needs no model weights, run before a stage loads anything big.

    problems = preflight(recipe, "train", world_size=2)   # -> list of one-line problems ([] = fine)
    check(recipe, ["sft", "train", "eval"], world_size)  # raises UserError if there is any

The CLI calls `check` right after reading the recipe, for the command's stage (`pipeline`: every
stage in `run.stages`, each knowing what the earlier ones produce), with the world size from the
`WORLD_SIZE` environment variable that `accelerate launch` / torchrun set. A bad recipe then fails in
a second, before the process group, the weights or the output folder exist.

Reporting: each problem is one line (what, where, how to fix). `check` raises `UserError` holding
the FIRST problem plus "(+N more, listed above)" and logs the others as warnings just before, so the
CLI keeps its single `error: ...` line and the user still sees every problem in one go.

What is checked (config.json, dataset files, reward signatures; never weights):
- names: run.stages, grpo.loss_type / scale / reward_mode, rollout.backend (their registries), trackers;
- batch geometry: prompts_per_step divisible by the processes, num_generations >= 2 (micro-batches may be
  unequal: every loss's normaliser is exact for any split, grpo.losses); step counts,
  learning rates and sampling settings in range; temperature > 0 to train;
- lengths within the model's context (config.json's max_position_embeddings): when the declared
  budget (data.max_prompt_length + max_new_tokens, or sft.max_length) is larger, the dataset is
  tokenized and its longest real prompt (example) counts; with sft.packing the declared length counts;
- rewards: each resolves (registered, `package.module:function`, reward-model folder or `hf:` id, or a
  folder an earlier `rm` stage writes); its settings fit its signature (built-ins: their keyword-only
  settings, as `**columns` would swallow a misspelt one); it takes `**columns`; the columns it reads
  exist; at most one `role: safety`, exactly one when safety.enabled;
- data readable with the needed columns (`grpo.data`); the model a config.json folder or a hub id;
  run.output_dir a writable folder; no finished stage overwritten; an explicit grpo.resume path a
  checkpoint; free disk for a checkpoint and the final model (weights from the safetensors sizes or
  config.json + 2 fp32 Adam moments per trainable parameter: ~4x fp32 weights for full-parameter GRPO).
The checks on files live in grpo/preflight_io.py, those on the rewards in grpo/preflight_rewards.py. A rule a
stage also checks (in-process callers of `run_grpo` etc. do not go through here) is one function of
grpo/rules.py, called by both.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from grpo import rules
from grpo.config import STAGES, Recipe, unconstrained
from grpo.environments import EPISODE_COLUMNS
from grpo.errors import UserError
from grpo.preflight_io import (
    TRAIN_STAGES,
    context_length,
    context_where,
    dataset,
    disk_problems,
    length_problems,
    longest_tokens,
    model_problems,
    output_problems,
    source_problems,
)
from grpo.preflight_rewards import _inside, reward_problems

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- entry points
def preflight(
    recipe: Recipe, stage: str, world_size: int = 1, *, earlier: tuple[str, ...] = (), models: list[str] | None = None
) -> list[str]:
    """Problems that would stop `stage` of `recipe` on `world_size` processes; one line each.

    `earlier`: stages that run before it in the same pipeline (their outputs count as existing).
    `models`: for `eval`, the models named on the command line (default: the recipe's).
    """
    cache: dict = {}
    return _dedupe(
        _stage_problems(recipe, stage, world_size, tuple(earlier), models, cache)
        + disk_problems(recipe, [stage], cache)
    )


def check(recipe: Recipe, stages: list[str], world_size: int = 1, *, models: list[str] | None = None) -> None:
    """Run `preflight` for every stage in order; raise UserError with the first problem (others logged)."""
    cache: dict = {}
    problems = _stages_problems(stages)
    if not problems:
        for i, stage in enumerate(stages):
            problems += _stage_problems(recipe, stage, world_size, tuple(stages[:i]), models, cache)
        problems += disk_problems(recipe, stages, cache)
    problems = _dedupe(problems)
    if not problems:
        return
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for p in problems[1:]:
            log.warning("preflight: %s", p)
    more = f" (+{len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
    raise UserError(problems[0] + more)


def dry_run(recipe: Recipe, stages: list[str], world_size: int) -> str:
    """Offline validation of a recipe for `world_size` processes, loading no weights and no data.

    Checks names, ranges, sampling, batch geometry and that every reward resolves with its settings;
    hub models and datasets are not contacted (their config and columns are checked when the run
    starts). Returns a summary of the batch geometry; raises UserError on the first problem.
    """
    problems = _stages_problems(stages)
    problems += rules.finite_numbers(recipe) if not problems else []
    for stage in stages if not problems else []:
        if stage in TRAIN_STAGES or stage == "eval":
            problems += rules.prompt_length(recipe.data)
        if stage in TRAIN_STAGES:
            problems += (
                rules.grpo_geometry(recipe.grpo, world_size)
                + rules.sampling(recipe.rollout, train=True)
                + _registry_problems(recipe, train=True)
            )
            # a dry run loads nothing and needs no earlier run: reward models the rm stage writes may be missing
            problems += reward_problems(recipe, "train", (*stages[: stages.index(stage)], "rm"), None, "data.train")
    problems = _dedupe(problems)
    if problems:
        for p in problems[1:]:
            log.warning("dry run: %s", p)
        raise UserError(problems[0] + (f" (+{len(problems) - 1} more, listed above)" if len(problems) > 1 else ""))
    g = recipe.grpo
    local = g.prompts_per_step // world_size * g.num_generations
    micro = -(-local // g.micro_batch_size)
    rm_dir = Path(recipe.run.output_dir) / "rm"
    pending = [r.name.replace("{output_dir}", str(recipe.run.output_dir)) for r in recipe.rewards]
    pending = [
        n for n in pending if "/" in n and ":" not in n and not Path(n, "config.json").is_file() and _inside(n, rm_dir)
    ]
    note = (
        f"; reward model(s) {', '.join(pending)} not there yet: the rm stage writes them (run `grpo rm` first)"
        if pending
        else ""
    )
    return (
        f"dry run OK for {world_size} process(es): stages {', '.join(stages)}; per optimizer step {g.prompts_per_step} "
        "prompts x "
        f"G={g.num_generations} = {g.prompts_per_step * g.num_generations} completions, {local} per process in {micro} "
        f"micro-batch(es) of <= {g.micro_batch_size}; x{g.num_iterations} iteration(s); {g.steps} steps; "
        f"model {recipe.model.name_or_path} (weights not loaded){note}"
    )


def env_world_size() -> int:
    """The process count `accelerate launch` / torchrun announce in WORLD_SIZE (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(
            f"environment variable WORLD_SIZE={raw!r} is not a positive integer; unset it or launch with accelerate"
        )
    return int(raw)


def _stages_problems(stages) -> list[str]:
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        return [
            f"run.stages={list(stages)}: unknown stage(s) {', '.join(map(repr, bad)) or '(none given)'}; "
            f"valid: {', '.join(STAGES)} (e.g. run.stages=[sft,train,eval])"
        ]
    return []


def _stage_problems(recipe, stage, world, earlier, models, cache) -> list[str]:
    if stage not in STAGES:
        return _stages_problems([stage])
    p = rules.finite_numbers(recipe) + output_problems(recipe, stage)
    if stage in TRAIN_STAGES or stage == "eval":
        p += rules.prompt_length(recipe.data)
    if stage == "sft":
        p += _sft_problems(recipe, earlier, cache)
    elif stage in TRAIN_STAGES or stage == "rollout":
        if stage != "train":  # the pipeline's baseline run: the same recipe without the constraints
            recipe = unconstrained(recipe)
        p += _train_problems(recipe, world, earlier, cache, stage)
    elif stage == "eval":
        p += _eval_problems(recipe, earlier, models, cache)
    elif stage == "rm":
        p += _rm_problems(recipe, cache)
    return p


# ---------------------------------------------------------------------------------------- stages
def _sft_problems(recipe, earlier, cache) -> list[str]:
    c, d = recipe.sft, recipe.data
    p = _ranges(
        recipe,
        [
            ("sft.steps", 1),
            ("sft.batch_size", 1),
            ("sft.grad_accum", 1),
            ("sft.max_length", 2),
            ("sft.eval_every", 0),
            ("sft.warmup_steps", 0),
        ],
        positive=["sft.lr"],
    )
    p += model_problems(recipe, earlier, cache)
    bad = ["missing"]
    p += rules.stage_data(d, "sft")
    if d.sft_train:
        rows, fmt, bad = dataset(recipe, d.sft_train, "data.sft_train", True, cache)
        p += bad
        if not bad:
            from grpo.data import empty_completion_problem

            p += [x for x in [empty_completion_problem(rows, fmt, d, f"data.sft_train '{d.sft_train}'")] if x]
    if d.sft_eval:
        p += dataset(recipe, d.sft_eval, "data.sft_eval", True, cache)[2]
    ctx = context_length(recipe, cache)
    if ctx and c.max_length > ctx and not bad:
        longest = (
            None if c.packing else longest_tokens(recipe, d.sft_train, "data.sft_train", cache, with_completion=True)
        )
        if longest is None or min(longest, c.max_length) > ctx:
            seen = "packing fills every row" if c.packing else f"its longest example has {longest} tokens"
            p.append(
                f"sft.max_length={c.max_length} exceeds the model's context of {ctx} tokens ({context_where(recipe)}) "
                f"and {seen}; set sft.max_length <= {ctx}"
            )
    return p


def _train_problems(recipe, world, earlier, cache, stage: str = "train") -> list[str]:
    g, r, d = recipe.grpo, recipe.rollout, recipe.data
    p = rules.grpo_geometry(recipe.grpo, world) + rules.run_management(recipe.grpo, recipe.data)
    p += _ranges(
        recipe,
        [
            ("grpo.steps", 1),
            ("grpo.num_iterations", 1),
            ("grpo.warmup_steps", 0),
            ("grpo.save_every", 0),
            ("grpo.keep_last", 0),
            ("tracking.log_every", 1),
            ("tracking.samples_every", 0),
            ("grpo.epsilon_low", 0.0),
            ("grpo.epsilon_high", 0.0),
            ("grpo.beta", 0.0),
            ("grpo.eps", 0.0),
            ("grpo.max_grad_norm", 0.0),
        ],
        positive=["grpo.lr"],
    )
    p += rules.sampling(recipe.rollout, train=True) + rules.environment(recipe)
    p += _registry_problems(recipe, train=True)
    p += model_problems(recipe, earlier, cache)
    if g.resume:
        from grpo.checkpoint import find_resume, resume_recipe_problem
        from grpo.recipe_yaml import recipe_to_dict

        try:
            ckpt = find_resume(Path(recipe.run.output_dir) / stage, g.resume)
            problem = resume_recipe_problem(recipe_to_dict(recipe), ckpt)[0] if ckpt else None
            p += [problem] if problem else []
        except UserError as e:
            p.append(str(e))
    columns = None
    p += rules.stage_data(d, "train")
    if d.train:
        rows, fmt, bad = dataset(recipe, d.train, "data.train", False, cache)
        p += bad
        columns = (
            set(rows[0]) | {"completion_ids"} | (set(EPISODE_COLUMNS) if recipe.environment.name else set())
            if rows
            else None
        )
        if not bad:
            p += length_problems(recipe, d.train, "data.train", r.max_new_tokens, "rollout.max_new_tokens", cache)
            p += rules.where_rows(recipe, rows, "data.train")
    p += reward_problems(recipe, "train", earlier, columns, "data.train")
    return p


def _eval_problems(recipe, earlier, models, cache) -> list[str]:
    e, d = recipe.eval, recipe.data
    p = _ranges(
        recipe, [("eval.num_samples", 1), ("eval.batch_size", 1), ("eval.max_new_tokens", 1), ("eval.limit", 1)]
    )
    if e.num_samples > 1 and recipe.rollout.temperature <= 0:
        p.append(
            f"eval.num_samples={e.num_samples} samples at rollout.temperature={recipe.rollout.temperature}; "
            "pass@k needs a temperature > 0 (or set eval.num_samples=1 for greedy)"
        )
    p += rules.sampling(recipe.rollout, train=False)
    p += _registry_problems(recipe, train=False)
    if models:
        for m in models:
            p += source_problems(m, "--model")
    else:
        p += model_problems(recipe, (), cache)  # eval always compares against the base model
    columns = None
    p += rules.stage_data(d, "eval")
    if d.eval:
        rows, fmt, bad = dataset(recipe, d.eval, "data.eval", False, cache)
        p += bad
        columns = (
            set(rows[0]) | {"completion_ids"} | (set(EPISODE_COLUMNS) if recipe.environment.name else set())
            if rows
            else None
        )
        new = e.max_new_tokens or recipe.rollout.max_new_tokens
        if not bad:
            p += length_problems(
                recipe,
                d.eval,
                "data.eval",
                new,
                "eval.max_new_tokens" if e.max_new_tokens else "rollout.max_new_tokens",
                cache,
            )
    if recipe.rewards:
        p += reward_problems(recipe, "eval", earlier, columns, "data.eval")
    return p


def _rm_problems(recipe, cache) -> list[str]:
    from grpo.rm import KINDS, load_pairs

    cfg = recipe.rm
    p = _ranges(
        recipe, [("rm.steps", 1), ("rm.batch_size", 1), ("rm.max_length", 2), ("rm.eval_every", 0)], positive=["rm.lr"]
    )
    p += rules.rm_inputs(cfg, KINDS)
    for kind in [k for k in KINDS if getattr(cfg, f"{k}_train")]:
        for split in ("train", "eval"):
            spec = getattr(cfg, f"{kind}_{split}")
            if spec:
                try:
                    load_pairs(spec, f"rm.{kind}_{split}", kind)
                except UserError as e:
                    p.append(str(e))
    p += source_problems(cfg.base or recipe.model.name_or_path, "rm.base" if cfg.base else "model.name_or_path")
    return p


# ---------------------------------------------------------------------------------------- settings
def _get(recipe, key: str):
    obj = recipe
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _ranges(recipe, minimums: list[tuple[str, float]], positive: list[str] = ()) -> list[str]:
    """`key >= minimum` for each pair (None values are skipped), `key > 0` for each positive key."""
    p = []
    for key, lo in minimums:
        v = _get(recipe, key)
        if v is not None and v < lo:
            p.append(f"{key}={v} must be >= {lo}")
    for key in positive:
        v = _get(recipe, key)
        if v is not None and v <= 0:
            p.append(f"{key}={v} must be > 0")
    return p


def _registry_problems(recipe, train: bool) -> list[str]:
    from grpo.advantages import COMBINE_MODES, SCALES
    from grpo.losses import AGGREGATIONS
    from grpo.rollout import BACKENDS

    items = [("rollout.backend", recipe.rollout.backend, BACKENDS)]
    if train:
        items += [
            ("grpo.loss_type", recipe.grpo.loss_type, AGGREGATIONS),
            ("grpo.scale", recipe.grpo.scale, SCALES),
            ("grpo.reward_mode", recipe.grpo.reward_mode, COMBINE_MODES),
        ]
    p = []
    for key, name, registry in items:
        try:
            registry.get(name)
        except KeyError as e:
            p.append(f"{key}: {e}")
    if recipe.rollout.backend == "vllm":  # what users of other toolkits ask for first: say why it is not here
        p = [x for x in p if not x.startswith("rollout.backend:")]
        p.append(
            "rollout.backend=vllm is not offered (vLLM pins its own torch/transformers, see README 'Rollout at "
            "scale'); use "
            "engine (default; rollout.static_decode runs it in CUDA graphs on a GPU) or hf"
        )
    for tracker in recipe.tracking.report_to:
        if tracker in ("wandb", "tensorboard") and importlib.util.find_spec(tracker) is None:
            p.append(f"tracking.report_to lists {tracker}, which is not installed; pip install {tracker} or remove it")
    return p


def _dedupe(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))
