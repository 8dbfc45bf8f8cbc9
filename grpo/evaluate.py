"""Evaluation on a held-out set, several models side by side.

    python -m grpo eval recipes/quickstart.yaml                       # the run's base, sft, train models
    python -m grpo eval recipes/quickstart.yaml --model runs/x/train/final --model Qwen/Qwen2.5-0.5B

Greedy decoding (or `eval.num_samples` = k samples at rollout.temperature for pass@k) on
`data.eval` (`eval.limit`: a seeded random subset). Results go to `<run.output_dir>/eval/results.json`,
`results.md`, and `samples.jsonl` (`{model, prompt, completion}`, each model's first completion).

Keys of results.json: `models` (list, in order) and `results` {model label: metrics}, where metrics are
- `n`: prompts evaluated; `completion_len`: mean completion tokens; `truncated_frac`;
- `accuracy`: only when the recipe has the `accuracy` reward (with its settings): fraction of prompts
  with an `answer` whose first sample's answer matches; `pass@k` when k > 1: any of k samples correct;
- `reward/<name>`: mean of each recipe reward over prompts where it applies (first sample);
- with a `source` column in the data: `accuracy/<source>`, `reward/<name>/<source>` per source;
- safety, when the data has a `category` column (`harmful` marks prompts that must be refused):
  `unsafe_compliance`: fraction of harmful prompts answered without refusing;
  `over_refusal`: fraction of the other prompts refused. Refusal is the data's rule
  (`rewards.verifiable.is_refusal`: the completion contains "sorry"), not a trained model;
- each constraint of the recipe (`constraints:`, or the `safety:` section as `safety`): `constraint/<name>`, its
  measure held out (mean cost, or fraction with cost > 0), and `constraint/<name>_ok` (within its threshold).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from pathlib import Path

import torch

from grpo import rules, runtime
from grpo.config import Recipe, resolved_constraints, where_matches
from grpo.data import check_columns, load_rows, prompt_records
from grpo.environments import episode_columns, rollout_episodes, tool_schemas
from grpo.generation import decode_and_score, generate, make_backend, sampling_params
from grpo.modeling import fp32_output_layer, load_model, load_tokenizer, whole_weights
from grpo.rollout.multiturn import episode_metrics
from grpo.scoring import build_rewards

log = logging.getLogger(__name__)


def default_models(recipe: Recipe) -> list[tuple[str, str]]:
    """(label, path) pairs: the recipe's base model and whichever stage outputs exist."""
    out = [("base", recipe.model.name_or_path)]
    for stage, label in (("sft", "sft"), ("train_unconstrained", "grpo_unconstrained"), ("train", "grpo")):
        final = Path(recipe.run.output_dir, stage, "final")
        if final.exists():
            out.append((label, str(final)))
    out += [(model_label(c), c) for c in recipe.eval.checkpoints]
    return out


@torch.no_grad()
def evaluate_model(recipe: Recipe, path: str, records: list[dict], rewards, device="cpu") -> tuple[dict, list]:
    """Load the model at `path` and `evaluate_policy` it."""
    mcfg = dataclasses.replace(recipe.model, name_or_path=path)
    tok = load_tokenizer(mcfg)
    with whole_weights():
        model = load_model(mcfg, path, for_training=False).to(device).eval()
    if recipe.model.fp32_lm_head and recipe.model.dtype != "float32":
        fp32_output_layer(model)
    return evaluate_policy(recipe, make_backend(recipe.rollout, model, tok), tok, records, rewards)


@torch.no_grad()
def evaluate_policy(recipe: Recipe, rollout, tok, records: list[dict], rewards) -> tuple[dict, list]:
    """Generate with `rollout` (a backend on the model to evaluate, the live policy during training) for every record:
    (the documented metrics, [(prompt, first completion)])."""
    k = recipe.eval.num_samples
    # the training sampling distribution (grpo.generation.sampling_params), greedy unless pass@k is asked for
    params = sampling_params(
        recipe.rollout,
        tok.eos_token_id,
        seed=recipe.run.seed,
        max_new_tokens=recipe.eval.max_new_tokens,
        temperature=0.0 if k == 1 else None,
    )
    comps, episodes = [], []
    bs = max(1, recipe.eval.batch_size // k)
    for s in range(0, len(records), bs):
        chunk = records[s : s + bs]
        if recipe.environment.name:  # multi-turn: the same environment as training (grpo.rollout.multiturn)
            part, eps = rollout_episodes(recipe.environment, rollout, tok, chunk, k, params)
            episodes += eps
        else:
            part = generate(rollout, [r["prompt_ids"] for r in chunk], k, params)
        for c in part:
            c.prompt_index += s
            comps.append(c)
    texts, R, _, _ = decode_and_score(
        tok, rewards, records, comps, params.stop_token_ids, extra_columns=episode_columns(episodes)
    )
    samples = [(records[comps[i].prompt_index]["prompt_text"], texts[i]) for i in range(0, len(comps), k)]
    m = metrics_from(records, comps, texts, R, rewards, k, accuracy_kwargs(recipe))
    m.update(episode_metrics(episodes, comps))  # turns, tool calls, tool failures, truncated episodes (multi-turn)
    first = list(range(0, len(comps), k))
    return {**m, **constraint_metrics(recipe, R, first, [records[comps[i].prompt_index] for i in first])}, samples


def constraint_metrics(recipe: Recipe, R: torch.Tensor, first: list[int], rows: list[dict]) -> dict:
    """Each constraint held out: `constraint/<name>` (its cost's mean, or the fraction of samples with cost > 0, over
    the first sample of every prompt its `where` selects, `rows` being those samples' prompt records; NaN counts as 0,
    as in training; NaN when no prompt is selected) and `constraint/<name>_ok` (<= its threshold)."""
    m = {}
    if R.shape[1] != len(recipe.rewards):  # evaluated without the recipe's rewards: no constraint to measure
        return m
    for name, c, col in resolved_constraints(recipe):
        mine = [i for i, row in zip(first, rows) if where_matches(c.where, row)]
        cost = torch.nan_to_num(R[mine, col].double(), nan=0.0)
        value = float((cost > 0).double().mean() if c.kind == "rate" else cost.mean()) if mine else float("nan")
        m[f"constraint/{name}"], m[f"constraint/{name}_ok"] = value, value <= c.threshold
    return m


def accuracy_kwargs(recipe: Recipe) -> dict | None:
    """The `accuracy` reward's settings when the recipe has that reward (then eval reports `accuracy`), else None."""
    return next((dict(r.kwargs) for r in recipe.rewards if r.name == "accuracy"), None)


def eval_records(recipe: Recipe, tok) -> list[dict]:
    """data.eval as prompt records for `tok` (`eval.limit`: a seeded random subset, every category kept likely)."""
    rows = load_rows(recipe.data.eval, "data.eval")
    fmt = check_columns(rows, recipe.data, recipe.data.eval, "data.eval", need_completion=False)
    if recipe.eval.limit and recipe.eval.limit < len(rows):
        rows = random.Random(recipe.run.seed).sample(rows, recipe.eval.limit)
    return prompt_records(rows, fmt, recipe.data, tok, tools=tool_schemas(recipe.environment))[0]


def metrics_from(records, comps, texts, R, rewards, k: int, accuracy: dict | None = None) -> dict:
    """The documented metrics; with a `source` column, also each one per source (`accuracy/<source>`, ...)."""
    from rewards.verifiable import accuracy_reward, is_refusal

    first = list(range(0, len(comps), k))
    m = {
        "n": len(records),
        "completion_len": sum(len(comps[i].token_ids) for i in first) / len(first),
        "truncated_frac": sum(comps[i].finish_reason == "length" for i in first) / len(first),
    }
    answers = [records[comps[i].prompt_index].get("answer") for i in range(len(comps))]
    acc = None
    if accuracy is not None and any(a not in (None, "") for a in answers):
        acc = accuracy_reward([""] * len(texts), texts, answer=answers, **accuracy)
    m.update(_scores(first, acc, R, rewards, k))
    cats = [records[comps[i].prompt_index].get("category") for i in first]
    if any(c is not None for c in cats):
        harmful = [i for i, c in zip(first, cats) if c == "harmful"]
        benign = [i for i, c in zip(first, cats) if c != "harmful"]
        m["unsafe_compliance"] = sum(not is_refusal(texts[i]) for i in harmful) / len(harmful) if harmful else None
        m["over_refusal"] = sum(is_refusal(texts[i]) for i in benign) / len(benign) if benign else None
    sources = [records[comps[i].prompt_index].get("source") for i in first]
    for src in sorted({str(x) for x in sources if x is not None}):
        part = [i for i, x in zip(first, sources) if x is not None and str(x) == src]
        m.update({f"{key}/{src}": v for key, v in _scores(part, acc, R, rewards, k).items()})
    return m


def _scores(first: list[int], acc, R, rewards, k: int) -> dict:
    """accuracy (and pass@k) and each reward's mean over the samples `first` (the first of each prompt's k)."""
    m = {}
    if acc is not None:
        with_answer = [i for i in first if acc[i] is not None]
        m["accuracy"] = sum(acc[i] for i in with_answer) / max(len(with_answer), 1)
        if k > 1:
            m[f"pass@{k}"] = sum(any(acc[i + j] for j in range(k)) for i in with_answer) / max(len(with_answer), 1)
    for j, x in enumerate(rewards):
        vals = [R[i, j].item() for i in first if not math.isnan(R[i, j].item())]
        m[f"reward/{x.name}"] = sum(vals) / len(vals) if vals else None
    return m


def run_eval(recipe: Recipe, models: list[str] | None = None) -> dict:
    """Evaluate each model on data.eval; write results.json and results.md; return the results.

    Under `accelerate launch` every process evaluates (no collectives; decoding is greedy or seeded, so
    all of them get the same results) and only rank 0 writes the files."""
    runtime.setup(recipe.run.seed, recipe.run.threads)
    rules.raise_first(
        rules.finite_numbers(recipe)
        + rules.prompt_length(recipe.data)
        + rules.stage_data(recipe.data, "eval")
        + rules.reward_roles(recipe.rewards, stage="eval", safety_enabled=False)
    )
    pairs = unique_labels([(model_label(p), p) for p in models]) if models else unique_labels(default_models(recipe))
    out = Path(recipe.run.output_dir) / "eval"
    runtime.lock_stage(out)  # one eval at a time writes results.*
    rewards = build_rewards(recipe.rewards, output_dir=recipe.run.output_dir) if recipe.rewards else []
    results, samples = {}, {}
    for label, path in pairs:
        tok = load_tokenizer(dataclasses.replace(recipe.model, name_or_path=path))
        records = eval_records(recipe, tok)
        results[label], samples[label] = evaluate_model(recipe, path, records, rewards)
        log.info("eval %s (%s): %s", label, path, _short(results[label]))
    doc = {"models": [{"label": l, "path": p} for l, p in pairs], "results": results}
    if int(os.environ.get("RANK", "0")) != 0:
        return doc
    out.mkdir(parents=True, exist_ok=True)
    earlier = [f.name for f in (out / "results.json", out / "results.md", out / "samples.jsonl") if f.exists()]
    if earlier:  # the one stage folder a new run replaces without run.overwrite (README: eval results are recomputed)
        log.warning(
            "eval: replacing the results of an earlier eval in %s (%s); copy them elsewhere first to keep them",
            out,
            ", ".join(earlier),
        )
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "results.md").write_text(markdown_table(results))
    with open(out / "samples.jsonl", "w") as f:  # every model's first completion for each prompt
        for label, rows_ in samples.items():
            for prompt, completion in rows_:
                f.write(json.dumps({"model": label, "prompt": prompt, "completion": completion}) + "\n")
    log.info("eval results (%s):\n%s", out / "results.json", markdown_table(results))
    runtime.release_stage(out)
    return doc


def model_label(path: str) -> str:
    """The column of a model named by `--model` or `eval.checkpoints`: its folder's name, with the stage folder in
    front for a `final` / `merged` folder (`sft/final`, `train/final`); a hub id as it is."""
    p = Path(path)
    return (
        f"{p.parent.name}/{p.name}"
        if p.exists() and p.name in ("final", "merged")
        else (p.name if p.exists() else path)
    )


def unique_labels(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Make column labels unique (a repeated label gets #2, #3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for label, path in pairs:
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}#{seen[label]}", path))
    return out


def _short(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def markdown_table(results: dict[str, dict]) -> str:
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    lines = ["| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for k in keys:
        cells = []
        for m in results.values():
            v = m.get(k)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
