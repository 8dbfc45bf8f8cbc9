"""Everything a GRPO run holds besides the loop: setup, checkpoint save, exact resume, the final save.

`setup` builds a `TrainState` (data, rewards, policy, reference, optimizer, scheduler, accelerator,
rollout backend, sampler, Lagrange multiplier, tracker), restoring a checkpoint when resuming;
`save` writes a checkpoint with every counter needed to continue exactly (under DeepSpeed each rank
adds its optimizer shard; under FSDP the optimizer state is gathered whole, keyed by parameter name);
`finish` saves the final model and the run's checksums. The loop itself is `grpo.trainer.run_grpo`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from grpo import checkpoint, rules, runtime
from grpo.config import Recipe, constraint_names, resolved_constraints
from grpo.data import Sampler, check_columns, load_rows, prompt_records
from grpo.environments import tool_schemas
from grpo.errors import UserError
from grpo.generation import make_backend
from grpo.memory import format_budget, memory_budget
from grpo.metrics import curves, run_info
from grpo.modeling import (
    count_parameters,
    fp32_output_layer,
    load_model,
    load_tokenizer,
    local_parameter_count,
    make_reference,
    reference_config,
    save_model,
)
from grpo.multipliers import LagrangeMultiplier, load_multipliers, multipliers_state_dict
from grpo.recipe_yaml import recipe_to_dict, save_recipe
from grpo.scoring import build_rewards
from grpo.tracking import Tracker, truncate_history

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """One process's view of a GRPO run.

    model: the prepared (DDP / DeepSpeed / FSDP-wrapped) policy, for forward/backward; policy: the
    same model unwrapped (generation, saving); gen_model: FSDP only, a whole copy generation runs on;
    ref: the frozen reference (None when beta == 0 or under LoRA: the adapter-disabled policy is it);
    n_micro: micro-batches per optimizer step on this process; start: the first step to run.
    """

    recipe: Recipe
    out: Path
    accelerator: object
    zero_stage: int
    tok: object
    prompts: list[dict]
    rewards: list
    model: object
    policy: object
    gen_model: object | None
    ref: object | None
    optimizer: object
    scheduler: object
    rollout: object
    sampler: Sampler
    multipliers: dict[str, LagrangeMultiplier]  # one per constraint, by name ({} = unconstrained)
    tracker: Tracker
    per_rank: int
    n_micro: int
    params_total: int
    start: int = 0
    eval_records: list = field(
        default_factory=list
    )  # data.eval as prompt records, when grpo.eval_every / eval_before_train
    best: dict | None = None  # {"step", "metric", "value"} of the model in <stage>/best (grpo.keep_best)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def fsdp(self) -> bool:
        return self.accelerator.is_fsdp2


def check_recipe(recipe: Recipe, world: int) -> None:
    """The GRPO rules a train stage checks itself (grpo/rules.py: the same functions preflight calls)."""
    rules.raise_first(
        rules.finite_numbers(recipe)
        + rules.prompt_length(recipe.data)
        + rules.stage_data(recipe.data, "train")
        + rules.grpo_geometry(recipe.grpo, world)
        + rules.run_management(recipe.grpo, recipe.data)
        + rules.sampling(recipe.rollout, train=True)
        + rules.environment(recipe)
        + rules.reward_roles(recipe.rewards, stage="train", safety_enabled=recipe.safety.enabled)
        + rules.constraints(recipe)
    )


def setup(recipe: Recipe, model_path: str | None, stage: str) -> TrainState:
    """Load and place everything; resume from the latest checkpoint when `grpo.resume` says so."""
    g, run = recipe.grpo, recipe.run
    runtime.setup(run.seed, run.threads)
    out = runtime.stage_dir(run.output_dir, stage, overwrite=run.overwrite, resume=bool(g.resume))
    accelerator = runtime.make_accelerator()
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    check_recipe(recipe, world)
    per_rank = g.prompts_per_step // world
    n_micro = math.ceil(per_rank * g.num_generations / g.micro_batch_size)
    accelerator.gradient_accumulation_steps = n_micro  # micro-batches per optimizer step
    zero_stage = runtime.configure_deepspeed(accelerator, g.micro_batch_size, n_micro, g.max_grad_norm)
    if zero_stage and g.micro_batch_tokens:
        raise UserError(
            "grpo.micro_batch_tokens does not work under DeepSpeed (its accumulation steps are fixed when the engine "
            "is built, a token budget changes them every step): use grpo.micro_batch_size there"
        )

    # Data, rewards, model
    resume_from = checkpoint.find_resume(out, g.resume)
    if resume_from:  # a changed recipe: refused where exactness breaks, else warned; both configs are kept
        checkpoint.check_resumed_recipe(recipe_to_dict(recipe), resume_from, out, main=is_main)
    problem = checkpoint.earlier_run_problem(out, overwrite=run.overwrite, resume=bool(g.resume))
    if problem:
        raise UserError(problem)
    if not resume_from and is_main and (n := checkpoint.remove_checkpoints(out)):
        log.warning("run.overwrite=true: deleted %d checkpoint(s) of an earlier run in %s", n, out)
    source = str(resume_from) if resume_from else (model_path or recipe.model.name_or_path)
    tok = load_tokenizer(dataclasses.replace(recipe.model, name_or_path=source))
    rows = load_rows(recipe.data.train, "data.train")
    fmt = check_columns(rows, recipe.data, recipe.data.train, "data.train", need_completion=False)
    prompts, dropped = prompt_records(rows, fmt, recipe.data, tok, tools=tool_schemas(recipe.environment))
    rewards = build_rewards(recipe.rewards, device=accelerator.device, output_dir=run.output_dir)
    model = load_model(recipe.model, source, continue_adapter=bool(resume_from))
    start_from = model_path or recipe.model.name_or_path  # the reference, also when resuming from a checkpoint
    ref = make_reference(
        model, g.beta, load=lambda: load_model(reference_config(recipe.model), start_from, for_training=False)
    )
    if recipe.model.fp32_lm_head and recipe.model.dtype != "float32":
        for m in (model, ref) if ref is not None else (model,):
            fp32_output_layer(m)
    trainable, total = count_parameters(model)
    optimizer = runtime.build_optimizer(model, g.lr, g.weight_decay, g.optim)
    scheduler = runtime.build_scheduler(optimizer, g.lr_scheduler, g.warmup_steps, g.steps * g.num_iterations)
    gen_model = (
        runtime.rollout_copy(model) if accelerator.is_fsdp2 else None
    )  # FSDP: generate on a whole copy, refreshed every step
    # the scheduler stays outside prepare(): accelerate would step it once per process per step
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = runtime.place_reference(ref, accelerator, zero_stage)  # ZeRO-3: sharded like the policy
    policy = accelerator.unwrap_model(model)
    if gen_model is not None:
        gen_model.to(accelerator.device)
    constraints = resolved_constraints(recipe)
    for _, _, col in constraints:  # a constrained reward is a cost: never part of the reward sum, whatever its weight
        rewards[col].weight = 0.0
    multipliers = {
        name: LagrangeMultiplier.from_lambda(
            c.lambda_init,
            lr=c.lambda_lr,
            threshold=c.threshold,
            lam_max=c.lambda_max,
            delay_steps=c.delay,
            smoothing=c.smoothing,
        )
        for name, c, _ in constraints
    }
    state = TrainState(
        recipe,
        out,
        accelerator,
        zero_stage,
        tok,
        prompts,
        rewards,
        model,
        policy,
        gen_model,
        ref,
        optimizer,
        scheduler,
        make_backend(recipe.rollout, gen_model or policy, tok),
        Sampler(len(prompts), run.seed, accelerator.process_index, world),
        multipliers,
        None,
        per_rank,
        n_micro,
        total,
    )
    if resume_from:
        state.start = restore(state, resume_from)
        log.info("resumed from %s at step %d", resume_from, state.start)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "config.yaml")
        log.info(
            "train: %s | params %s trainable / %s total | %d processes | %d prompts x G=%d = %d completions/step | %d "
            "steps | "
            "rollout %s | rewards %s | %s",
            source,
            f"{trainable:,}",
            f"{total:,}",
            world,
            g.prompts_per_step,
            g.num_generations,
            g.prompts_per_step * g.num_generations,
            g.steps,
            recipe.rollout.backend,
            ", ".join(f"{x.name}({x.role},w={x.weight:g})" for x in rewards),
            out,
        )
        if dropped:
            log.info("dropped %d prompts longer than data.max_prompt_length=%d", dropped, recipe.data.max_prompt_length)
        log.info(format_budget(memory_budget(policy, ref, recipe), accelerator.device))
        if resume_from:
            truncate_history(out / "metrics.jsonl", state.start)  # steps logged after the checkpoint are run again
    state.tracker = Tracker(
        out,
        recipe.tracking,
        is_main=is_main,
        run_config=recipe_to_dict(recipe),
        name=stage,
        group=Path(run.output_dir).name,
        resume=bool(resume_from),
    )
    return state


# ------------------------------------------------------------------------------------- checkpoints
def save(s: TrainState, step: int) -> None:
    """All ranks: checkpoint `step` atomically (rank 0 writes; DeepSpeed ranks add their optimizer shards)."""
    acc, out, zero = s.accelerator, s.out, s.zero_stage
    acc.wait_for_everyone()
    weights = acc.get_state_dict(s.model) if zero or s.fsdp else None
    # FSDP: the optimizer state gathered whole, keyed by parameter name (any process count can resume)
    optim = runtime.full_optimizer_state(s.model, s.optimizer) if s.fsdp else None
    if zero:
        if s.is_main:
            checkpoint.start_checkpoint(out, step)
        acc.wait_for_everyone()
        s.model.save_checkpoint(
            str(out / f"ckpt-{step}.tmp"), tag=checkpoint.DEEPSPEED, save_latest=False, exclude_frozen_parameters=True
        )
        acc.wait_for_everyone()
    if s.is_main:
        sampler = s.sampler
        state = {
            "step": step,
            "optimizer": optim if s.fsdp else None if zero else s.optimizer.state_dict(),
            "optimizer_by_name": s.fsdp,
            "scheduler": s.scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "sampler": {"order": sampler.order, "epoch": sampler.epoch, "rng": sampler.rng.getstate()},
            "lagrange": multipliers_state_dict(s.multipliers) if s.multipliers else None,
            "world_size": s.world,
            "zero_stage": zero,
            "best": s.best,
        }
        checkpoint.save_checkpoint(
            out, step, s.policy, s.tok, state, s.recipe.grpo.keep_last, weights=weights, started=bool(zero)
        )
    acc.wait_for_everyone()


def restore(s: TrainState, path: Path) -> int:
    """Load a checkpoint's optimizer, scheduler, RNG, data position and multiplier; returns its step."""
    state = checkpoint.load_state(path)
    saved, by_name = state["optimizer"], state.get("optimizer_by_name", False)
    if s.zero_stage:
        pass  # DeepSpeed's sharded optimizer: loaded last, by _restore_deepspeed
    elif saved is not None and by_name:
        runtime.load_full_optimizer_state(
            s.model, s.optimizer, saved
        )  # written under FSDP: any process count, FSDP or not
    elif saved is not None and not s.fsdp:
        s.optimizer.load_state_dict(saved)
    else:
        log.warning(
            "the checkpoint holds no optimizer state this run can load (written under DeepSpeed, or without FSDP for "
            "an FSDP run): Adam's moments restart (weights, step, data position, RNG and lambda are restored)"
        )
    s.scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    sampler, saved_sampler = s.sampler, state["sampler"]
    sampler.order, sampler.epoch = list(saved_sampler["order"]), saved_sampler["epoch"]
    rng = saved_sampler["rng"]
    sampler.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
    s.best = state.get("best")
    if s.multipliers and state.get("lagrange"):
        try:  # {name: state}; a checkpoint from before several constraints holds one multiplier's state
            load_multipliers(s.multipliers, state["lagrange"])
        except ValueError as e:
            raise UserError(
                f"checkpoint {path}: {e}; resume with the recipe's constraints as they were, or start fresh "
                "(grpo.resume=false)"
            ) from None
    elif s.multipliers:
        log.warning("checkpoint %s holds no Lagrange multipliers: the constraints start from lambda_init", path)
    if s.zero_stage:
        _restore_deepspeed(s.model, path, state, s.world)
    return int(state["step"])


def _restore_deepspeed(engine, path: Path, state: dict, world: int) -> None:
    """Load each rank's optimizer shard with DeepSpeed's own loader (same process count only)."""
    why = None
    if not (path / checkpoint.DEEPSPEED).is_dir():
        why = "it holds no DeepSpeed optimizer shards (written without DeepSpeed)"
    elif state.get("world_size") != world:
        why = (
            f"it was written by {state.get('world_size')} processes and this run has {world}: DeepSpeed's shards are "
            "split per process (resume with the same process count to continue exactly)"
        )
    if why:
        log.warning(
            "checkpoint %s: %s; Adam's moments restart (weights, step, data position, RNG and lambda are restored)",
            path,
            why,
        )
        return
    # the weights already came from the checkpoint's safetensors; DeepSpeed's module copy skips frozen (LoRA base)
    # weights
    loaded, _ = engine.load_checkpoint(
        str(path),
        tag=checkpoint.DEEPSPEED,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    if loaded is None:
        raise UserError(
            f"checkpoint {path}: DeepSpeed could not load its optimizer shards from {path / checkpoint.DEEPSPEED}; "
            "resume from another checkpoint (grpo.resume=PATH) or start fresh"
        )


def save_best(s: TrainState, step: int, value: float) -> None:
    """All ranks: if `value` of grpo.keep_best beats the best so far, save the model into <stage>/best (atomically,
    replacing the previous best) and record it in best.json; the checkpoint carries it for resume."""
    g = s.recipe.grpo
    if s.best is not None and not (value > s.best["value"] if g.keep_best_mode == "max" else value < s.best["value"]):
        return
    weights = s.accelerator.get_state_dict(s.model) if runtime.sharded(s.accelerator, s.zero_stage) else None
    s.best = {"step": step, "metric": g.keep_best, "value": value}
    if s.is_main:
        save_model(s.policy, s.tok, s.out / "best", merge=s.recipe.model.lora.merge_on_save, state_dict=weights)
        tmp = s.out / "best.json.tmp"
        tmp.write_text(json.dumps(s.best))
        tmp.replace(s.out / "best.json")
        log.info("best %s so far: %.4g at step %d, saved to %s", g.keep_best, value, step, s.out / "best")
    s.accelerator.wait_for_everyone()


def finish(s: TrainState) -> Path:
    """All ranks: the last checkpoint, the final model (gathered when sharded), checksums; returns final/."""
    g = s.recipe.grpo
    save(s, g.steps)
    info = run_info(s.model if s.zero_stage else s.policy, s.accelerator, s.zero_stage)
    final = s.out / "final"
    weights = (
        s.accelerator.get_state_dict(s.model) if runtime.sharded(s.accelerator, s.zero_stage) else None
    )  # gathered for the save
    if s.is_main:
        if g.final_from == "best" and s.best is not None:
            with checkpoint.atomic_folder(final) as tmp:  # final/ = the best model (grpo.final_from: best)
                shutil.copytree(s.out / "best", tmp, dirs_exist_ok=True)
            log.info(
                "final model = the best one (%s %.4g at step %d)", s.best["metric"], s.best["value"], s.best["step"]
            )
        else:
            save_model(s.policy, s.tok, final, merge=s.recipe.model.lora.merge_on_save, state_dict=weights)
        pngs = s.tracker.close(curves(s.rewards, constraint_names(s.recipe)))
        # parameter elements this rank holds for the reference: 0 without one, < total when ZeRO-3 shards it
        ref_local = local_parameter_count(s.ref) if s.ref is not None else 0
        (s.out / "run_info.json").write_text(
            json.dumps(
                {
                    **info,
                    "steps": g.steps,
                    "params_total": s.params_total,
                    "reference_local_params": ref_local,
                    "policy_local_params": local_parameter_count(s.policy),
                },
                indent=1,
            )
        )
        runtime.mark_done(s.out)
        log.info("train: saved %s; curves: %s", final, ", ".join(str(p) for p in pngs))
    s.accelerator.wait_for_everyone()
    return final
