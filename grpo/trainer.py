"""GRPO stage: Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024), one loop.

    python -m grpo train recipes/quickstart.yaml [grpo.steps=300 ...]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m grpo train RECIPE
    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml -m grpo train RECIPE

Each step: sample prompts -> generate G completions each (rollout backend, default `engine`) ->
score with every reward -> group-normalised advantages (optionally under the Safe-RLHF Lagrangian
constraint) -> old logprobs (only if num_iterations > 1) and reference logprobs (only if beta > 0;
under LoRA the adapter-disabled base, no second copy) -> num_iterations passes of micro-batch
forward/backward with gradient accumulation -> clipped optimizer step -> log -> checkpoint.

How it departs from / chooses within GRPO:
- A prompt's G completions stay on one process, so group statistics are exact without a gather;
  `grpo.prompts_per_step` must divide by the number of processes. Metrics are averaged over ranks.
- Logprobs use `logits / temperature`, the distribution the rollout sampled from.
- The `dapo` loss divides by the completion-token count of the whole optimizer step across
  processes (all-reduced), as DAPO defines it.
- Completion tokens include the stop token; with `mask_truncated_completions` a completion that hit
  max_new_tokens contributes no loss (DAPO).
- Sampling seeds are a function of (run.seed, step), so a resumed run samples what the
  uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo import runtime
from grpo import train_state as state_io
from grpo.batch import (
    MicroBatch,
    Rollouts,
    dump_rollouts,
    load_rollouts,
    loss_mask,
    micro_batches,
    split_rows,
    split_to_count,
)
from grpo.config import Recipe, constraint_names
from grpo.constrained import step_advantages
from grpo.environments import episode_columns, rollout_episodes
from grpo.errors import Interrupted, UserError
from grpo.generation import decode_and_score, generate, sampling_params
from grpo.losses import policy_loss, rollout_correction
from grpo.metrics import console_line, curves, mean_dicts, reduce_metrics, reward_metrics, token_means
from grpo.modeling import reference_context
from grpo.prefix import supports_training
from grpo.rollout.multiturn import episode_metrics
from grpo.scoring import check_reward_health
from grpo.train_state import TrainState

log = logging.getLogger(__name__)

MAX_NONFINITE = 3  # consecutive optimizer steps with a NaN/inf gradient norm before the run stops


# ------------------------------------------------------------------------------------- the loop
def run_grpo(recipe: Recipe, model_path: str | None = None, stage: str = "train"):
    """Train with GRPO into run.output_dir/<stage>; returns the folder of the saved final model."""
    s = state_io.setup(recipe, model_path, stage)
    cfg, temperature = recipe.grpo, recipe.rollout.temperature
    s.model.train()
    if cfg.eval_before_train and s.start == 0:
        s.tracker.log(0, reduce_metrics(evaluate_live(s), s.accelerator))
    nonfinite = 0  # optimizer steps skipped in a row because the gradient norm was NaN/inf
    bar = tqdm(
        range(s.start, cfg.steps),
        initial=s.start,
        total=cfg.steps,
        desc="grpo",
        disable=not s.is_main,
        dynamic_ncols=True,
    )
    with runtime.StopRequest() as stop:
        for step in bar:
            t0 = time.perf_counter()
            # Rollout and scoring: G completions per prompt (DAPO dynamic sampling: refill zero-std groups)
            rollouts, metrics = collect_rollouts(s, step)
            t1 = time.perf_counter() - rollouts.score_seconds  # time_rollout: generation only
            advantages, adv_metrics = step_advantages(s, rollouts)
            if s.recipe.rollout.dump_dir:
                dump_rollouts(s.recipe.rollout.dump_dir, step + 1, s.accelerator.process_index, rollouts, advantages)
            t2 = time.perf_counter()

            # Old / reference logprobs, then num_iterations passes of updates
            mask = loss_mask(rollouts.completions, rollouts.ok, cfg.mask_truncated_completions)
            shared = cfg.shared_prefix and supports_training(s.model)  # else the plain padded forward (same numbers)
            micro = micro_batches(
                rollouts,
                mask,
                advantages,
                row_splits(s, rollouts),
                shared_prefix=shared,
                pad_id=s.tok.pad_token_id,
                device=s.accelerator.device,
            )
            old_and_reference_logprobs(s, micro, temperature)
            t3 = time.perf_counter()
            loss_metrics, grad_norm, nonfinite = update(s, micro, mask, step, nonfinite)
            if s.gen_model is not None:
                runtime.copy_full_weights(s.model, s.gen_model)
            s.rollout.sync_weights(s.gen_model or s.policy)
            t4 = time.perf_counter()

            # Log
            metrics.update(
                {
                    **adv_metrics,
                    **step_metrics(s, rollouts, advantages, mask, loss_metrics, grad_norm, (t0, t1, t2, t3, t4)),
                }
            )
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                metrics.update(evaluate_live(s))
            metrics = reduce_metrics(metrics, s.accelerator)
            log_step(s, step + 1, metrics, rollouts, advantages, bar)
            if cfg.keep_best and cfg.keep_best in metrics:
                state_io.save_best(s, step + 1, metrics[cfg.keep_best])
            if stop.any_rank(s.accelerator):
                state_io.save(s, step + 1)
                stop.winding_down = True  # saved: a signal now (a launcher ending this rank) is noted, not acted on
                s.tracker.close(curves(s.rewards, constraint_names(s.recipe)))
                raise Interrupted(
                    f"signal received; checkpoint saved at {s.out}/ckpt-{step + 1}; continue with grpo.resume=true",
                    code=128 + int(stop.signal or 15),
                )
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                state_io.save(s, step + 1)
    return state_io.finish(s)


def run_rollout(recipe: Recipe, model_path: str | None = None):
    """`grpo rollout RECIPE`: grpo.steps rounds of generation and scoring exactly as training does them, no update.

    For debugging a reward or the sampling: per-step reward statistics in <output_dir>/rollout/metrics.jsonl and
    every rollout in rollout.dump_dir (default <output_dir>/rollout/rollouts), replayable with `grpo train --replay`.
    """
    s = state_io.setup(recipe, model_path, "rollout")
    folder = recipe.rollout.dump_dir or str(s.out / "rollouts")
    for step in tqdm(range(recipe.grpo.steps), desc="rollout", disable=not s.is_main, dynamic_ncols=True):
        t0 = time.perf_counter()
        rollouts, metrics = collect_rollouts(s, step)
        advantages, adv_metrics = step_advantages(s, rollouts)
        dump_rollouts(folder, step + 1, s.accelerator.process_index, rollouts, advantages)
        n_tok = sum(len(c.token_ids) for c in rollouts.completions)
        metrics.update(
            {
                **reward_metrics(rollouts.rewards, s.rewards),
                **adv_metrics,
                "completion_len": n_tok / len(rollouts.completions),
                "time_step": time.perf_counter() - t0,
            }
        )
        s.tracker.log(step + 1, reduce_metrics(metrics, s.accelerator))
    if s.is_main:
        s.tracker.close(curves(s.rewards, constraint_names(s.recipe)))
        runtime.mark_done(s.out)
        log.info(
            "rollout: %d steps of rollouts in %s (replay: grpo train RECIPE --replay %s)",
            recipe.grpo.steps,
            folder,
            folder,
        )
    s.accelerator.wait_for_everyone()
    return Path(folder)


# ------------------------------------------------------------------------------------- steps
def collect_rollouts(s: TrainState, step: int) -> tuple[Rollouts, dict]:
    """G scored completions for each of this process's prompts. With DAPO dynamic sampling, groups
    whose rewards are all equal are replaced by fresh prompts, for at most max_generation_rounds rounds."""
    cfg, G, per_rank = s.recipe.grpo, s.recipe.grpo.num_generations, s.per_rank
    if s.recipe.rollout.replay_dir:  # the dumped step's prompts and completions, scored again with today's rewards
        rows, comps = load_rollouts(s.recipe.rollout.replay_dir, step + 1, s.accelerator.process_index)
        texts, R, ok, seconds = decode_and_score(
            s.tok,
            s.rewards,
            rows,
            comps,
            sampling_params(s.recipe.rollout, s.tok.eos_token_id, seed=None).stop_token_ids,
            on_error=cfg.on_reward_error,
        )
        return Rollouts(rows, comps, texts, R, ok, seconds), {}
    parts = [rollout_round(s, s.sampler.take(per_rank), step, 0)]
    if not cfg.dynamic_sampling:
        return Rollouts.select(parts, [(0, i) for i in range(per_rank)], G), {}
    kept = [(0, i) for i in informative_groups(parts[0], s.rewards, G)]
    while len(parts) < cfg.max_generation_rounds and runtime.any_rank(len(kept) < per_rank, s.accelerator):
        parts.append(rollout_round(s, s.sampler.take(per_rank), step, len(parts)))
        kept += [(len(parts) - 1, i) for i in informative_groups(parts[-1], s.rewards, G)]
    informative = len(kept)
    # informative groups first; zero-std ones only if too few were found
    kept += [(k, i) for k in range(len(parts)) for i in range(per_rank) if (k, i) not in set(kept)]
    generated = len(parts) * per_rank
    return (
        Rollouts.select(parts, kept[:per_rank], G),
        {"generation_rounds": len(parts), "filtered_groups_frac": 1 - informative / generated},
    )


def rollout_round(s: TrainState, indices: list[int], step: int, round_: int) -> Rollouts:
    """Generate G completions for each prompt in `indices` and score them.

    Sampling seeds are a function of (run.seed, step, rank, round), or of (seed, step, prompt) with
    rollout.seed_per_prompt, so a resumed run samples what the uninterrupted one would have.
    """
    run, G = s.recipe.run, s.recipe.grpo.num_generations
    rows = [s.prompts[i] for i in indices]
    rank = s.accelerator.process_index
    params = sampling_params(
        s.recipe.rollout, s.tok.eos_token_id, seed=run.seed * 100_003 + step * s.world + rank + round_ * 1_000_003
    )
    seeds = (
        [run.seed * 100_003 + (step + round_ * 7919) * len(s.prompts) + i for i in indices]
        if s.recipe.rollout.seed_per_prompt
        else None
    )
    was_training = s.policy.training
    s.policy.eval()
    episodes = None
    with runtime.gathered_parameters(s.policy, s.zero_stage):  # ZeRO-3: full weights per rank while generating
        if s.recipe.environment.name:  # multi-turn: each completion is a whole trajectory (grpo.rollout.multiturn)
            comps, episodes = rollout_episodes(s.recipe.environment, s.rollout, s.tok, rows, G, params, seeds)
        else:
            comps = generate(s.rollout, [row["prompt_ids"] for row in rows], G, params, seeds)
    s.policy.train(was_training)
    texts, R, ok, seconds = decode_and_score(
        s.tok,
        s.rewards,
        rows,
        comps,
        params.stop_token_ids,
        on_error=s.recipe.grpo.on_reward_error,
        extra_columns=episode_columns(episodes),
    )
    check_reward_health(
        R, s.rewards, step, s
    )  # all-None rewards (warn, then stop), one reward drowning the others (warn)
    return Rollouts(rows, comps, texts, R, ok, seconds, episodes)


def informative_groups(r: Rollouts, rewards, G: int) -> list[int]:
    """Groups whose weighted (non-safety) reward is not the same for all G samples (DAPO's filter)."""
    w = torch.tensor([x.weight if x.role != "safety" else 0.0 for x in rewards])
    total = (torch.nan_to_num(r.rewards, nan=0.0) @ w).view(-1, G)
    return [
        i for i in range(total.shape[0]) if bool((total[i] != total[i, 0]).any()) and bool(r.ok.view(-1, G)[i].all())
    ]


def row_splits(s: TrainState, r: Rollouts) -> list[list[int]]:
    """The step's micro-batches (rows each): fixed size, or a token budget with the same count on every process."""
    cfg = s.recipe.grpo
    splits = split_rows(r, size=cfg.micro_batch_size, token_budget=cfg.micro_batch_tokens)
    if cfg.micro_batch_tokens:
        splits = split_to_count(splits, runtime.max_over_ranks(len(splits), s.accelerator))
    s.accelerator.gradient_accumulation_steps = len(splits)
    return splits


@torch.no_grad()
def old_and_reference_logprobs(s: TrainState, micro: list[MicroBatch], temperature: float) -> None:
    """Old-policy logprobs (only if num_iterations > 1) and reference logprobs (only if beta > 0)."""
    cfg = s.recipe.grpo
    for mb in micro:
        if cfg.num_iterations > 1:
            mb.old_logp = mb.logprobs(s.policy, temperature)
        if cfg.beta > 0:
            with reference_context(s.policy, s.ref):
                mb.ref_logp = mb.logprobs(s.ref or s.policy, temperature)


def update(s: TrainState, micro: list[MicroBatch], mask: torch.Tensor, step: int, nonfinite: int):
    """num_iterations optimizer steps, each over all micro-batches: (per-micro-batch metrics, last grad norm,
    nonfinite)."""
    cfg, acc = s.recipe.grpo, s.accelerator
    # the step's counts, so each micro-batch's loss is its exact share of the step loss (grpo.losses)
    num_tokens = acc.reduce(mask.sum().to(acc.device), reduction="sum").item()
    counts = dict(
        num_tokens=max(num_tokens, 1.0),
        local_tokens=float(mask.sum()),
        num_sequences=mask.shape[0],
        num_processes=s.world,
        max_completion_length=s.recipe.rollout.max_new_tokens,
    )
    loss_metrics, grad_norm = [], None
    for _ in range(cfg.num_iterations):
        for mb in micro:
            with acc.accumulate(s.model):
                logp = mb.logprobs(s.model, s.recipe.rollout.temperature)
                weights, mismatch = None, {}
                if mb.rollout_logp is not None:  # the sampler's log-probs vs the trainer's (old) policy's
                    weights, mismatch = rollout_correction(
                        logp.detach() if mb.old_logp is None else mb.old_logp,
                        mb.rollout_logp,
                        mb.mask,
                        mode=cfg.rollout_is,
                        cap=cfg.rollout_is_cap,
                    )
                loss, m = policy_loss(
                    logp,
                    mb.old_logp,
                    mb.advantages,
                    mb.mask,
                    loss_type=cfg.loss_type,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high,
                    beta=cfg.beta,
                    ref_logp=mb.ref_logp,
                    importance_level=cfg.importance_level,
                    is_weights=weights,
                    **counts,
                )
                acc.backward(
                    loss * len(micro)
                )  # accelerate divides by the accumulation steps: the shares are exact already
                grad_norm = (
                    acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm or math.inf)
                    if acc.sync_gradients
                    else None
                )
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    nonfinite = _skip_nonfinite(step + 1, loss, grad_norm, nonfinite + 1)
                else:
                    nonfinite = 0 if grad_norm is not None else nonfinite
                    s.optimizer.step()
                    if acc.sync_gradients:  # once per optimizer step (the scheduler is not prepared: see setup)
                        s.scheduler.step()
                s.optimizer.zero_grad()
            # each micro-batch's loss is its share of the step's: x the count, so their mean is the step loss
            loss_metrics.append({"loss": loss.item() * len(micro), **mismatch, **m})
    return loss_metrics, grad_norm, nonfinite


def log_step(s: TrainState, step: int, metrics: dict, r: Rollouts, advantages: torch.Tensor, bar) -> None:
    """metrics.jsonl and trackers every step, the console line every log_every, a sample table every samples_every."""
    track, G = s.recipe.tracking, s.recipe.grpo.num_generations
    s.tracker.log(step, metrics)
    if s.is_main and step % track.log_every == 0:
        bar.write(console_line(step, s.recipe.grpo.steps, metrics, s.rewards))
    if track.samples_every and step % track.samples_every == 0:
        shown = [p * G + j for p in range(len(r.rows)) for j in range(2)][:8]
        s.tracker.log_table(
            step,
            "samples",
            ["prompt", "completion", *[x.name for x in s.rewards], "advantage"],
            [
                [
                    r.rows[r.completions[i].prompt_index]["prompt_text"],
                    r.texts[i],
                    *[_f(v) for v in r.rewards[i].tolist()],
                    float(advantages[i]),
                ]
                for i in shown
            ],
        )


def evaluate_live(s: TrainState) -> dict:
    """Held-out eval (grpo.evaluate.evaluate_policy) of the live policy with the run's own rollout backend, as
    eval/<metric>; greedy decoding draws no random numbers, so the training run is the same with or without it."""
    from grpo.evaluate import eval_records, evaluate_policy

    t = time.perf_counter()
    if not s.eval_records:
        s.eval_records = eval_records(s.recipe, s.tok)
    was_training = s.policy.training
    s.policy.eval()
    with runtime.gathered_parameters(s.policy, s.zero_stage):
        m, _ = evaluate_policy(s.recipe, s.rollout, s.tok, s.eval_records, s.rewards)
    s.policy.train(was_training)
    out = {f"eval/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float)) and k != "n"}
    return {**out, "time_eval": time.perf_counter() - t}


def step_metrics(s: TrainState, r: Rollouts, advantages, mask, loss_metrics: list[dict], grad_norm, t: tuple) -> dict:
    """This process's metrics of a step: rewards, losses (token-weighted over micro-batches and ranks), lengths, the
    policy-gradient signal |A|, speed, and where the time went (t = the step's five clock readings)."""
    t0, t1, t2, t3, t4 = t
    n_tok = sum(len(c.token_ids) for c in r.completions)
    return {
        **episode_metrics(r.episodes or [], r.completions),
        **reward_metrics(r.rewards, s.rewards),
        **mean_dicts(loss_metrics),
        **token_means(loss_metrics, s.accelerator),
        "completion_len": n_tok / len(r.completions),
        "truncated_frac": sum(c.finish_reason == "length" for c in r.completions) / len(r.completions),
        "skipped_samples": float((~r.ok).sum()),
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": n_tok / max(t1 - t0, 1e-9),
        "time_rollout": t1 - t0,
        "time_score": t2 - t1,
        "time_logprobs": t3 - t2,
        "time_train": t4 - t3,
        "time_step": t4 - t0,
        "adv_abs_mean": float((advantages.abs()[:, None] * mask).sum() / mask.sum().clamp(min=1)),
    }


def _skip_nonfinite(step: int, loss, grad_norm, count: int) -> int:
    """Leave the parameters as they are (the caller zeroes the gradients); stop after MAX_NONFINITE in a row.

    The gradient norm is all-reduced, so every rank takes the same decision. Under DeepSpeed the
    engine has already stepped by then: the guard only counts and stops.
    """
    what = f"step {step}: loss {loss.item():.4g}, gradient norm {float(grad_norm):.4g}"
    if count >= MAX_NONFINITE:
        raise UserError(
            f"non-finite loss or gradient in {count} optimizer steps in a row ({what}); the parameters are those of "
            "the "
            "last finite step; lower grpo.lr, check the rewards' scale, keep grpo.max_grad_norm > 0, or train in "
            "float32"
        )
    log.warning(
        "skipping the optimizer update: non-finite %s (%d in a row; the run stops at %d)", what, count, MAX_NONFINITE
    )
    return count


def _f(v: float):
    return None if math.isnan(v) else round(v, 4)
