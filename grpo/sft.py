"""SFT stage: supervised fine-tuning with the loss on completion tokens only.

    python -m grpo sft recipes/quickstart.yaml [sft.steps=200 ...]
    accelerate launch -m grpo sft recipes/quickstart.yaml

Each optimizer step takes `sft.batch_size` examples per process (x `sft.grad_accum`), sampled
without replacement epoch by epoch with the run seed. With `sft.packing=true` examples are
concatenated into rows of `sft.max_length` tokens; position ids restart at every example and no
attention mask is passed, which makes transformers build a block-diagonal causal mask, so attention
never crosses examples (exact, checked in tests). The final model (or LoRA adapter, plus a merged
copy when `model.lora.merge_on_save`) is saved to `<run.output_dir>/sft/final`, loadable with
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo import rules, runtime
from grpo.config import Recipe
from grpo.data import Example, Sampler, check_columns, load_rows, sft_examples
from grpo.environments import tool_schemas
from grpo.modeling import count_parameters, load_model, load_tokenizer, save_model
from grpo.recipe_yaml import recipe_to_dict, save_recipe
from grpo.tracking import Tracker

log = logging.getLogger(__name__)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: input_ids, attention_mask, labels (-100 on pads and prompts)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Concatenate examples into one row per `max_length` tokens (greedy, no example split).

    Returns input_ids, labels, position_ids (restarting per example); rows are right-padded with
    position 0 runs whose labels are -100. Pass with no attention_mask and use_cache=False.
    """
    rows, cur = [], []
    for e in examples:
        if cur and sum(len(x.input_ids) for x in cur) + len(e.input_ids) > max_length:
            rows.append(cur)
            cur = []
        cur.append(e)
    rows.append(cur)
    ids = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.input_ids)
            ids[i, t : t + n] = torch.tensor(e.input_ids)
            labels[i, t : t + n] = torch.tensor(e.labels)
            pos[i, t : t + n] = torch.arange(n)
            t += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def make_batch(examples: list[Example], packing: bool, max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    return pack(examples, max_length) if packing else collate(examples, pad_id)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over completion tokens (labels != -100) and their count."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    n = int((targets != -100).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / max(n, 1), n


@torch.no_grad()
def eval_loss(model, examples: list[Example], cfg, pad_id: int, batch_size: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = make_batch(examples[i : i + batch_size], cfg.packing, cfg.max_length, pad_id)
        loss, n = lm_loss(model, {k: v.to(model.device) for k, v in batch.items()})
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def run_sft(recipe: Recipe, model_path: str | None = None) -> Path:
    """Train with SFT; returns the folder of the saved final model."""
    cfg, dcfg = recipe.sft, recipe.data
    runtime.setup(recipe.run.seed, recipe.run.threads)
    out = runtime.stage_dir(recipe.run.output_dir, "sft", overwrite=recipe.run.overwrite)
    rules.raise_first(rules.stage_data(dcfg, "sft"))
    accelerator = runtime.make_accelerator(cfg.grad_accum)
    zero_stage = runtime.configure_deepspeed(accelerator, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    split = runtime.sharded(accelerator, zero_stage)  # ZeRO-3 / FSDP: forwards on all ranks together, gathered save
    model_cfg = recipe.model
    tok = load_tokenizer(model_cfg if model_path is None else _with_path(model_cfg, model_path))

    rows = load_rows(dcfg.sft_train, "data.sft_train")
    fmt = check_columns(rows, dcfg, dcfg.sft_train, "data.sft_train", need_completion=True)
    tools = tool_schemas(recipe.environment)  # rendered into chat prompts as GRPO renders them
    train = sft_examples(rows, fmt, dcfg, tok, cfg.max_length, tools)
    evals = []
    if dcfg.sft_eval:
        erows = load_rows(dcfg.sft_eval, "data.sft_eval")
        evals = sft_examples(
            erows, check_columns(erows, dcfg, dcfg.sft_eval, "data.sft_eval", True), dcfg, tok, cfg.max_length, tools
        )

    model = load_model(model_cfg, model_path)
    trainable, total = count_parameters(model)
    optimizer = runtime.build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.optim)
    scheduler = runtime.build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.steps)
    # the scheduler stays outside prepare(): accelerate would step it once per process per step
    model, optimizer = accelerator.prepare(model, optimizer)
    is_main = accelerator.is_main_process
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "config.yaml")
        log.info(
            "sft: %s | %d examples (%s) | params %s trainable / %s total | %d processes | %d steps x %d x %d",
            model_path or model_cfg.name_or_path,
            len(train),
            fmt,
            f"{trainable:,}",
            f"{total:,}",
            accelerator.num_processes,
            cfg.steps,
            cfg.batch_size * accelerator.num_processes,
            cfg.grad_accum,
        )
    tracker = Tracker(
        out,
        recipe.tracking,
        is_main=is_main,
        run_config=recipe_to_dict(recipe),
        name="sft",
        group=Path(recipe.run.output_dir).name,
    )
    sampler = Sampler(len(train), recipe.run.seed, accelerator.process_index, accelerator.num_processes)
    model.train()
    bar = tqdm(range(cfg.steps), desc="sft", disable=not is_main, dynamic_ncols=True)
    for step in bar:
        t0, tokens, losses = time.perf_counter(), 0, []
        for _ in range(cfg.grad_accum):
            batch = make_batch(
                [train[i] for i in sampler.take(cfg.batch_size)], cfg.packing, cfg.max_length, tok.pad_token_id
            )
            with accelerator.accumulate(model):
                loss, n = lm_loss(model, {k: v.to(accelerator.device) for k, v in batch.items()})
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:  # once per optimizer step (not prepared: see above)
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            tokens += n
        metrics = {
            "loss": sum(losses) / len(losses),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens * accelerator.num_processes / (time.perf_counter() - t0),
            "epoch": sampler.epoch,
        }
        if (
            evals
            and (is_main or split)
            and (step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0))
        ):
            metrics["eval_loss"] = eval_loss(accelerator.unwrap_model(model), evals, cfg, tok.pad_token_id)
        tracker.log(step + 1, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}", **({"eval": f"{metrics['eval_loss']:.3f}"} if "eval_loss" in metrics else {})
        )
    final = out / "final"
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model) if split else None  # all ranks take part in the gather
    if is_main:
        save_model(accelerator.unwrap_model(model), tok, final, merge=model_cfg.lora.merge_on_save, state_dict=weights)
        pngs = tracker.close({"sft_curves": ["loss", "eval_loss", "lr"]})
        runtime.mark_done(out)
        first, last = tracker.history[0], tracker.history[-1]
        log.info(
            "sft: loss %.3f -> %.3f%s; saved %s (%s)",
            first["loss"],
            last["loss"],
            f", eval loss {last['eval_loss']:.3f}" if last.get("eval_loss") is not None else "",
            final,
            ", ".join(p.name for p in pngs),
        )
    accelerator.wait_for_everyone()
    return final


def _with_path(model_cfg, path: str):
    import dataclasses

    return dataclasses.replace(model_cfg, name_or_path=path, tokenizer=model_cfg.tokenizer)
