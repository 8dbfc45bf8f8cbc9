"""`report.md` for a run: what the stages wrote, as one page of numbers, curves and sample completions.

    python -m grpo.report runs/quickstart        # (re)build runs/quickstart/report.md

`write_report(run_dir)` reads whatever exists under `run_dir` and skips what does not:
- `sft/metrics.jsonl` (loss, eval_loss, lr per step),
- `rm/results.json` and `rm/logs/<model>/metrics.jsonl` (reward / cost models, before and after),
- `train/metrics.jsonl` (reward, one key per reward name with `<name>_none_frac` beside it, kl, cost,
  unsafe_rate, per constraint `lambda/<name>` and `constraint/<name>` (drawn against the thresholds of
  `train/config.yaml`), completion_len, clip_frac, tokens_per_s, time_* ...), `train/samples.jsonl` (rows `{step,
  prompt,
  completion, <reward names>..., advantage}`), `train/config.yaml`,
- `eval/results.json` (`grpo.evaluate`: `models` [{label, path}] and `results` {label: metrics}), and
  `eval/samples.jsonl` if present (rows `{model, prompt, completion, ...}`: the same held-out prompts
  answered by each model).
It writes `report.md` and its figures `report_*.png` (at most 4 panels each; stale ones are removed) next
to it. Sample completions: the same prompt at the first and the last step it was logged, when the
sample table holds a prompt twice; otherwise the first and the last logged step. Lines that are not
valid JSON (a run killed mid-write) are skipped. Only call it from one process.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from grpo.config import reward_label
from grpo.tracking import plot_curves

log = logging.getLogger(__name__)

MAX_PANELS = 4
MAX_TEXT = 400  # characters of a prompt / completion shown
EVAL_NOTES = {
    "accuracy": "fraction of prompts with an answer whose tagged answer is right (higher is better)",
    "unsafe_compliance": "fraction of harmful prompts answered instead of refused (lower is better)",
    "over_refusal": "fraction of benign prompts refused (lower is better)",
    "completion_len": "mean completion length in tokens",
    "truncated_frac": "fraction of completions cut at max_new_tokens",
}
TRAIN_PANELS = ["kl", "cost", "unsafe_rate", "completion_len", ("clip_frac", "clip_frac_low", "clip_frac_high")]
SPEED_PANELS = ["tokens_per_s", ("time_rollout", "time_score", "time_logprobs", "time_train")]
PANEL_TITLES = {
    "clip_frac": "fraction of tokens with a clipped ratio",
    "time_rollout": "seconds per step, by phase",
    "lambda": "Lagrange multiplier λ (safety)",
    "unsafe_rate": "fraction of completions with cost > 0",
}


# ------------------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] if missing); unparsable lines are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        log.warning("report: cannot read %s, skipping it", path)
        return None


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def reward_names(history: list[dict]) -> list[str]:
    """Reward columns of a GRPO history: keys `k` logged with a `k_none_frac` beside them."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    return [k for k in keys if f"{k}_none_frac" in keys]


# ------------------------------------------------------------------------------------- the report
def write_report(run_dir: Path) -> Path:
    """Build `<run_dir>/report.md` (and `report_*.png`) from the stage outputs; returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("report_*.png"):
        old.unlink()
    sft = read_jsonl(run_dir / "sft" / "metrics.jsonl")
    train = read_jsonl(run_dir / "train" / "metrics.jsonl")
    samples = read_jsonl(run_dir / "train" / "samples.jsonl")
    evals = read_json(run_dir / "eval" / "results.json")
    rm = read_json(run_dir / "rm" / "results.json")

    parts = [
        f"# Run report: `{run_dir.name}`\n",
        f"Built by `python -m grpo.report {run_dir}` from the files under `{run_dir}`.\n",
    ]
    train_cfg = read_yaml(run_dir / "train" / "config.yaml")
    parts += summary(sft, train, evals, rm, train_cfg)
    if evals:
        parts += eval_section(evals, read_jsonl(run_dir / "eval" / "samples.jsonl"))
    if sft:
        parts += ["## SFT\n", *figures(run_dir, "sft", sft, [("loss", "eval_loss"), "lr"], "SFT")]
    if rm or (run_dir / "rm" / "logs").is_dir():
        parts += rm_section(run_dir, rm)
    if train:
        parts += train_section(run_dir, train, train_cfg)
    if samples:
        parts += samples_section(samples)
    if not (sft or train or evals or rm):
        parts.append(
            "Nothing to report yet: no stage has written its outputs (sft/, rm/, train/, eval/) in this folder.\n"
        )
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def summary(sft: list[dict], train: list[dict], evals: dict | None, rm: dict | None, train_cfg: dict) -> list[str]:
    lines = []
    if sft:
        lines.append(
            f"- **SFT**: {len(sft)} steps; training loss {_span(sft, 'loss')}"
            + (f"; held-out loss {_first_last(sft, 'eval_loss')}" if _values(sft, "eval_loss") else "")
        )
    if rm:
        for kind, res in rm.items():
            acc = (res.get("before") or {}).get("pair_accuracy"), (res.get("after") or {}).get("pair_accuracy")
            if None not in acc:
                lines.append(f"- **{kind} model**: held-out pair accuracy {_fmt(acc[0])} → {_fmt(acc[1])}")
    if train:
        g = train_cfg.get("grpo") or {}
        setup = ", ".join(
            f"{k} {g[k]}" for k in ("prompts_per_step", "num_generations", "lr", "beta", "loss_type") if k in g
        )
        spans = [f"{k} {_span(train, k)}" for k in ["reward", *reward_names(train)] if _values(train, k)]
        cons = constraint_lines(train, train_cfg)  # each multiplier there; an older run's lambda here
        others = [
            f"{k} {_span(train, k)}"
            for k in ("kl", "lambda", "cost", "completion_len")
            if _values(train, k) and not (cons and k == "lambda")
        ]
        lines.append(f"- **GRPO**: {len(train)} steps{' (' + setup + ')' if setup else ''}")
        lines += [f"  - {'; '.join(x)}" for x in (spans, others) if x]
        lines += cons
    if evals and evals.get("results"):
        res = evals["results"]
        for key in ("accuracy", "unsafe_compliance", "over_refusal"):
            if any(m.get(key) is not None for m in res.values()):
                lines.append(f"- **eval {key}**: " + ", ".join(f"{name} {_fmt(m.get(key))}" for name, m in res.items()))
    if not lines:
        return []
    return [
        "## Summary\n",
        "First → last values; for per-step training metrics, means over the first and the last tenth of the steps.\n",
        "\n".join(lines) + "\n",
    ]


def eval_section(evals: dict, samples: list[dict]) -> list[str]:
    results = evals.get("results") or {}
    if not results:
        return []
    out = ["## Evaluation (held-out prompts)\n", eval_table(results)]
    models = evals.get("models") or []
    if models:
        out.append("Models: " + "; ".join(f"**{m.get('label')}** = `{m.get('path')}`" for m in models) + ".\n")
    notes = [f"`{k}`: {v}" for k, v in EVAL_NOTES.items() if any(k in m for m in results.values())]
    if any(k.startswith("constraint/") for m in results.values() for k in m):
        notes.append(
            "`constraint/<name>`: each constraint's measure on these prompts (its cost's mean, or the fraction "
            "with cost > 0); `constraint/<name>_ok`: within its threshold"
        )
    if notes:
        out.append("\n".join(f"- {n}" for n in notes) + "\n")
    if samples:
        out += eval_samples(samples)
    return out


def eval_table(results: dict[str, dict]) -> str:
    """Metrics as rows, models as columns, plus the change grpo − sft (or last − first model)."""
    names = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    delta = len(names) >= 2
    a_name, b_name = ("sft", "grpo") if {"sft", "grpo"} <= set(names) else (names[0], names[-1])
    head = ["metric", *names] + ([f"Δ {b_name} − {a_name}"] if delta else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for k in keys:
        vals = [results[n].get(k) for n in names]
        cells = [_fmt(v) for v in vals]
        if delta:
            a, b = results[a_name].get(k), results[b_name].get(k)
            cells.append(f"{b - a:+.3f}" if _is_num(a) and _is_num(b) and k != "n" else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def eval_samples(samples: list[dict], max_prompts: int = 4) -> list[str]:
    by_prompt: dict[str, dict[str, str]] = defaultdict(dict)
    for r in samples:
        if "prompt" in r and "completion" in r:
            by_prompt[str(r["prompt"])].setdefault(str(r.get("model", "?")), str(r["completion"]))
    out = ["### Held-out completions, model by model\n"]
    for prompt, answers in list(by_prompt.items())[:max_prompts]:
        out.append(_block(prompt))
        out += [f"{model}:\n\n{_block(text)}" for model, text in answers.items()]
    return out if len(out) > 1 else []


def rm_section(run_dir: Path, rm: dict | None) -> list[str]:
    out = ["## Reward and cost models\n"]
    for kind, res in (rm or {}).items():
        before, after = res.get("before") or {}, res.get("after") or {}
        keys = [k for k in dict.fromkeys([*before, *after]) if _is_num(before.get(k)) or _is_num(after.get(k))]
        if keys:
            out.append(f"**{kind}** ({res.get('steps', '?')} steps, {res.get('train_pairs', '?')} training pairs)\n")
            out.append(
                "| metric | before | after |\n|---|---|---|\n"
                + "\n".join(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} |" for k in keys)
                + "\n"
            )
    merged: dict[int, dict] = defaultdict(dict)
    panels, titles = [], {}
    for logs in sorted((run_dir / "rm" / "logs").glob("*/metrics.jsonl")):
        kind = logs.parent.name
        for row in read_jsonl(logs):
            if "step" in row:
                merged[row["step"]].update({f"{kind}/{k}": v for k, v in row.items() if k != "step"})
        panels += [f"{kind}/loss", (f"{kind}/accuracy", f"{kind}/eval_pair_accuracy")]
        titles.update(
            {f"{kind}/loss": f"{kind}: training loss", f"{kind}/accuracy": f"{kind}: pair accuracy (train / held-out)"}
        )
    history = [{"step": s, **v} for s, v in sorted(merged.items())]
    out += figures(run_dir, "rm", history, panels, "reward / cost models", titles)
    return out if len(out) > 1 else []


def constraints_of(cfg: dict) -> list[dict]:
    """{name, kind, threshold, lambda_max, where} of each constraint in a saved train/config.yaml (`constraints:`, or
    the old `safety:` section as one constraint named safety)."""
    out = []
    for c in cfg.get("constraints") or []:
        if isinstance(c, dict) and c.get("reward"):
            out.append(
                {
                    "name": c.get("name") or reward_label(str(c["reward"])),
                    "kind": c.get("kind", "mean"),
                    "threshold": c.get("threshold", 0.0),
                    "lambda_max": c.get("lambda_max", 20.0),
                    "where": c.get("where") if isinstance(c.get("where"), dict) else None,
                }
            )
    safety = cfg.get("safety") or {}
    if not out and safety.get("enabled"):
        out.append(
            {
                "name": "safety",
                "kind": "rate" if safety.get("constrain") == "violation_rate" else "mean",
                "threshold": safety.get("cost_threshold", 0.0),
                "lambda_max": safety.get("lambda_max", 20.0),
            }
        )
    return out


def constraint_lines(train: list[dict], cfg: dict) -> list[str]:
    """Per constraint: measured first → last against the threshold, lambda first → last, steps with lambda at its
    cap."""
    lines = []
    for c in constraints_of(cfg):
        lam = _values(train, f"lambda/{c['name']}") or _values(train, "lambda")
        if not lam:
            continue
        capped = sum(v >= c["lambda_max"] * (1 - 1e-9) for v in lam) if _is_num(c["lambda_max"]) else 0
        measured = f"constraint/{c['name']}"
        lines.append(
            f"  - constraint **{c['name']}** ({'P(cost > 0)' if c['kind'] == 'rate' else 'mean cost'}{_over(c)} <= "
            f"{_fmt(c['threshold'])}): "
            + (f"measured {_span(train, measured)}; " if _values(train, measured) else "")
            + f"λ {_fmt(lam[0])} → {_fmt(lam[-1])}, at its cap {_fmt(c['lambda_max'])} in {capped} of {len(lam)} steps"
        )
    return lines


def _over(c: dict) -> str:
    """' over category=harmful' for a constraint measured on the prompts its `where` selects, else ''."""
    return " over " + ", ".join(f"{k}={v}" for k, v in c["where"].items()) if c.get("where") else ""


def constraint_figures(run_dir: Path, train: list[dict], cfg: dict) -> list[str]:
    """Two panels per constraint: its measure against the threshold, its multiplier against lambda_max (each on its
    own scale: a length budget's lambda may be 1000x smaller than a safety one)."""
    cons = [c for c in constraints_of(cfg) if _values(train, f"constraint/{c['name']}")]
    panels = [key for c in cons for key in (f"constraint/{c['name']}", f"lambda/{c['name']}")]
    titles, hlines = {}, {}
    for c in cons:
        measure = "fraction with cost > 0" if c["kind"] == "rate" else "mean cost"
        titles.update(
            {f"constraint/{c['name']}": f"{c['name']}: {measure}{_over(c)}", f"lambda/{c['name']}": f"{c['name']}: λ"}
        )
        if _is_num(c["threshold"]):
            hlines[f"constraint/{c['name']}"] = (float(c["threshold"]), "threshold")
        if _is_num(c["lambda_max"]):
            hlines[f"lambda/{c['name']}"] = (float(c["lambda_max"]), "lambda_max")
    return figures(run_dir, "constraints", train, panels, "GRPO constraints", titles, hlines) if cons else []


def train_section(run_dir: Path, train: list[dict], cfg: dict) -> list[str]:
    names = reward_names(train)
    safety = cfg.get("safety") or {}
    threshold = safety.get("cost_threshold")
    bounded = (
        "unsafe_rate" if safety.get("constrain") == "violation_rate" else "cost"
    )  # what the old safety section bounds
    hlines = (
        {bounded: (float(threshold), "constraint threshold")} if _is_num(threshold) and safety.get("enabled") else None
    )
    panels = (
        TRAIN_PANELS if any("lambda/" in k for row in train[:1] for k in row) else ["lambda", *TRAIN_PANELS]
    )  # older runs
    titles = {n: f"reward: {n}" for n in names}
    out = [
        "## GRPO training\n",
        "Faint lines are per-step values, bold lines their moving average over ~1/10 of the steps. "
        "Rewards are means over the step's completions (where the reward applies).\n",
    ]
    out += figures(run_dir, "rewards", train, ["reward", *names], "GRPO rewards", titles)
    held_out = [
        k
        for k in dict.fromkeys(k for r in train for k in r)
        if k.startswith("eval/") and k.count("/") <= 2 and k not in ("eval/truncated_frac", "eval/completion_len")
    ]  # grpo.eval_every: held-out eval on the live policy
    out += figures(run_dir, "eval_during_training", train, held_out, "held-out eval during training (grpo.eval_every)")
    out += figures(run_dir, "training", train, panels, "GRPO policy and costs", PANEL_TITLES, hlines)
    out += constraint_figures(run_dir, train, cfg)
    out += figures(run_dir, "speed", train, SPEED_PANELS, "GRPO speed", PANEL_TITLES)
    times = {
        k: _mean(_values(train, k)) for k in ("time_rollout", "time_score", "time_logprobs", "time_train", "time_step")
    }
    if times["time_step"]:
        share = ", ".join(
            f"{k[5:]} {100 * v / times['time_step']:.0f}%"
            for k, v in times.items()
            if k != "time_step" and v is not None
        )
        out.append(f"Mean step time {times['time_step']:.2f} s ({share}).\n")
    return out


def figures(
    run_dir: Path,
    stem: str,
    history: list[dict],
    panels: list,
    title: str,
    titles: dict | None = None,
    hlines: dict | None = None,
) -> list[str]:
    """Draw the present panels, at most MAX_PANELS per PNG; returns the markdown image lines."""
    present = [p for p in panels if any(_values(history, k) for k in ((p,) if isinstance(p, str) else p))]
    n_figs = math.ceil(len(present) / MAX_PANELS)
    out = []
    for i in range(n_figs):  # balanced: 5 panels -> 3 + 2, not 4 + 1
        chunk = present[i * len(present) // n_figs : (i + 1) * len(present) // n_figs]
        png = plot_curves(
            history,
            chunk,
            run_dir / f"report_{stem}{'' if i == 0 else f'_{i + 1}'}.png",
            title=title if n_figs == 1 else f"{title} ({i + 1}/{n_figs})",
            titles=titles,
            hlines=hlines,
        )
        if png:
            out.append(f"![{title}]({png.name})\n")
    return out


# ------------------------------------------------------------------------------------- samples
def samples_section(samples: list[dict], max_prompts: int = 3, per_side: int = 3) -> list[str]:
    """The same prompts early vs late when the table has them, else the first vs the last logged step."""
    rows = [r for r in samples if "step" in r and "completion" in r]
    if not rows:
        return []
    steps: dict[str, set] = defaultdict(set)
    for r in rows:
        steps[str(r.get("prompt"))].add(r["step"])
    repeated = sorted((p for p, s in steps.items() if len(s) > 1), key=lambda p: min(steps[p]) - max(steps[p]))[
        :max_prompts
    ]
    out = ["## Sample completions\n"]
    if repeated:
        out.append("The same prompts at the first and the last step they were sampled (from `train/samples.jsonl`).\n")
        for prompt in repeated:
            early, late = min(steps[prompt]), max(steps[prompt])
            pick = [r for r in rows if str(r.get("prompt")) == prompt]
            out.append(f"### Prompt (steps {early} → {late})\n\n{_block(prompt)}")
            out += _completions(f"step {early}", [r for r in pick if r["step"] == early], per_side)
            out += _completions(f"step {late}", [r for r in pick if r["step"] == late], per_side)
        return out
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    out.append(
        f"No prompt was sampled twice, so these are the first ({first}) and the last ({last}) logged steps "
        "(from `train/samples.jsonl`).\n"
        if first != last
        else f"Only step {first} was logged.\n"
    )
    for step in dict.fromkeys([first, last]):
        by_prompt: dict[str, list] = defaultdict(list)
        for r in rows:
            if r["step"] == step:
                by_prompt[str(r.get("prompt"))].append(r)
        out.append(f"### Step {step}\n")
        for prompt, group in list(by_prompt.items())[:max_prompts]:
            out.append(_block(prompt))
            out += _completions(f"step {step}", group, per_side)
    return out


def _completions(title: str, rows: list[dict], per_side: int) -> list[str]:
    """Distinct completions with how often they were sampled, their rewards and advantage."""
    counts = Counter(str(r.get("completion")) for r in rows)
    first_row = {}
    for r in rows:
        first_row.setdefault(str(r.get("completion")), r)
    out = []
    for text, n in counts.most_common(per_side):
        r = first_row[text]
        scores = ", ".join(
            f"{k} {_fmt(v)}"
            for k, v in r.items()
            if k not in ("step", "prompt", "completion") and (v is None or _is_num(v))
        )
        out.append(f"{title}{f' (×{n} of {len(rows)})' if len(rows) > 1 else ''}: {scores}\n\n{_block(text)}")
    if len(counts) > per_side:
        out.append(f"... and {len(counts) - per_side} other distinct completions.\n")
    return out


# ------------------------------------------------------------------------------------- formatting
def _values(history: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in history if _is_num(r.get(key))]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def _span(history: list[dict], key: str) -> str:
    """Mean of the first and the last tenth of the logged values: `0.31 → 0.87`."""
    vals = _values(history, key)
    if not vals:
        return "-"
    k = max(1, len(vals) // 10)
    return f"{_fmt(_mean(vals[:k]))} → {_fmt(_mean(vals[-k:]))}"


def _first_last(history: list[dict], key: str) -> str:
    vals = _values(history, key)
    return f"{_fmt(vals[0])} → {_fmt(vals[-1])}" if vals else "-"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _block(text: str) -> str:
    """A fenced code block that no backticks inside `text` can close; long text keeps its start and end."""
    text = str(text)
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT // 2] + f"\n[... {len(text) - MAX_TEXT} characters ...]\n" + text[-MAX_TEXT // 2 :]
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m grpo.report", description="Write <run_dir>/report.md from a run's stage outputs."
    )
    p.add_argument("run_dir", help="the run's output_dir, e.g. runs/quickstart")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"error: {args.run_dir} is not a folder (give a run's output_dir, e.g. runs/quickstart)", file=sys.stderr)
        return 2
    print(write_report(Path(args.run_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
