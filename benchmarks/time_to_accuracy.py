"""Time to accuracy: our GRPO vs TRL's GRPOTrainer from the same SFT checkpoint (issue #14).

    python benchmarks/time_to_accuracy.py                         # builds the quickstart SFT model, 1 seed, <= 300
    steps each
    python benchmarks/time_to_accuracy.py --sft runs/quickstart/sft/final --seeds 0 1 --json out.json
    python benchmarks/time_to_accuracy.py --quick                 # 4 steps, eval every 2: a smoke run of a minute or
    two

Needs trl (`pip install -e .[bench]`). Both trainers start from one SFT checkpoint (by default built once with
`python -m grpo sft recipes/quickstart.yaml`: the toy world's tiny model, ~20% held-out accuracy) and train on the
addition prompts of `data/toyworld/grpo_train.jsonl` with the same settings: `--prompts` prompts x `--G`
completions per optimizer step in one micro-batch, `--new-tokens` max new tokens (stop at eos), temperature 1,
top-p 1, top-k 0, AdamW lr `--lr` (constant, clip 1.0), the `grpo` loss, beta 0 (no reference), group-scaled
advantages, one pass per batch (`vs_trl.trl_config` / `vs_trl.our_recipe`), and the same two verifiable
rewards, `rewards.verifiable.accuracy_reward` (weight 1) and `format_reward` (weight 0.1): no reward models,
no safety constraint. Ours runs `grpo.trainer.run_grpo` (the `engine` rollout, shared-prefix training pass);
TRL runs `GRPOTrainer.train` (transformers `generate`). One process each, `--threads` torch threads, fp32, on the
CPU or (`--device cuda`) both on the GPU.

Every `--eval-every` optimizer steps (and before the first) both are evaluated by the same code, `greedy_accuracy`:
greedy decoding of the 200 held-out addition prompts of `data/toyworld/eval.jsonl` with transformers `generate`
(grpo's `hf` backend) on the live policy, scored by `accuracy_reward`. The training clock stops during the
evaluation: "train s" is wall time from the first step's start to the end of the step evaluated, evaluation
excluded (setup, i.e. model loading and trainer construction, is reported apart). "cpu s" is the process CPU time
over the same span (all threads), less sensitive to other jobs taking the cores. A run stops at the first
evaluation reaching `--stop-at` (default: the highest target) or after `--steps` steps.

The two samplers draw prompts in different orders, so the step at which a target is reached varies with the
seed on either side: report several seeds. Each run is its own subprocess, run one after the other, ours first
for even seeds and TRL first for odd ones (other jobs on a shared machine slow whichever runs beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNERS = ("ours", "trl")
REWARDS = [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.1}]


# ------------------------------------------------------------------------------------- evaluation (both runners)
def eval_records(tok, path: Path) -> list[dict]:
    """The held-out addition prompts (rows with an answer), tokenized as both trainers tokenize prompts."""
    rows = [r for r in read_jsonl(path) if r.get("category", "math") == "math" and r.get("answer")]
    return [{**r, "prompt_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"]} for r in rows]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def greedy_accuracy(model, tok, records: list[dict], max_new_tokens: int) -> float:
    """Fraction of `records` whose greedy completion's tagged answer is right (the same code for both trainers)."""
    from grpo.rollout import SamplingParams, make_rollout
    from rewards.verifiable import accuracy_reward

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    comps = make_rollout("hf", model, tok).generate([r["prompt_ids"] for r in records], 1, params)
    texts = [tok.decode([t for t in c.token_ids if t != tok.eos_token_id], skip_special_tokens=False) for c in comps]
    scores = accuracy_reward([r["prompt"] for r in records], texts, answer=[r["answer"] for r in records])
    return sum(scores) / len(scores)


class Clock:
    """Training time with the evaluations cut out; evaluates every `every` steps and says when to stop."""

    def __init__(self, records: list[dict], a):
        self.records, self.a = records, a
        self.curve: list[dict] = []  # {step, train_s, cpu_s, accuracy}
        self.step_ends: list[float] = []  # training seconds at the end of each step
        self.t0 = self.c0 = None
        self.paused = self.cpu_paused = 0.0
        self.created = time.perf_counter()

    def start(self, model, tok) -> None:
        """Before the first step: evaluate the starting model, then start the clock."""
        self.setup_s = time.perf_counter() - self.created
        self.curve.append(
            {
                "step": 0,
                "train_s": 0.0,
                "cpu_s": 0.0,
                "accuracy": greedy_accuracy(model, tok, self.records, self.a.new_tokens),
            }
        )
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def step_end(self, step: int, model, tok) -> bool:
        """After optimizer step `step` (1-based): True when the run should stop."""
        now, cpu = time.perf_counter(), time.process_time()
        train_s, cpu_s = now - self.t0 - self.paused, cpu - self.c0 - self.cpu_paused
        self.step_ends.append(train_s)
        stop = False
        if step % self.a.eval_every == 0 or step >= self.a.steps:
            acc = greedy_accuracy(model, tok, self.records, self.a.new_tokens)
            self.curve.append({"step": step, "train_s": train_s, "cpu_s": cpu_s, "accuracy": acc})
            stop = self.a.stop_at is not None and acc >= self.a.stop_at
        self.paused += time.perf_counter() - now
        self.cpu_paused += time.process_time() - cpu
        return stop

    def result(self) -> dict:
        per_step = [b - a for a, b in zip([0.0, *self.step_ends], self.step_ends)]
        return {
            "curve": self.curve,
            "setup_s": self.setup_s,
            "steps_run": len(self.step_ends),
            "median_step_s": statistics.median(per_step) if per_step else float("nan"),
        }


# ------------------------------------------------------------------------------------- runners (children)
class _Reached(Exception):
    """Raised from our loop's per-step hook to end the run at the target (the run's final save is skipped)."""


def run_ours(a, clock: Clock) -> None:
    import yaml
    from vs_trl import our_recipe

    import grpo.train_state
    import grpo.trainer
    from grpo.config import load_recipe

    out = Path(a.work) / f"ours_seed{a.seed}"
    recipe = our_recipe(
        out,
        a.sft,
        a.train,
        REWARDS,
        prompts=a.prompts,
        G=a.G,
        new_tokens=a.new_tokens,
        lr=a.lr,
        beta=0.0,
        loss_type=a.loss_type,
        steps=a.steps,
        threads=a.threads,
        max_prompt_length=24,
        seed=a.seed,
    )
    recipe["tracking"]["log_every"] = (
        10**9
    )  # no console line per step (metrics.jsonl is still written, as in a real run)
    path = Path(a.work) / f"recipe_ours_seed{a.seed}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    setup, log_step = grpo.train_state.setup, grpo.trainer.log_step

    def setup_then_start(*args, **kwargs):
        s = setup(*args, **kwargs)
        clock.start(s.policy, s.tok)
        return s

    def log_then_evaluate(s, step, *args, **kwargs):  # once per step, after the optimizer step and the weight sync
        log_step(s, step, *args, **kwargs)
        if clock.step_end(step, s.policy, s.tok):
            raise _Reached

    grpo.train_state.setup, grpo.trainer.log_step = setup_then_start, log_then_evaluate
    try:
        grpo.trainer.run_grpo(load_recipe(path))
    except _Reached:
        pass


def run_trl(a, clock: Clock) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer
    from vs_trl import trl_config

    from rewards.verifiable import accuracy_reward, format_reward

    tok = AutoTokenizer.from_pretrained(a.sft)
    rows = read_jsonl(a.train)
    args = trl_config(
        Path(a.work) / f"trl_seed{a.seed}",
        prompts=a.prompts,
        G=a.G,
        new_tokens=a.new_tokens,
        lr=a.lr,
        beta=0.0,
        loss_type=a.loss_type,
        steps=a.steps,
        seed=a.seed,
        device=a.device,
        logging_steps=10**9,
        reward_weights=[r["weight"] for r in REWARDS],
    )

    class Evaluate(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            clock.start(model, tok)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if clock.step_end(state.global_step, model, tok):
                control.should_training_stop = True

    trainer = GRPOTrainer(
        model=a.sft,
        reward_funcs=[accuracy_reward, format_reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Evaluate()],
    )
    torch.set_num_threads(a.threads)
    trainer.train()


def child(a) -> None:
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(a.threads)
    clock = Clock(eval_records(AutoTokenizer.from_pretrained(a.sft), Path(a.eval)), a)
    (run_ours if a.child == "ours" else run_trl)(a, clock)
    print("RESULT " + json.dumps(clock.result()), flush=True)


# ------------------------------------------------------------------------------------- parent
def build_sft(work: Path, a) -> Path:
    """The quickstart SFT checkpoint (`python -m grpo sft recipes/quickstart.yaml`), built once."""
    cmd = [
        sys.executable,
        "-m",
        "grpo",
        "sft",
        "recipes/quickstart.yaml",
        f"run.output_dir={work / 'quickstart'}",
        f"run.threads={a.threads}",
        *([f"sft.steps={a.sft_steps}"] if a.sft_steps else []),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(a), capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"building the SFT checkpoint failed with exit code {proc.returncode}")
    return work / "quickstart" / "sft" / "final"


def child_env(a) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
        **({"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}),  # else accelerate puts ours on a GPU
    }


def spawn(runner: str, seed: int, a) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        runner,
        "--seed",
        str(seed),
        "--sft",
        str(a.sft),
        "--train",
        str(a.train),
        "--eval",
        str(a.eval),
        "--work",
        str(a.work),
        "--threads",
        str(a.threads),
        "--device",
        a.device,
        "--prompts",
        str(a.prompts),
        "--G",
        str(a.G),
        "--new-tokens",
        str(a.new_tokens),
        "--lr",
        str(a.lr),
        "--loss-type",
        a.loss_type,
        "--steps",
        str(a.steps),
        "--eval-every",
        str(a.eval_every),
        *(["--stop-at", str(a.stop_at)] if a.stop_at is not None else []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(a), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{runner} (seed {seed}) failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT ") :]) | {"wall_s": time.perf_counter() - t0}


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["accuracy"] >= target), None)


def report(results: dict, a) -> str:
    lines = [
        f"GRPO from the quickstart SFT checkpoint: {a.prompts} prompts x G={a.G}, <= {a.new_tokens} new tokens, lr "
        f"{a.lr}, loss {a.loss_type}, beta 0; rewards accuracy + 0.1 format; {a.device}, {a.threads} thread(s); "
        f"eval every {a.eval_every} steps "
        f"on {a.n_eval} held-out additions (greedy)",
        "",
    ]
    head = f"{'seed':>4} {'runner':<6} {'acc@0':>6} " + " ".join(
        f"{'steps@' + format(t, '.0%'):>9} {'train s':>8} {'cpu s':>7}" for t in a.targets
    )
    lines += [head + f" {'s/step':>7} {'setup s':>7} {'best acc':>8}"]
    ratios: dict[float, list[tuple[float, float]]] = {t: [] for t in a.targets}
    for seed, by_runner in results.items():
        for runner, r in by_runner.items():
            cells = []
            for t in a.targets:
                c = first_reaching(r["curve"], t)
                cells.append(
                    f"{c['step']:>9} {c['train_s']:>8.1f} {c['cpu_s']:>7.1f}" if c else f"{'-':>9} {'-':>8} {'-':>7}"
                )
            best = max(r["curve"], key=lambda c: c["accuracy"])
            lines.append(
                f"{seed:>4} {runner:<6} {r['curve'][0]['accuracy']:>6.3f} "
                + " ".join(cells)
                + f" {r['median_step_s']:>7.2f} {r['setup_s']:>7.1f} {best['accuracy']:>8.3f}"
            )
        if set(by_runner) == set(RUNNERS):
            for t in a.targets:
                ours, trl = (first_reaching(by_runner[k]["curve"], t) for k in RUNNERS)
                if ours and trl:
                    ratios[t].append((ours["train_s"] / trl["train_s"], ours["cpu_s"] / trl["cpu_s"]))
                    lines.append(
                        f"     ours / trl to {t:.0%}: train time {ratios[t][-1][0]:.2f}x, CPU time "
                        f"{ratios[t][-1][1]:.2f}x"
                    )
                else:
                    missing = " and ".join(k for k, c in zip(RUNNERS, (ours, trl)) if not c)
                    lines.append(f"     ours / trl to {t:.0%}: not reached by {missing} within {a.steps} steps")
    for t, rs in ratios.items():
        if len(rs) > 1:
            lines.append(
                f"median over seeds, ours / trl to {t:.0%}: train time {statistics.median(x for x, _ in rs):.2f}x, "
                f"CPU time {statistics.median(y for _, y in rs):.2f}x"
            )
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sft", help="the SFT checkpoint both start from (default: build the quickstart one in a temp folder)"
    )
    p.add_argument("--sft-steps", type=int, help="when building it: sft.steps (default: the quickstart's)")
    p.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: both trainers (and the SFT build) on the GPU, fp32; TRL without vLLM (transformers generate)",
    )
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step (the quickstart's)")
    p.add_argument("--G", type=int, default=8)
    p.add_argument(
        "--new-tokens", type=int, default=40, help="max new tokens (the quickstart's rollout.max_new_tokens)"
    )
    p.add_argument("--lr", type=float, default=2e-5, help="the quickstart's grpo.lr")
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "dapo", "bnpo", "dr_grpo"])
    p.add_argument("--steps", type=int, default=300, help="at most this many optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.95])
    p.add_argument(
        "--stop-at", type=float, help="stop a run at the first evaluation at or above this (default: max --targets)"
    )
    p.add_argument("--no-stop", action="store_true", help="run every --steps step")
    p.add_argument("--train", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--eval", default=str(ROOT / "data" / "toyworld" / "eval.jsonl"), help="held-out prompts (rows with an answer)"
    )
    p.add_argument("--quick", action="store_true", help="4 steps, eval every 2, no stop: a smoke run")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.eval_every, a.no_stop = 4, 2, True
    if not a.child:
        a.stop_at = None if a.no_stop else (a.stop_at if a.stop_at is not None else max(a.targets))
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    from vs_trl import require_device

    require_device(a.device)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="grpo_tta_") as tmp:
        a.work = Path(tmp)
        t0 = time.perf_counter()
        if a.sft is None:
            a.sft = build_sft(a.work, a)
            print(f"SFT checkpoint built in {time.perf_counter() - t0:.0f} s", flush=True)
        a.train = a.work / "train_additions.jsonl"  # the addition prompts of the GRPO set (every one has an answer)
        rows = read_jsonl(ROOT / "data" / "toyworld" / "grpo_train.jsonl")
        a.train.write_text(
            "".join(json.dumps(r) + "\n" for r in rows if r.get("category") == "math" and r.get("answer"))
        )
        a.n_eval = sum(1 for r in read_jsonl(a.eval) if r.get("category", "math") == "math" and r.get("answer"))
        for seed in a.seeds:
            order = a.runners if seed % 2 == 0 else a.runners[::-1]
            for runner in order:
                r = spawn(runner, seed, a)
                results.setdefault(seed, {})[runner] = r
                reached = {t: first_reaching(r["curve"], t) for t in a.targets}
                print(
                    f"[seed {seed}] {runner}: {r['steps_run']} steps, {r['median_step_s']:.2f} s/step, accuracy "
                    f"{r['curve'][0]['accuracy']:.3f} -> {r['curve'][-1]['accuracy']:.3f}; "
                    + ", ".join(
                        f"{t:.0%} at step {c['step']} ({c['train_s']:.0f} s)" if c else f"{t:.0%} not reached"
                        for t, c in reached.items()
                    )
                    + f" ({r['wall_s']:.0f} s wall)",
                    flush=True,
                )
            results[seed] = {k: results[seed][k] for k in a.runners if k in results[seed]}
    print()
    print(report(results, a))
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
