"""The rm stage, reward-model and cost-model training: `python -m grpo rm RECIPE [rm.steps=300 ...]`.

    python -m grpo rm recipes/quickstart.yaml                      # both models on the toy-world pairs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m grpo rm recipes/quickstart.yaml

Two models, each a `AutoModelForSequenceClassification` with one output, started from `rm.base` (default
`model.name_or_path`; a causal LM's weights load into the backbone, the score head is new):

- usefulness (`rm.usefulness_train`, rows `prompt, chosen, rejected`): a reward model trained with the
  Bradley-Terry loss (`rewards.pairwise.bradley_terry_loss`); higher = more useful.
- safety (`rm.safety_train`, rows `prompt, chosen, rejected, chosen_is_safe, rejected_is_safe` where
  `chosen` is the safer response): a COST model trained with Safe-RLHF's cost loss
  (`rewards.pairwise.safety_cost_loss`): pairwise ranking plus sign terms, so cost > 0 means unsafe, 0 is the boundary.

Inputs are built exactly as `rewards.models.RewardModelScorer` builds them at GRPO time (`rm.template`,
default `concat`: the raw prompt + completion, right for datasets whose prompts are already formatted;
`chat` renders the tokenizer's chat template), and that choice is saved in the model's
`reward_model.json`, so `{name: <run>/rm/usefulness, role: usefulness}` in `rewards:` just works.

Each step takes `rm.batch_size` pairs per process (seeded epoch-wise shuffling, each process its own
share, DDP through accelerate), AdamW, `rm.lr_scheduler`. With `model.lora.enabled` the backbone gets a
peft LoRA adapter (the score head trains in full) and the adapter is merged on save, so the saved
classifier loads without peft. Held-out metrics before and after training (and every `rm.eval_every`
steps) go to `<run.output_dir>/rm/logs/<model>/metrics.jsonl` (and wandb/tensorboard when asked);
models to `<run.output_dir>/rm/{usefulness,safety}` (safetensors + tokenizer + reward_model.json);
before/after numbers to `<run.output_dir>/rm/results.json`.

Held-out metrics: usefulness `pair_accuracy` (r_chosen > r_rejected), per category, and
`harmful_prefers_compliance` (the usefulness/safety conflict: on harmful prompts, the fraction of
compliance-vs-refusal pairs where the reward model prefers compliance). Safety `pair_accuracy` over
pairs whose safety labels differ (c_safer < c_unsafer; pairs of two safe responses carry no ranking
signal in the toy data, `pair_accuracy_all` counts them too), `sign_accuracy` (cost > 0 iff unsafe,
over every response), and on harmful prompts `harmful_refusal_negative_cost` /
`harmful_compliance_positive_cost`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo import rules, runtime
from grpo.config import Recipe
from grpo.data import Sampler, load_rows
from grpo.errors import UserError, first_line
from grpo.recipe_yaml import save_recipe
from grpo.tracking import Tracker
from rewards.models import RewardModelScorer, collate, encode, write_meta
from rewards.pairwise import bradley_terry_loss, safety_cost_loss
from rewards.verifiable import is_refusal

log = logging.getLogger(__name__)

KINDS = ("usefulness", "safety")


# ---------------------------------------------------------------------------------------- data
def load_pairs(spec: str, what: str, kind: str) -> list[dict]:
    """Preference rows, checked: prompt/chosen/rejected strings (+ boolean safety labels for `safety`)."""
    rows = load_rows(spec, what)
    need = ["prompt", "chosen", "rejected"] + (["chosen_is_safe", "rejected_is_safe"] if kind == "safety" else [])
    missing = [k for k in need if k not in rows[0]]
    if missing:
        raise UserError(
            f"{what} '{spec}' has no {', '.join(missing)} field(s) (columns: {', '.join(rows[0])}); "
            f"a {kind} pair needs {', '.join(need)}"
        )
    for i, r in enumerate(rows):
        bad = [k for k in need[:3] if not isinstance(r.get(k), str)] + [
            k for k in need[3:] if not isinstance(r.get(k), bool)
        ]
        if bad:
            raise UserError(
                f"{what} '{spec}' row {i}: {', '.join(bad)} must be {'text' if bad[0] in need[:3] else 'true/false'}"
            )
        if kind == "safety" and r["rejected_is_safe"] and not r["chosen_is_safe"]:
            raise UserError(
                f"{what} '{spec}' row {i}: chosen (the safer response) is unsafe but rejected is safe; swap them"
            )
    return rows


def encode_pairs(tok, rows: list[dict], template: str, max_length: int) -> tuple[list[dict], list[dict]]:
    prompts = [r["prompt"] for r in rows]
    return (
        encode(tok, prompts, [r["chosen"] for r in rows], template=template, max_length=max_length),
        encode(tok, prompts, [r["rejected"] for r in rows], template=template, max_length=max_length),
    )


def pair_scores(
    model, chosen: list[dict], rejected: list[dict], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over the chosen and rejected responses of a batch: ([B], [B]) scores."""
    batch = {k: v.to(device) for k, v in collate(chosen + rejected, pad_id).items()}
    scores = model(**batch).logits[:, 0].float()
    return scores[: len(chosen)], scores[len(chosen) :]


# ---------------------------------------------------------------------------------------- eval
def evaluate(
    scorer: RewardModelScorer, kind: str, rows: list[dict], chosen: list[dict], rejected: list[dict]
) -> dict[str, float]:
    """Held-out metrics of one model (see the module docstring)."""
    was_training = scorer.model.training
    scorer.model.eval()
    sc, sr = scorer.score_features(chosen), scorer.score_features(rejected)
    scorer.model.train(was_training)
    cats = [r.get("category") for r in rows]
    if kind == "usefulness":
        win = sc > sr
        out = {"pair_accuracy": win.float().mean().item(), "reward_gap": (sc - sr).mean().item()}
        out.update(_by_category(win, cats, "pair_accuracy"))
        conflict = [
            i
            for i, r in enumerate(rows)
            if r.get("category") == "harmful" and is_refusal(r["chosen"]) != is_refusal(r["rejected"])
        ]
        if conflict:
            prefers = [(sc[i] > sr[i]).item() != is_refusal(rows[i]["chosen"]) for i in conflict]
            out["harmful_prefers_compliance"] = sum(prefers) / len(prefers)
        return out
    safe_c = torch.tensor([r["chosen_is_safe"] for r in rows])
    safe_r = torch.tensor([r["rejected_is_safe"] for r in rows])
    _, m = safety_cost_loss(sc, sr, safe_c, safe_r)
    win = sc < sr
    informative = safe_c & ~safe_r
    out = {
        "pair_accuracy": win[informative].float().mean().item() if informative.any() else float("nan"),
        "pair_accuracy_all": win.float().mean().item(),
        "sign_accuracy": m["sign_accuracy"],
        "cost_safe": m["cost_safe"],
        "cost_unsafe": m["cost_unsafe"],
    }
    sign_ok = torch.stack([(sc > 0) == ~safe_c, (sr > 0) == ~safe_r], dim=1).all(dim=1)
    out.update(_by_category(sign_ok, cats, "sign_accuracy_both"))
    refusal_cost, comply_cost = [], []
    for i, r in enumerate(rows):
        if r.get("category") == "harmful":
            for text, c in ((r["chosen"], sc[i]), (r["rejected"], sr[i])):
                (refusal_cost if is_refusal(text) else comply_cost).append(c.item())
    if refusal_cost:
        out["harmful_refusal_negative_cost"] = sum(c < 0 for c in refusal_cost) / len(refusal_cost)
    if comply_cost:
        out["harmful_compliance_positive_cost"] = sum(c > 0 for c in comply_cost) / len(comply_cost)
    return out


def _by_category(ok: torch.Tensor, cats: list, name: str) -> dict[str, float]:
    out = {}
    for c in sorted({c for c in cats if isinstance(c, str)}):
        mask = torch.tensor([x == c for x in cats])
        out[f"{name}_{c}"] = ok[mask].float().mean().item()
    return out


# ---------------------------------------------------------------------------------------- model
def load_classifier(recipe: Recipe, source: str, seed: int):
    """(model, tokenizer): a one-output sequence classifier from `source`, LoRA applied if enabled."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from grpo.modeling import DTYPES, load_tokenizer

    mcfg = copy.copy(recipe.model)
    mcfg.name_or_path = source
    if recipe.rm.base:
        mcfg.tokenizer = None  # a separate base model brings its own tokenizer
    tok = load_tokenizer(mcfg)
    tok.padding_side = "right"
    torch.manual_seed(seed)  # the new score head's init
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "score.weight MISSING" load report is not news
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
            revision=mcfg.revision,
            dtype=DTYPES[mcfg.dtype],
            trust_remote_code=mcfg.trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load rm base '{source}' as a sequence classifier: {first_line(e)} (set rm.base to a local "
            "folder or hub id of a model that has a ForSequenceClassification class)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tok.pad_token_id
    log.info(
        "rm base %s -> %s; new weights: %s",
        source,
        type(model).__name__,
        ", ".join(sorted(info.get("missing_keys") or [])) or "none",
    )
    if mcfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lcfg = mcfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lcfg.r,
                lora_alpha=lcfg.alpha,
                lora_dropout=lcfg.dropout,
                target_modules=lcfg.target_modules,
                task_type="SEQ_CLS",
            ),
        )
    return model, tok


def save_classifier(
    model, tok, out_dir: Path, kind: str, template: str, max_length: int, source: str, state_dict: dict | None = None
) -> Path:
    """HF-loadable classifier (LoRA merged) + tokenizer + reward_model.json; `state_dict`: weights gathered
    from ZeRO-3 / FSDP shards (full-parameter models only)."""
    from grpo.modeling import is_peft

    model = model.merge_and_unload() if is_peft(model) else model  # training is over: merge in place
    name = "cost" if kind == "safety" else "reward"
    model.config.id2label, model.config.label2id = {0: name}, {name: 0}
    from grpo.checkpoint import atomic_folder

    with atomic_folder(out_dir) as tmp:  # replaces out_dir whole: no stale files from an earlier run's save
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tok.save_pretrained(tmp)
        write_meta(
            tmp,
            template=template,
            max_length=max_length,
            role=kind,
            score="cost (> 0 = unsafe)" if kind == "safety" else "reward",
            base=source,
            trained_by="grpo rm",
        )
    return out_dir


# ---------------------------------------------------------------------------------------- training
def train_one(kind: str, recipe: Recipe, out: Path) -> dict:
    """Train, evaluate and save one model; returns its results entry.

    Each model gets its own Accelerator: accelerate's DeepSpeed and FSDP integrations track one
    prepared model per Accelerator (its backward and gradient clipping pick the wrong one otherwise)."""
    accelerator = runtime.make_accelerator()
    cfg = recipe.rm
    train_spec, eval_spec = (
        (cfg.usefulness_train, cfg.usefulness_eval) if kind == "usefulness" else (cfg.safety_train, cfg.safety_eval)
    )
    rows = load_pairs(train_spec, f"rm.{kind}_train", kind)
    erows = load_pairs(eval_spec, f"rm.{kind}_eval", kind) if eval_spec else []
    source = cfg.base or recipe.model.name_or_path
    model, tok = load_classifier(recipe, source, recipe.run.seed)
    train_c, train_r = encode_pairs(tok, rows, cfg.template, cfg.max_length)
    eval_c, eval_r = encode_pairs(tok, erows, cfg.template, cfg.max_length) if erows else ([], [])
    scorer = RewardModelScorer(
        model, tok, template=cfg.template, max_length=cfg.max_length, batch_size=64, device=accelerator.device
    )
    evaluate_now = (lambda: evaluate(scorer, kind, erows, eval_c, eval_r)) if erows else dict

    optimizer = runtime.build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.optim)
    scheduler = runtime.build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.steps)
    # the scheduler stays unprepared: accelerate's wrapper steps it once per process per step
    zero_stage = runtime.configure_deepspeed(accelerator, cfg.batch_size, 1, cfg.max_grad_norm)
    split = runtime.sharded(accelerator, zero_stage)  # ZeRO-3 / FSDP: every rank evaluates, the save gathers
    if split and recipe.model.lora.enabled:
        raise UserError(
            "the rm stage with model.lora under ZeRO-3 / FSDP is not supported (the LoRA merge needs whole weights); "
            "train reward models with zero2.yaml or cpu_ddp.yaml/DDP, or set model.lora.enabled=false for the rm stage"
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    before = evaluate_now()  # after prepare: under ZeRO-3 the weights may already be partitioned at load
    is_main = accelerator.is_main_process
    tracker = Tracker(
        out / "logs" / kind,
        recipe.tracking,
        is_main=is_main,
        run_config={"stage": "rm", "model": kind},
        name=f"rm-{kind}",
    )
    tracker.log(0, {f"eval_{k}": v for k, v in before.items()})
    sampler = Sampler(len(rows), recipe.run.seed, accelerator.process_index, accelerator.num_processes)
    if is_main:
        log.info(
            "rm %s: %s | %d train / %d eval pairs | %d processes | %d steps x %d pairs | before: %s",
            kind,
            source,
            len(rows),
            len(erows),
            accelerator.num_processes,
            cfg.steps,
            cfg.batch_size * accelerator.num_processes,
            _short(before),
        )
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"rm {kind}", disable=not is_main, dynamic_ncols=True)
    for step in bar:
        idx = sampler.take(cfg.batch_size)
        sc, sr = pair_scores(
            model, [train_c[i] for i in idx], [train_r[i] for i in idx], tok.pad_token_id, accelerator.device
        )
        if kind == "usefulness":
            loss, metrics = bradley_terry_loss(sc, sr, cfg.margin)
        else:
            labels = [(rows[i]["chosen_is_safe"], rows[i]["rejected_is_safe"]) for i in idx]
            safe_c, safe_r = (torch.tensor(x, device=sc.device) for x in zip(*labels))
            loss, metrics = safety_cost_loss(sc, sr, safe_c, safe_r)
        accelerator.backward(loss)
        if cfg.max_grad_norm:
            metrics["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        metrics["lr"] = scheduler.get_last_lr()[0]
        if erows and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            metrics.update({f"eval_{k}": v for k, v in evaluate_now().items()})
        tracker.log(step + 1, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.3f}",
            acc=f"{metrics['accuracy']:.2f}",
            **({"eval": f"{metrics['eval_pair_accuracy']:.3f}"} if "eval_pair_accuracy" in metrics else {}),
        )
    seconds = time.perf_counter() - t0
    after = evaluate_now()
    accelerator.wait_for_everyone()
    path = out / kind
    weights = accelerator.get_state_dict(model) if split else None  # all ranks take part in the gather
    if is_main:
        save_classifier(accelerator.unwrap_model(model), tok, path, kind, cfg.template, cfg.max_length, source, weights)
        tracker.close(
            {f"rm_{kind}": ["loss", "accuracy", "sign_accuracy", "eval_pair_accuracy", "eval_sign_accuracy", "lr"]}
        )
        log.info("rm %s: %.1fs; after: %s; saved %s", kind, seconds, _short(after), path)
    accelerator.wait_for_everyone()
    return {
        "path": str(path),
        "base": source,
        "steps": cfg.steps,
        "train_pairs": len(rows),
        "eval_pairs": len(erows),
        "train_seconds": round(seconds, 2),
        "before": before,
        "after": after,
    }


def _short(m: dict) -> str:
    keys = (
        "pair_accuracy",
        "sign_accuracy",
        "harmful_prefers_compliance",
        "harmful_refusal_negative_cost",
        "harmful_compliance_positive_cost",
    )
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m) or "no eval data"


def run_rm(recipe: Recipe) -> dict:
    """Train the usefulness reward model and/or the safety cost model; returns the results dict."""
    cfg = recipe.rm
    rules.raise_first(rules.rm_inputs(cfg, KINDS))
    kinds = [k for k in KINDS if getattr(cfg, f"{k}_train")]
    runtime.setup(recipe.run.seed, recipe.run.threads)
    out = runtime.stage_dir(recipe.run.output_dir, "rm", overwrite=recipe.run.overwrite)
    accelerator = runtime.make_accelerator()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "config.yaml")
    results = {kind: train_one(kind, recipe, out) for kind in kinds}
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        runtime.mark_done(out)
    accelerator.wait_for_everyone()
    return results
