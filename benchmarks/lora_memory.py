"""Peak memory of a LoRA GRPO run vs a full fine-tune of the same model, on CPU (issue #6).

    python benchmarks/lora_memory.py                 # DESIGN.md model (hidden 512, 8 layers, vocab 32000, ~58M)
    python benchmarks/lora_memory.py --quick         # small model and shapes, about a minute
    python benchmarks/lora_memory.py --json out.json

Works offline: the random-init Llama-shaped model, its 32000-word tokenizer and the prompts are built
by `vs_trl.build_assets` into a temp folder. Each runner is the real trainer (`grpo.trainer.run_grpo`
on a recipe this script writes) in its own subprocess, so its peak RSS (ru_maxrss) is its own (the
assets are built in another one: a child's ru_maxrss starts at the size of the process it forked from):

  full         all weights trainable, grpo.beta > 0: a frozen full reference copy, as users run it.
  full_beta0   all weights trainable, grpo.beta = 0: no reference model at all.
  lora         a LoRA adapter (model.lora: r 16, alpha 32, dropout 0.05 on the q/k/v/o/gate/up/down
               projections), grpo.beta > 0: the reference is the same model with the adapter
               disabled, no second copy.

Same prompts, G, lengths, seed, lr and reward (vs_trl's `toy_reward`) for all; fp32, `--threads`
torch threads, `--micro-batch` sequences per micro-batch (default: the whole step in one), fixed-length
completions (min_new_tokens = max_new_tokens).
Measured in the child, by wrapping the trainer's own calls (nothing here is estimated):
  trainable / total       grpo.modeling.count_parameters of the policy the trainer built.
  ref copy                parameters of the reference model `make_reference` returned (0 = none).
  params in RAM           bytes of all distinct parameter storages of every live nn.Module in the
                          process (gc), at the end of each step: policy + reference + anything else.
  optimizer state         bytes of all tensors in `optimizer.state` (AdamW exp_avg, exp_avg_sq, step)
                          at the end of each step.
  peak RSS                ru_maxrss at the end of the last step ("steps") and at exit ("+save": the
                          final save and checkpoint included); also after imports and after loading
                          (policy + reference). "peak in": the phase after which ru_maxrss first
                          reached its end-of-steps value (rollout, reference forward, policy forward,
                          backward + optimizer step; of which step); the JSON has every mark.
  saved weights           *.safetensors in train/final (adapter_model or model); "ckpt" is the whole
                          last checkpoint folder (weights + optimizer state + tokenizer).
  s/step                  median time_step of the steps after the warm-up (metrics.jsonl).
Timings on the shared 2-core machine are noisy; the memory numbers are not.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from vs_trl import add_shape_args, build_assets, run_child  # this folder is sys.path[0] when the script runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNERS = ("full", "full_beta0", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20


# ------------------------------------------------------------------------------------- measurements
def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (AdamW: exp_avg, exp_avg_sq, step)."""
    import torch

    return sum(v.nbytes for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def live_parameter_bytes() -> int:
    """Bytes of the distinct parameter storages held by all live nn.Modules (shared/tied weights once)."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.nn.Module):  # not isinstance: no __class__ lookups on proxies
            for p in obj.parameters(recurse=False):
                storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(storages.values())


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------- runner (child)
def recipe_for(runner: str, folder: Path, a) -> dict:
    out = folder / runner
    return {
        "run": {"output_dir": str(out), "seed": 0, "threads": a.threads, "overwrite": True},
        "model": {
            "name_or_path": str(folder / "model"),
            "dtype": "float32",
            "lora": {
                "enabled": runner == "lora",
                "r": a.lora_r,
                "alpha": 2 * a.lora_r,
                "dropout": a.lora_dropout,
                "target_modules": LORA_TARGETS,
            },
        },
        "data": {
            "train": str(folder / "prompts.jsonl"),
            "sft_train": None,
            "sft_eval": None,
            "eval": None,
            "max_prompt_length": a.prompt_len + 8,
        },
        "rollout": {
            "backend": "engine",
            "max_new_tokens": a.new_tokens,
            "min_new_tokens": a.new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
        },
        "grpo": {
            "steps": a.warmup + a.steps,
            "prompts_per_step": a.prompts,
            "num_generations": a.G,
            "micro_batch_size": a.micro_batch or a.prompts * a.G,
            "num_iterations": 1,
            "lr": a.lr,
            "weight_decay": 0.0,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "beta": 0.0 if runner == "full_beta0" else a.beta,
            "loss_type": "grpo",
            "save_every": 0,
            "keep_last": 1,
        },
        "rewards": [{"name": "vs_trl:toy_reward"}],
        "tracking": {"samples_every": 0, "log_every": 1},
    }


def observe_trainer() -> dict:
    """Wrap the trainer's own calls so that they also record into the returned dict (results unchanged):
    its optimizer, policy and reference, and per step: optimizer state, live parameters, ru_maxrss marks."""
    import torch

    import grpo.runtime
    import grpo.train_state
    import grpo.trainer
    from grpo.batch import MicroBatch
    from grpo.tracking import Tracker

    seen: dict = {"steps": [], "marks": []}
    build_optimizer, make_reference, generate, logprobs, log = (
        grpo.runtime.build_optimizer,
        grpo.train_state.make_reference,
        grpo.trainer.generate,
        MicroBatch.logprobs,
        Tracker.log,
    )

    def mark(phase: str) -> None:  # ru_maxrss is monotone: the phase after which it first reaches a value set it
        seen["marks"].append((len(seen["steps"]) + 1, phase, rss_mb()))

    def capture_optimizer(*args, **kwargs):
        seen["optimizer"] = build_optimizer(*args, **kwargs)
        return seen["optimizer"]

    def capture_reference(model, *args, **kwargs):
        seen["policy"], seen["reference"] = model, make_reference(model, *args, **kwargs)
        mark("load")
        return seen["reference"]

    def marked_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        mark("rollout")
        return out

    def marked_logprobs(*args, **kwargs):
        out = logprobs(*args, **kwargs)
        mark("policy forward" if torch.is_grad_enabled() else "reference forward")
        return out

    def log_and_measure(self, step, metrics):  # once per step, right after the optimizer step
        mark("backward + optimizer step")
        seen["steps"].append(
            {
                "optimizer_state": optimizer_state_bytes(seen["optimizer"]),
                "params": live_parameter_bytes(),
                "rss_mb": rss_mb(),
                "cpu": time.process_time(),
            }
        )
        return log(self, step, metrics)

    (
        grpo.runtime.build_optimizer,
        grpo.train_state.make_reference,
        grpo.trainer.generate,
        MicroBatch.logprobs,
        Tracker.log,
    ) = (capture_optimizer, capture_reference, marked_generate, marked_logprobs, log_and_measure)
    seen["mark"] = mark
    return seen


def run_runner(runner: str, folder: Path, a) -> dict:
    """One `grpo train` run, observed (see observe_trainer), and what it saved."""
    import yaml

    import grpo.trainer
    from grpo.config import load_recipe
    from grpo.modeling import count_parameters

    seen = observe_trainer()
    path = folder / f"recipe_{runner}.yaml"
    path.write_text(yaml.safe_dump(recipe_for(runner, folder, a)))
    base_rss = rss_mb()
    final = grpo.trainer.run_grpo(load_recipe(path))
    seen["mark"]("final save")
    steps, ckpts = seen["steps"], sorted(final.parent.glob("ckpt-*"))
    step, phase, _ = next(m for m in seen["marks"] if m[2] >= steps[-1]["rss_mb"])  # where the steps' peak was set
    trainable, total = count_parameters(seen["policy"])
    return {
        "grpo": str(Path(grpo.trainer.__file__).parent),
        "trainable": trainable,
        "total": total,
        "optimizer_params": sum(p.numel() for g in seen["optimizer"].param_groups for p in g["params"]),
        "reference_params": count_parameters(seen["reference"])[1] if seen["reference"] is not None else 0,
        "params_mb": max(s["params"] for s in steps) / MB,
        "optimizer_state_mb": max(s["optimizer_state"] for s in steps) / MB,
        "rss_base_mb": base_rss,
        "rss_steps_mb": steps[-1]["rss_mb"],
        "rss_marks": seen["marks"],
        "peak_phase": f"step {step}: {phase}" if phase != "load" else phase,
        "saved_weights_mb": folder_bytes(final, "*.safetensors") / MB,
        "saved_files": sorted(f.name for f in final.glob("*.safetensors")),
        "ckpt_mb": folder_bytes(ckpts[-1]) / MB if ckpts else 0.0,
        "step_s": [json.loads(line)["time_step"] for line in open(final.parent / "metrics.jsonl")],
        "cpu_s": [b["cpu"] - a_["cpu"] for a_, b in zip(steps, steps[1:])],
    }


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    if a.child == "assets":
        build_assets(Path(a.assets), a)
        print("RESULT {}", flush=True)
        return
    result = run_runner(a.child, Path(a.assets), a)
    result["peak_rss_mb"] = rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------- parent
def spawn(runner: str, assets: Path, a) -> dict:
    keys = (
        "threads",
        "prompts",
        "G",
        "prompt_len",
        "new_tokens",
        "vocab",
        "hidden",
        "ffn",
        "layers",
        "heads",
        "warmup",
        "steps",
        "lr",
        "beta",
        "lora_r",
        "lora_dropout",
        "micro_batch",
    )
    return run_child(Path(__file__).resolve(), ["--child", runner, "--assets", str(assets)], a, keys, runner)


def report(results: dict, a) -> str:
    lines = [
        f"model: Llama hidden {a.hidden}, {a.layers} layers, {a.heads} heads, ffn {a.ffn}, vocab {a.vocab}, fp32; "
        f"{a.prompts} prompts x G={a.G}, {a.prompt_len} prompt tokens, {a.new_tokens} new tokens, "
        f"micro-batch {a.micro_batch or a.prompts * a.G}; "
        f"beta {a.beta} (full_beta0: 0); LoRA r {a.lora_r} alpha {2 * a.lora_r} dropout {a.lora_dropout} on "
        f"{', '.join(LORA_TARGETS)}; "
        f"{a.threads} thread(s); {a.warmup} warm-up + {a.steps} timed steps",
        "",
        "| runner | trainable params | total params | ref copy params | params in RAM MB | optimizer state MB "
        "| RSS after imports MB | RSS after load MB | peak RSS MB (steps) | peak RSS MB (+save) | peak in | saved "
        "weights MB "
        "| ckpt MB | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for runner, r in results.items():
        load = next(rss for _, phase, rss in r["rss_marks"] if phase == "load")
        lines.append(
            f"| {runner} | {r['trainable']:,} | {r['total']:,} | {r['reference_params']:,} | {r['params_mb']:.0f} "
            f"| {r['optimizer_state_mb']:.1f} | {r['rss_base_mb']:.0f} | {load:.0f} | {r['rss_steps_mb']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_phase']} | {r['saved_weights_mb']:.2f} | {r['ckpt_mb']:.1f} | "
            f"{r['s_per_step']:.2f} |"
        )
    if "lora" in results:
        lora = results["lora"]
        lines.append("")
        lines.append(
            f"lora: {lora['trainable'] / lora['total']:.2%} of the parameters trainable; saved adapter "
            f"{', '.join(lora['saved_files'])} = {lora['saved_weights_mb']:.2f} MB"
        )
        for name in ("full", "full_beta0"):
            if name in results:
                r = results[name]
                lines.append(
                    f"lora / {name}: peak RSS (steps) {lora['rss_steps_mb'] / r['rss_steps_mb']:.2f}x "
                    f"({r['rss_steps_mb'] - lora['rss_steps_mb']:.0f} MB less), "
                    f"optimizer state {lora['optimizer_state_mb'] / r['optimizer_state_mb']:.3f}x, "
                    f"params in RAM {lora['params_mb'] / r['params_mb']:.2f}x, "
                    f"saved weights {lora['saved_weights_mb'] / r['saved_weights_mb']:.3f}x"
                )
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="hidden 256, 4 layers, vocab 8000, 2 prompts x G=4, 32 prompt / 16 new tokens",
    )
    p.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=8)
    add_shape_args(p)
    p.add_argument(
        "--micro-batch", type=int, default=0, help="grpo.micro_batch_size (0 = the whole step in one micro-batch)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05, help="model.lora.dropout (0.05 is its default)")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--child", choices=(*RUNNERS, "assets"), help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and not a.child:
        a.hidden, a.ffn, a.layers, a.heads, a.vocab, a.prompts, a.G, a.prompt_len, a.new_tokens, a.steps = (
            256,
            688,
            4,
            4,
            8000,
            2,
            4,
            32,
            16,
            2,
        )
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="grpo_lora_memory_") as tmp:
        assets = Path(tmp)
        # built in a subprocess too: a child's ru_maxrss starts at the size of the process it was forked from
        spawn("assets", assets, a)
        for runner in a.runners:
            results[runner] = r = spawn(runner, assets, a)
            r["s_per_step"] = statistics.median(r["step_s"][a.warmup :])
            print(
                f"{runner}: peak RSS {r['peak_rss_mb']:.0f} MB, optimizer state {r['optimizer_state_mb']:.1f} MB, "
                f"{r['s_per_step']:.2f} s/step ({r['wall_s']:.0f} s)",
                flush=True,
            )
    print()
    print(report(results, a))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
