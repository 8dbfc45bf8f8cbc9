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

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo import checkpoint, runtime
from grpo.advantages import LagrangeMultiplier, combine_rewards, constrained_advantages, group_advantages, zero_std_fraction
from grpo.config import Recipe, recipe_to_dict, save_recipe
from grpo.data import check_columns, load_rows, prompt_records
from grpo.errors import Interrupted, UserError
from grpo.logprobs import selective_log_softmax
from grpo.losses import policy_loss
from grpo.metrics import console_line, curves, mean_dicts, reduce_metrics, reward_metrics, run_info, token_means
from grpo.prefix import batch_logprobs
from grpo.modeling import (count_parameters, load_model, load_tokenizer, local_parameter_count, make_reference, reference_config,
                            reference_context, save_model)
from grpo.rollout import SamplingParams, make_rollout
from grpo.scoring import build_rewards, score
from grpo.sft import Sampler
from grpo.tracking import Tracker, truncate_history

log = logging.getLogger(__name__)

MAX_NONFINITE = 3  # consecutive optimizer steps with a NaN/inf gradient norm before the run stops


# ------------------------------------------------------------------------------------- batches
def build_batch(prompt_ids: list[list[int]], completions, pad_id: int, mask_truncated: bool) -> dict[str, torch.Tensor]:
    """Sequences laid out [left-padded prompt | right-padded completion].

    Returns input_ids [N, P+C], attention_mask, position_ids, completion_ids [N, C] and
    completion_mask [N, C] (1 on real completion tokens, stop token included). Completion token j
    of row i sits at column P + j, so the logits predicting it are at column P + j - 1.
    """
    n = len(completions)
    P = max(len(prompt_ids[c.prompt_index]) for c in completions)
    C = max(max(len(c.token_ids) for c in completions), 1)
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + C), dtype=torch.long)
    cmask = torch.zeros((n, C), dtype=torch.float32)
    for i, c in enumerate(completions):
        p = prompt_ids[c.prompt_index]
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = 1
        if c.token_ids:
            ids[i, P:P + len(c.token_ids)] = torch.tensor(c.token_ids)
            attn[i, P:P + len(c.token_ids)] = 1
            if not (mask_truncated and c.finish_reason == "length"):
                cmask[i, :len(c.token_ids)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "completion_ids": ids[:, P:], "completion_mask": cmask}


def token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log pi(completion token) under `model` at `temperature`: [N, C]. Only C+1 positions get logits."""
    C = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                use_cache=False, logits_to_keep=C + 1)
    logits = out.logits[:, :-1]
    return selective_log_softmax(logits, batch["completion_ids"], temperature=temperature)


def micro_batches(batch: dict[str, torch.Tensor], size: int, device) -> list[dict[str, torch.Tensor]]:
    """Split along rows and trim each piece's padding columns."""
    n = batch["input_ids"].shape[0]
    out = []
    for s in range(0, n, size):
        mb = {k: v[s:s + size] for k, v in batch.items()}
        used = mb["attention_mask"].any(0).nonzero()
        lo = int(used[0]) if len(used) else 0
        C = batch["completion_ids"].shape[1]
        width = mb["input_ids"].shape[1]
        c_used = int(mb["completion_mask"].sum(0).nonzero().max()) + 1 if mb["completion_mask"].any() else 1
        hi = width - C + c_used
        for k in ("input_ids", "attention_mask", "position_ids"):
            mb[k] = mb[k][:, lo:hi]
        for k in ("completion_ids", "completion_mask", "advantages", "old_logp", "ref_logp"):
            if k in mb and mb[k].dim() == 2:
                mb[k] = mb[k][:, :c_used]
        out.append({k: v.to(device) for k, v in mb.items()})
    return out


# ------------------------------------------------------------------------------------- the loop
def run_grpo(recipe: Recipe, model_path: str | None = None, stage: str = "train") -> Path:
    """Train with GRPO into run.output_dir/<stage>; returns the folder of the saved final model."""
    g, r, run = recipe.grpo, recipe.rollout, recipe.run
    runtime.setup(run.seed, run.threads)
    out = runtime.stage_dir(run.output_dir, stage, overwrite=run.overwrite, resume=bool(g.resume))
    accelerator = runtime.make_accelerator()
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if g.prompts_per_step % world:
        raise UserError(f"grpo.prompts_per_step={g.prompts_per_step} must be divisible by the {world} processes (groups stay on one process)")
    if g.num_generations < 2:
        raise UserError(f"grpo.num_generations={g.num_generations}: GRPO needs at least 2 completions per prompt")
    if r.temperature <= 0:
        raise UserError(f"rollout.temperature={r.temperature}: GRPO samples, it needs a temperature > 0")
    if not recipe.data.train:
        raise UserError("the train stage needs data.train (a JSONL of prompts, plus any columns your rewards read)")
    per_rank = g.prompts_per_step // world
    n_local = per_rank * g.num_generations
    n_micro = math.ceil(n_local / g.micro_batch_size)
    accelerator.gradient_accumulation_steps = n_micro  # micro-batches per optimizer step
    zero_stage = runtime.configure_deepspeed(accelerator, g.micro_batch_size, n_micro, g.max_grad_norm)

    # Data, rewards, model
    resume_from = checkpoint.find_resume(out, g.resume)
    problem = checkpoint.earlier_run_problem(out, overwrite=run.overwrite, resume=bool(g.resume))
    if problem:
        raise UserError(problem)
    if not resume_from and is_main and (n := checkpoint.remove_checkpoints(out)):
        log.warning("run.overwrite=true: deleted %d checkpoint(s) of an earlier run in %s", n, out)
    source = str(resume_from) if resume_from else (model_path or recipe.model.name_or_path)
    tok = load_tokenizer(dataclasses.replace(recipe.model, name_or_path=source))
    rows = load_rows(recipe.data.train, "data.train")
    fmt = check_columns(rows, recipe.data, recipe.data.train, "data.train", need_completion=False)
    prompts, dropped = prompt_records(rows, fmt, recipe.data, tok)
    rewards = build_rewards(recipe.rewards, device=accelerator.device, output_dir=run.output_dir)
    model = load_model(recipe.model, source, continue_adapter=bool(resume_from))
    start_from = model_path or recipe.model.name_or_path  # the reference, also when resuming from a checkpoint
    ref = make_reference(model, g.beta, load=lambda: load_model(reference_config(recipe.model), start_from, for_training=False))
    trainable, total = count_parameters(model)
    optimizer = runtime.build_optimizer(model, g.lr, g.weight_decay)
    scheduler = runtime.build_scheduler(optimizer, g.lr_scheduler, g.warmup_steps, g.steps * g.num_iterations)
    fsdp = accelerator.is_fsdp2
    gen_model = runtime.rollout_copy(model) if fsdp else None  # FSDP: generate on a whole copy, refreshed every step
    # the scheduler stays outside prepare(): accelerate would step it once per process per step
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = runtime.place_reference(ref, accelerator, zero_stage)  # ZeRO-3: sharded like the policy
    policy = accelerator.unwrap_model(model)
    if gen_model is not None:
        gen_model.to(accelerator.device)
    rollout = make_rollout(r.backend, gen_model or policy, tok)
    stop_ids = tuple(dict.fromkeys([tok.eos_token_id, *r.stop_token_ids]))
    safety = LagrangeMultiplier.from_lambda(recipe.safety.lambda_init, lr=recipe.safety.lambda_lr, threshold=recipe.safety.cost_threshold,
                                            lam_max=recipe.safety.lambda_max, delay_steps=recipe.safety.lambda_delay) if recipe.safety.enabled else None
    sampler = Sampler(len(prompts), run.seed, rank, world)
    start = 0
    if resume_from:
        state = checkpoint.load_state(resume_from)
        start = _restore(state, optimizer, scheduler, sampler, safety, model=model, zero_stage=zero_stage, fsdp=fsdp)
        if zero_stage:
            _restore_deepspeed(model, resume_from, state, world)
        log.info("resumed from %s at step %d", resume_from, start)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "config.yaml")
        log.info("train: %s | params %s trainable / %s total | %d processes | %d prompts x G=%d = %d completions/step | %d steps | "
                 "rollout %s | rewards %s | %s", source, f"{trainable:,}", f"{total:,}", world, g.prompts_per_step,
                 g.num_generations, g.prompts_per_step * g.num_generations, g.steps, r.backend,
                 ", ".join(f"{x.name}({x.role},w={x.weight:g})" for x in rewards), out)
        if dropped:
            log.info("dropped %d prompts longer than data.max_prompt_length=%d", dropped, recipe.data.max_prompt_length)
    if resume_from and is_main:
        truncate_history(out / "metrics.jsonl", start)  # steps logged after the checkpoint are run again
    tracker = Tracker(out, recipe.tracking, is_main=is_main, run_config=recipe_to_dict(recipe), name=stage,
                      group=Path(run.output_dir).name, resume=bool(resume_from))

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        # under DeepSpeed the optimizer state is sharded: each rank adds its shard (DeepSpeed's own format)
        # to the unfinished folder; rank 0 then writes the gathered weights and every counter and renames
        weights = accelerator.get_state_dict(model) if zero_stage or fsdp else None
        # FSDP: the optimizer state gathered whole, keyed by parameter name (any process count can resume)
        optim = runtime.full_optimizer_state(model, optimizer) if fsdp else None
        if zero_stage:
            if is_main:
                checkpoint.start_checkpoint(out, step)
            accelerator.wait_for_everyone()
            model.save_checkpoint(str(out / f"ckpt-{step}.tmp"), tag=checkpoint.DEEPSPEED, save_latest=False,
                                  exclude_frozen_parameters=True)
            accelerator.wait_for_everyone()
        if is_main:
            state = {"step": step, "optimizer": optim if fsdp else None if zero_stage else optimizer.state_dict(),
                     "optimizer_by_name": fsdp, "scheduler": scheduler.state_dict(),
                     "rng": checkpoint.rng_state(), "sampler": {"order": sampler.order, "epoch": sampler.epoch, "rng": sampler.rng.getstate()},
                     "lagrange": safety.state_dict() if safety else None, "world_size": world, "zero_stage": zero_stage}
            checkpoint.save_checkpoint(out, step, policy, tok, state, g.keep_last, weights=weights, started=bool(zero_stage))
        accelerator.wait_for_everyone()

    G = g.num_generations
    logprobs = batch_logprobs if g.shared_prefix else token_logprobs  # the same numbers; the first computes prompts once

    def rollout_round(indices: list[int], step: int, round_: int):
        """Generate G completions for each prompt and score them: (rows, completions, texts, R, ok, seconds scoring)."""
        rows = [prompts[i] for i in indices]
        params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                min_new_tokens=r.min_new_tokens, stop_token_ids=stop_ids,
                                seed=run.seed * 100_003 + step * world + rank + round_ * 1_000_003)
        was_training = policy.training
        policy.eval()
        with runtime.gathered_parameters(policy, zero_stage):  # ZeRO-3: full weights per rank while generating
            comps = generate(rollout, [row["prompt_ids"] for row in rows], G, params,
                             [run.seed * 100_003 + (step + round_ * 7919) * len(prompts) + i for i in indices] if r.seed_per_prompt else None)
        policy.train(was_training)
        texts = [tok.decode([t for t in c.token_ids if t not in stop_ids], skip_special_tokens=False) for c in comps]
        expanded = [rows[c.prompt_index] for c in comps]
        columns = {k: [row[k] for row in expanded] for k in rows[0] if k not in ("prompt_ids", "prompt_text")}
        columns["completion_ids"] = [c.token_ids for c in comps]
        t = time.perf_counter()
        R, ok = score(rewards, [row["prompt_text"] for row in expanded], texts, columns, on_error=g.on_reward_error)
        return rows, comps, texts, R, ok, time.perf_counter() - t

    model.train()
    nonfinite = 0  # optimizer steps skipped in a row because the gradient norm was NaN/inf
    bar = tqdm(range(start, g.steps), initial=start, total=g.steps, desc="grpo", disable=not is_main, dynamic_ncols=True)
    with checkpoint.StopRequest() as stop:
        for step in bar:
            t0 = time.perf_counter()
            # Rollout and scoring: G completions per prompt (DAPO dynamic sampling: refill zero-std groups)
            part = rollout_round(sampler.take(per_rank), step, 0)
            parts, rounds = [part], 1
            keep = informative_groups(part[3], part[4], rewards, G) if g.dynamic_sampling else list(range(per_rank))
            kept = [(0, i) for i in keep]
            while g.dynamic_sampling and rounds < g.max_generation_rounds and any_rank(len(kept) < per_rank, accelerator):
                parts.append(rollout_round(sampler.take(per_rank), step, rounds))
                kept += [(rounds, i) for i in informative_groups(parts[-1][3], parts[-1][4], rewards, G)]
                rounds += 1
            generated, informative = rounds * per_rank, len(kept)
            if g.dynamic_sampling:  # informative groups first; zero-std ones only if too few were found
                dropped = [(k, i) for k in range(rounds) for i in range(per_rank) if (k, i) not in set(kept)]
                kept = (kept + dropped)[:per_rank]
            batch_rows, completions, texts, R, ok = select_groups(parts, kept, G)
            expanded = [batch_rows[c.prompt_index] for c in completions]
            score_time = sum(p[5] for p in parts)
            t1 = time.perf_counter() - score_time  # time_rollout: generation only; scoring is timed inside the rounds
            adv, adv_metrics = compute_advantages(R, rewards, g, safety, accelerator, recipe.safety.constrain, recipe.safety.cost_std_floor)
            adv = adv * ok
            if g.dynamic_sampling:
                adv_metrics.update({"generation_rounds": rounds, "filtered_groups_frac": 1 - informative / generated})
            t2 = time.perf_counter()

            # Old / reference logprobs, then num_iterations passes of updates
            batch = build_batch([row["prompt_ids"] for row in batch_rows], completions, tok.pad_token_id, g.mask_truncated_completions)
            batch["completion_mask"] *= ok[:, None].float()
            batch["advantages"] = adv
            micro = micro_batches(batch, g.micro_batch_size, accelerator.device)
            with torch.no_grad():
                for mb in micro:
                    if g.num_iterations > 1:
                        mb["old_logp"] = logprobs(policy, mb, r.temperature)
                    if g.beta > 0:
                        with reference_context(policy, ref):
                            mb["ref_logp"] = logprobs(ref or policy, mb, r.temperature)
            t3 = time.perf_counter()
            num_tokens = accelerator.reduce(batch["completion_mask"].sum().to(accelerator.device), reduction="sum").item()
            loss_metrics = []
            for _ in range(g.num_iterations):
                for mb in micro:
                    with accelerator.accumulate(model):
                        logp = logprobs(model, mb, r.temperature)
                        loss, m = policy_loss(logp, mb.get("old_logp"), mb["advantages"], mb["completion_mask"], loss_type=g.loss_type,
                                              epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta, ref_logp=mb.get("ref_logp"),
                                              importance_level=g.importance_level, max_completion_length=r.max_new_tokens,
                                              num_tokens=max(num_tokens, 1.0))
                        if g.loss_type == "dapo":  # undo accelerate's 1/n_micro and DDP's 1/world: the count is already global
                            loss = loss * n_micro * world
                        accelerator.backward(loss)
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), g.max_grad_norm or math.inf) if accelerator.sync_gradients else None
                        if grad_norm is not None and not math.isfinite(float(grad_norm)):
                            nonfinite = _skip_nonfinite(step + 1, loss, grad_norm, nonfinite + 1)
                        else:
                            nonfinite = 0 if grad_norm is not None else nonfinite
                            optimizer.step()
                            if accelerator.sync_gradients:  # once per optimizer step (not prepared: see above)
                                scheduler.step()
                        optimizer.zero_grad()
                    loss_metrics.append({"loss": loss.item(), **m})
            if gen_model is not None:
                runtime.copy_full_weights(model, gen_model)
            rollout.sync_weights(gen_model or policy)
            t4 = time.perf_counter()

            # Log
            n_tok = sum(len(c.token_ids) for c in completions)
            metrics = {**reward_metrics(R, rewards), **adv_metrics, **mean_dicts(loss_metrics), **token_means(loss_metrics, accelerator),
                       "completion_len": n_tok / len(completions),
                       "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(completions),
                       "skipped_samples": float((~ok).sum()), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "tokens_per_s": n_tok / max(t1 - t0, 1e-9), "time_rollout": t1 - t0, "time_score": t2 - t1,
                       "time_logprobs": t3 - t2, "time_train": t4 - t3, "time_step": t4 - t0}
            metrics = reduce_metrics(metrics, accelerator)
            tracker.log(step + 1, metrics)
            if is_main and (step + 1) % recipe.tracking.log_every == 0:
                bar.write(console_line(step + 1, g.steps, metrics, rewards))
            if recipe.tracking.samples_every and (step + 1) % recipe.tracking.samples_every == 0:
                tracker.log_table(step + 1, "samples", ["prompt", "completion", *[x.name for x in rewards], "advantage"],
                                  [[expanded[i]["prompt_text"], texts[i], *[_f(v) for v in R[i].tolist()], float(adv[i])]
                                   for i in [p * g.num_generations + j for p in range(len(batch_rows)) for j in range(2)][:8]])
            if stop.any_rank(accelerator):
                save(step + 1)
                tracker.close(curves(rewards))
                raise Interrupted(f"signal received; checkpoint saved at {out}/ckpt-{step + 1}; continue with grpo.resume=true",
                                  code=128 + int(stop.signal or 15))
            if g.save_every and (step + 1) % g.save_every == 0 and step + 1 < g.steps:
                save(step + 1)

    save(g.steps)
    info = run_info(model if zero_stage else policy, accelerator, zero_stage)
    final = out / "final"
    weights = accelerator.get_state_dict(model) if runtime.sharded(accelerator, zero_stage) else None  # gathered for the save
    if is_main:
        save_model(policy, tok, final, merge=recipe.model.lora.merge_on_save, state_dict=weights)
        pngs = tracker.close(curves(rewards))
        # parameter elements this rank holds for the reference: 0 without one, < total when ZeRO-3 shards it
        ref_local = local_parameter_count(ref) if ref is not None else 0
        policy_local = local_parameter_count(policy)
        (out / "run_info.json").write_text(json.dumps({**info, "steps": g.steps, "params_total": total,
                                                       "reference_local_params": ref_local,
                                                       "policy_local_params": policy_local}, indent=1))
        runtime.mark_done(out)
        log.info("train: saved %s; curves: %s", final, ", ".join(str(p) for p in pngs))
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------- steps
def informative_groups(R: torch.Tensor, ok: torch.Tensor, rewards, G: int) -> list[int]:
    """Groups whose weighted (non-safety) reward is not the same for all G samples (DAPO's filter)."""
    w = torch.tensor([x.weight if x.role != "safety" else 0.0 for x in rewards])
    total = (torch.nan_to_num(R, nan=0.0) @ w).view(-1, G)
    return [i for i in range(total.shape[0]) if bool((total[i] != total[i, 0]).any()) and bool(ok.view(-1, G)[i].all())]


def select_groups(parts: list[tuple], chosen: list[tuple[int, int]], G: int):
    """Concatenate the chosen (round, group) groups of several rollout rounds: rows, completions, texts, R, ok."""
    rows, comps, texts, Rs, oks = [], [], [], [], []
    for new_index, (k, i) in enumerate(chosen):
        p_rows, p_comps, p_texts, p_R, p_ok, _ = parts[k]
        rows.append(p_rows[i])
        for c in p_comps[i * G:(i + 1) * G]:
            comps.append(dataclasses.replace(c, prompt_index=new_index))
        texts += p_texts[i * G:(i + 1) * G]
        Rs.append(p_R[i * G:(i + 1) * G])
        oks.append(p_ok[i * G:(i + 1) * G])
    return rows, comps, texts, torch.cat(Rs), torch.cat(oks)


def any_rank(flag: bool, accelerator) -> bool:
    """True if `flag` holds on any process (every rank then takes the same branch: collectives stay aligned)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def generate(rollout, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: list[int] | None):
    """G completions per prompt; with per-prompt seeds each group is drawn by its own call."""
    if seeds is None:
        return rollout.generate(prompt_ids, n, params)
    out = []
    for i, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
        for c in rollout.generate([ids], n, dataclasses.replace(params, seed=seed)):
            c.prompt_index = i
            out.append(c)
    return out


def _skip_nonfinite(step: int, loss, grad_norm, count: int) -> int:
    """Leave the parameters as they are (the caller zeroes the gradients); stop after MAX_NONFINITE in a row.

    The gradient norm is all-reduced, so every rank takes the same decision. Under DeepSpeed the
    engine has already stepped by then: the guard only counts and stops.
    """
    what = f"step {step}: loss {loss.item():.4g}, gradient norm {float(grad_norm):.4g}"
    if count >= MAX_NONFINITE:
        raise UserError(f"non-finite loss or gradient in {count} optimizer steps in a row ({what}); the parameters are those of the "
                        "last finite step; lower grpo.lr, check the rewards' scale, keep grpo.max_grad_norm > 0, or train in float32")
    log.warning("skipping the optimizer update: non-finite %s (%d in a row; the run stops at %d)", what, count, MAX_NONFINITE)
    return count


def compute_advantages(R: torch.Tensor, rewards, g, safety: LagrangeMultiplier | None, accelerator,
                       constrain: str = "mean_cost", cost_std_floor: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Advantages [N] from rewards R[N, K]: reward/usefulness columns combined, the safety column as a cost.

    Without a safety reward: combine_rewards (weights, grpo.reward_mode, grpo.scale). With one, its
    advantage is centred per group and divided by (group std + cost_std_floor): groups whose cost
    barely varies (e.g. all safe) get ~0 instead of amplified noise, a real safe/unsafe split ~unit scale. Constraint on: A = (A_useful - lam * A_cost) / (1 + lam)
    (Safe-RLHF's Lagrangian), lam then updated from the global mean cost (`mean_cost`) or the global
    fraction of samples with cost > 0 (`violation_rate`: a chance constraint P(unsafe) <= threshold).
    Constraint off: A_useful - weight * A_cost (weight 0 = the cost is only logged).
    """
    G = g.num_generations
    cost_k = [k for k, x in enumerate(rewards) if x.role == "safety"]
    use_k = [k for k, x in enumerate(rewards) if x.role != "safety"]
    metrics = {}
    if use_k:
        useful = R[:, use_k]
        a_useful = combine_rewards(useful, [rewards[k].weight for k in use_k], G, mode=g.reward_mode, scale=g.scale, eps=g.eps)
        total = torch.nan_to_num(useful, nan=0.0) @ torch.tensor([rewards[k].weight for k in use_k], dtype=useful.dtype)
        metrics["zero_std_frac"] = zero_std_fraction(total, G)
    else:
        a_useful = torch.zeros(R.shape[0])
    if not cost_k:
        return a_useful, metrics
    cost = torch.nan_to_num(R[:, cost_k[0]], nan=0.0)
    a_cost = group_advantages(cost, G, scale="group", eps=cost_std_floor)
    stats = accelerator.reduce(torch.stack([cost.mean(), (cost > 0).float().mean()]).to(accelerator.device), reduction="mean")
    mean_cost, unsafe_rate = stats.tolist()
    metrics.update({"cost": mean_cost, "unsafe_rate": unsafe_rate})
    if safety is None:
        return a_useful - rewards[cost_k[0]].weight * a_cost, metrics
    lam = safety.lam
    adv = constrained_advantages(a_useful, a_cost, lam)
    safety.update(unsafe_rate if constrain == "violation_rate" else mean_cost)
    metrics.update({"lambda": lam, "constraint_violation": float((unsafe_rate if constrain == "violation_rate" else mean_cost) > safety.threshold)})
    return adv, metrics


def _restore(state: dict, optimizer, scheduler, sampler: Sampler, safety, *, model, zero_stage: int, fsdp: bool) -> int:
    saved, by_name = state["optimizer"], state.get("optimizer_by_name", False)
    if zero_stage:
        pass  # DeepSpeed's sharded optimizer: _restore_deepspeed
    elif saved is not None and by_name:
        runtime.load_full_optimizer_state(model, optimizer, saved)  # written under FSDP: any process count, FSDP or not
    elif saved is not None and not fsdp:
        optimizer.load_state_dict(saved)
    else:
        log.warning("the checkpoint holds no optimizer state this run can load (written under DeepSpeed, or without FSDP for "
                    "an FSDP run): Adam's moments restart (weights, step, data position, RNG and lambda are restored)")
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(state["rng"])
    s = state["sampler"]
    sampler.order, sampler.epoch = list(s["order"]), s["epoch"]
    rng = s["rng"]
    sampler.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
    if safety is not None and state.get("lagrange"):
        safety.load_state_dict(state["lagrange"])
    return int(state["step"])


def _restore_deepspeed(engine, path: Path, state: dict, world: int) -> None:
    """Load each rank's optimizer shard with DeepSpeed's own loader (same process count only)."""
    why = None
    if not (path / checkpoint.DEEPSPEED).is_dir():
        why = "it holds no DeepSpeed optimizer shards (written without DeepSpeed)"
    elif state.get("world_size") != world:
        why = (f"it was written by {state.get('world_size')} processes and this run has {world}: DeepSpeed's shards are "
               "split per process (resume with the same process count to continue exactly)")
    if why:
        log.warning("checkpoint %s: %s; Adam's moments restart (weights, step, data position, RNG and lambda are restored)", path, why)
        return
    # the weights already came from the checkpoint's safetensors; DeepSpeed's module copy skips frozen (LoRA base) weights
    loaded, _ = engine.load_checkpoint(str(path), tag=checkpoint.DEEPSPEED, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise UserError(f"checkpoint {path}: DeepSpeed could not load its optimizer shards from {path / checkpoint.DEEPSPEED}; "
                        "resume from another checkpoint (grpo.resume=PATH) or start fresh")


def _f(v: float):
    return None if math.isnan(v) else round(v, 4)
