"""One GRPO optimizer step: ours (`grpo.trainer.run_grpo`) vs TRL's `GRPOTrainer`, side by side on CPU or a GPU.

    python benchmarks/vs_trl.py                      # DESIGN.md model (hidden 512, 8 layers, vocab 32000, ~58M)
    python benchmarks/vs_trl.py --quick              # small model and shapes, a few minutes
    python benchmarks/vs_trl.py --loss-types grpo --runners trl ours --json out.json
    python benchmarks/vs_trl.py --device cuda --dtype bfloat16 --vocab 151936 --hidden 896 --ffn 4864 --layers 24 \\
        --heads 14 --kv-heads 2 --tied --optim adamw_fused --prompts 8 --new-tokens 256   # Qwen2.5-0.5B shape
        # (benchmarks/gpu_vs_trl.sh runs it on the device; peak CUDA memory per runner is reported too)

Needs the `bench` extra (`pip install -e .[bench]`, i.e. trl). Works offline: the random-init
Llama-shaped model and a 32000-word WordLevel tokenizer are built into a temp folder that both
trainers load. Same configuration on both sides: 1 process, fp32, `--threads` torch threads,
`--prompts` prompts x G completions per optimizer step in ONE micro-batch, prompts of `--prompt-len`
tokens, exactly `--new-tokens` sampled tokens (min_new_tokens = max_new_tokens) at temperature 1,
top-p 1, top-k 0, the same loss type, beta > 0 (a full reference copy on both sides), the same
AdamW lr / clip / constant schedule, a trivial reward (share of even word ids), group-scaled
advantages, num_iterations 1 (no old-logprob pass on either side), and TRL's
`use_bias_correction_kl=False` (its 1.16 default multiplies the KL by the ratio; ours is
DeepSeekMath's plain k3 term; tests/test_same_loss_as_trl.py checks the losses agree).

At the Qwen vocabulary (issue #14): `--vocab 151936 --hidden 512 --ffn 1376 --layers 2 --prompts 2
--new-tokens 256 --prompt-len 64 --loss-types grpo --runners trl ours`. `--micro-batch-tokens N` makes
ours pack each step into micro-batches of at most N tokens (`grpo.micro_batch_tokens`; TRL keeps one).

Runners, each in its own subprocess (peak RSS = that process's ru_maxrss; for ours, the largest
high-water mark of its phases, `PhasePeaks`, which also reports each phase's peak: rollout,
reference log-probs, update):
  trl          TRL's GRPOTrainer (transformers `generate`, its chunked lm-head logprobs).
  ours         grpo.trainer.run_grpo with its defaults: `engine` rollout, `grpo.shared_prefix: true`
               (each group's prompt computed once in the reference and policy passes, grpo/prefix.py).
  ours_plain   the same with `grpo.shared_prefix: false` (the plain padded forward of
               `grpo.batch.token_logprobs`).
  fwdbwd       not a trainer: the policy forward+backward and the no-grad reference forward on the
               step's batch, plain padded vs shared-prefix, alternated in one process.
Per step: wall seconds of the optimizer step and its parts. Ours from metrics.jsonl
(time_rollout / time_score / time_logprobs / time_train); TRL by timing its methods: `_generate`,
`_calculate_rewards`, the no-grad `_get_per_token_logps_and_entropies` calls (reference), and
"train" = step - `_prepare_inputs` (policy forward, backward, clip, optimizer step); its "other" is
the rest of `_prepare_inputs` (padding, advantages, metrics). Medians over the timed steps after
the warm-up steps (parts are medians of their own, they need not add up to the step). "cpu s" is the
process CPU time (all threads) from the end of one step to the end of the next: less sensitive than
wall time to other jobs taking the cores. The machine is shared and noisy: compare ratios from one
run, and repeat it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNNERS = ("trl", "ours", "ours_plain", "fwdbwd")
PARTS = ("gen", "score", "logprobs", "train", "other")


def toy_reward(prompts=None, completions=None, **kwargs) -> list[float]:
    """Share of words with an even id (`w123`): cheap, varies within a group. Same function on both sides."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[:1] == "w" and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return out


# ------------------------------------------------------------------------------------- assets
def build_assets(folder: Path, a) -> Path:
    """Random-init Llama-shaped model + WordLevel tokenizer (vocab = model vocab) + a prompt JSONL."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), a.vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads or a.heads,
        max_position_embeddings=max(1024, a.prompt_len + a.new_tokens),  # the engine refuses longer sequences
        tie_word_embeddings=a.tied,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    out = folder / "model"
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    rng = random.Random(0)
    n_prompts = a.prompts * (a.warmup + a.steps) * 2
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(n_prompts):
            f.write(
                json.dumps({"prompt": " ".join(f"w{rng.randrange(3, a.vocab)}" for _ in range(a.prompt_len))}) + "\n"
            )
    return out


# ------------------------------------------------------------------------------------- the two trainers, configured
# alike
def trl_config(
    output_dir,
    *,
    prompts: int,
    G: int,
    new_tokens: int,
    lr: float,
    beta: float,
    loss_type: str,
    steps: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    optim: str = "adamw",
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    **overrides,
):
    """TRL's `GRPOConfig` for one CPU process in fp32, set as `our_recipe` sets ours (also used by time_to_accuracy.py).

    `prompts` x `G` completions per optimizer step in one micro-batch, num_iterations 1, top-p 1, top-k 0,
    AdamW with a constant lr, clip 0.2, group-scaled advantages, DeepSeekMath's k3 KL term
    (`use_bias_correction_kl=False`; TRL 1.16 multiplies it by the ratio by default). `optim` is our name
    (`grpo.optim`): adamw -> transformers' "adamw_torch", adamw_fused -> "adamw_torch_fused" (its default).
    `gradient_checkpointing` is set explicitly: TRL 1.16 turns it on by default, ours (model.gradient_checkpointing)
    off; until 2026-11-27 this file left TRL's default on while ours ran without it.
    `device` cuda: TRL on the GPU (`use_cpu` off); `dtype` bfloat16: the weights loaded in bf16 and TRL's `bf16`
    mixed precision on (ours: `model.dtype: bfloat16`, see `our_recipe`).
    """
    import torch
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=prompts * G,
        num_generations=G,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": min_new_tokens} if min_new_tokens else None,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim={"adamw": "adamw_torch", "adamw_fused": "adamw_torch_fused"}[optim],
        gradient_checkpointing=gradient_checkpointing,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        beta=beta,
        loss_type=loss_type,
        epsilon=0.2,
        scale_rewards="group",
        use_bias_correction_kl=False,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        fp16=False,
        save_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
        model_init_kwargs={"dtype": getattr(torch, dtype)},
    )
    return GRPOConfig(**(kwargs | overrides))


def our_recipe(
    output_dir,
    model,
    train,
    rewards: list[dict],
    *,
    prompts: int,
    G: int,
    new_tokens: int,
    lr: float,
    beta: float,
    loss_type: str,
    steps: int,
    threads: int,
    max_prompt_length: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    optim: str = "adamw",
    gradient_checkpointing: bool = False,
    grpo: dict | None = None,
    dtype: str = "float32",
) -> dict:
    """Our recipe (as a dict) with the settings of `trl_config`: `engine` rollout, the trainer's defaults otherwise.

    `grpo` overrides or adds keys of the recipe's grpo section (e.g. shared_prefix, micro_batch_tokens). The
    device is accelerate's choice (a GPU where torch sees one): the runners hide the GPU for `--device cpu`.
    """
    return {
        "run": {"output_dir": str(output_dir), "seed": seed, "threads": threads, "overwrite": True},
        "model": {"name_or_path": str(model), "dtype": dtype, "gradient_checkpointing": gradient_checkpointing},
        "data": {
            "train": str(train),
            "sft_train": None,
            "sft_eval": None,
            "eval": None,
            "max_prompt_length": max_prompt_length,
        },
        "rollout": {
            "backend": "engine",
            "max_new_tokens": new_tokens,
            "min_new_tokens": min_new_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "top_k": 0,
        },
        "grpo": {
            "steps": steps,
            "prompts_per_step": prompts,
            "num_generations": G,
            "micro_batch_size": prompts * G,
            "num_iterations": 1,
            "lr": lr,
            "optim": optim,
            "weight_decay": 0.0,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "beta": beta,
            "epsilon_low": 0.2,
            "epsilon_high": 0.2,
            "loss_type": loss_type,
            "scale": "group",
            "save_every": 0,
            **(grpo or {}),
        },
        "rewards": rewards,
        "tracking": {"samples_every": 0, "log_every": 1},
    }


def micro_batch(a) -> dict:
    """`--micro-batch-tokens N`: ours packs each step into micro-batches of N tokens (grpo.micro_batch_tokens)."""
    return {"micro_batch_tokens": a.micro_batch_tokens} if a.micro_batch_tokens else {}


# ------------------------------------------------------------------------------------- runners (children)
def run_trl(folder: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    rows = [json.loads(line) for line in open(folder / "prompts.jsonl")]
    args = trl_config(
        folder / f"trl_{a.loss_type}",
        prompts=a.prompts,
        G=a.G,
        new_tokens=a.new_tokens,
        min_new_tokens=a.new_tokens,
        lr=a.lr,
        beta=a.beta,
        loss_type=a.loss_type,
        steps=a.warmup + a.steps,
        optim=a.optim,
        gradient_checkpointing=a.gradient_checkpointing,
        device=a.device,
        dtype=a.dtype,
    )
    tok = AutoTokenizer.from_pretrained(folder / "model")
    trainer = GRPOTrainer(
        model=str(folder / "model"),
        reward_funcs=toy_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    acc: dict[str, float] = {}
    steps: list[dict] = []

    def timed(name: str, key) -> None:
        f = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            announce(key() if callable(key) else key)
            try:
                return f(*args, **kwargs)
            finally:
                k = key() if callable(key) else key
                acc[k] = acc.get(k, 0.0) + time.perf_counter() - t

        setattr(trainer, name, wrapper)

    timed("_generate", "gen")
    timed("_calculate_rewards", "score")
    timed("_get_per_token_logps_and_entropies", lambda: "ref" if not torch.is_grad_enabled() else "policy_fwd")
    timed("_prepare_inputs", "prepare")

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            acc.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            cpu_marks.append(time.process_time())
            step = time.perf_counter() - self.t0
            prep = acc.get("prepare", 0.0)
            steps.append(
                {
                    "step": step,
                    "gen": acc.get("gen", 0.0),
                    "score": acc.get("score", 0.0),
                    "logprobs": acc.get("ref", 0.0),
                    "train": step - prep,
                    "other": prep - acc.get("gen", 0.0) - acc.get("score", 0.0) - acc.get("ref", 0.0),
                }
            )

    cpu_marks: list[float] = []
    trainer.add_callback(Clock())
    trainer.train()
    return {"steps": with_cpu(steps, cpu_marks)}


def run_ours(folder: Path, a, shared_prefix: bool) -> dict:
    import torch
    import yaml
    from accelerate import Accelerator

    sys.path.insert(0, str(HERE))  # rewards: "vs_trl:toy_reward"
    import grpo.trainer
    from grpo.batch import MicroBatch
    from grpo.config import load_recipe
    from grpo.tracking import Tracker

    out = folder / f"ours_{'' if shared_prefix else 'plain_'}{a.loss_type}"
    recipe = our_recipe(
        out,
        folder / "model",
        folder / "prompts.jsonl",
        [{"name": "vs_trl:toy_reward"}],
        prompts=a.prompts,
        G=a.G,
        new_tokens=a.new_tokens,
        min_new_tokens=a.new_tokens,
        lr=a.lr,
        beta=a.beta,
        loss_type=a.loss_type,
        steps=a.warmup + a.steps,
        threads=a.threads,
        max_prompt_length=a.prompt_len + 8,
        optim=a.optim,
        gradient_checkpointing=a.gradient_checkpointing,
        grpo={"shared_prefix": shared_prefix, **micro_batch(a)},
        dtype=a.dtype,
    )
    path = folder / f"recipe_{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cpu_marks: list[float] = []
    log = Tracker.log

    def log_and_mark(self, step, metrics):  # once per step, right after it
        cpu_marks.append(time.process_time())
        return log(self, step, metrics)

    Tracker.log = log_and_mark
    phases = PhasePeaks()
    for name in ("collect_rollouts", "old_and_reference_logprobs", "update"):
        setattr(grpo.trainer, name, phases.wrap(getattr(grpo.trainer, name), name))
    # inside them: each micro-batch's forward (policy with grad, reference without), backward, and the AdamW step
    mode = lambda: "forward" if torch.is_grad_enabled() else "ref_forward"  # noqa: E731
    MicroBatch.logprobs = phases.wrap(MicroBatch.logprobs, mode)
    Accelerator.backward = phases.wrap(Accelerator.backward, "backward")
    torch.optim.AdamW.step = phases.wrap(torch.optim.AdamW.step, "optimizer")
    micro_tokens: list[list[int]] = []  # per step: packed tokens of each micro-batch (each distinct prompt once)
    row_splits = grpo.trainer.row_splits

    def row_splits_and_sizes(s, r):
        splits = row_splits(s, r)
        micro_tokens.append(
            [
                sum(len(r.completions[i].token_ids) for i in rows)
                + sum(len(r.rows[p]["prompt_ids"]) for p in {r.completions[i].prompt_index for i in rows})
                for rows in splits
            ]
        )
        return splits

    grpo.trainer.row_splits = row_splits_and_sizes
    grpo.trainer.run_grpo(load_recipe(path))
    rows = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    steps = [
        {
            "step": r["time_step"],
            "gen": r["time_rollout"],
            "score": r["time_score"],
            "logprobs": r["time_logprobs"],
            "train": r["time_train"],
            "other": 0.0,
        }
        for r in rows
    ]
    return {
        "steps": with_cpu(steps, cpu_marks),
        "phases": phases.calls,
        "peak_hwm_mb": phases.peak(),
        "micro_tokens": micro_tokens,
    }


def announce(phase: str) -> None:
    """`PHASE name` on stderr as a phase starts: what the parent names if it stops the child (--rss-limit-mb)."""
    print(f"PHASE {phase}", file=sys.stderr, flush=True)


class PhasePeaks:
    """Peak RSS of each call of some functions: the kernel's high-water mark (VmHWM) is reset to the current RSS
    before each call (`/proc/self/clear_refs`, Linux) and read after it. Calls may nest: each reset folds the
    mark read just before it into every call still open.

    `calls`: per call {name, rss_mb (at its start), peak_mb (during it)}, in the order they END (an inner call
    before the call around it). The reset also resets ru_maxrss, so the process's peak is `peak()`.
    """

    def __init__(self):
        self.calls: list[dict] = []
        self.open: list[dict] = []
        self.marks: list[float] = []

    @staticmethod
    def _status() -> dict:
        with open("/proc/self/status") as f:
            return {
                k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")
            }

    def _reset(self) -> float:
        hwm = self._status()["VmHWM"]  # the peak since the last reset
        self.marks.append(hwm)
        for call in self.open:
            call["peak_mb"] = max(call["peak_mb"], hwm)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status()["VmRSS"]

    def wrap(self, f, name: str | Callable[[], str]):
        """`f` measured; `name` may be a function of the moment of the call (e.g. of the grad mode)."""

        def wrapper(*args, **kwargs):
            call = {"name": name() if callable(name) else name, "rss_mb": self._reset()}
            announce(call["name"])
            call["peak_mb"] = call["rss_mb"]
            self.open.append(call)
            try:
                return f(*args, **kwargs)
            finally:
                self._reset()
                self.open.remove(call)
                self.calls.append(call)

        return wrapper

    def peak(self) -> float:
        return max([self._status()["VmHWM"], *self.marks, *(c["peak_mb"] for c in self.calls)])


def with_cpu(steps: list[dict], marks: list[float]) -> list[dict]:
    """Adds "cpu": process CPU seconds (all threads) between the ends of consecutive steps (None for the first)."""
    for i, s in enumerate(steps):
        s["cpu"] = marks[i] - marks[i - 1] if 0 < i < len(marks) else None
    return steps


def run_fwdbwd(folder: Path, a) -> dict:
    """Plain padded vs shared-prefix: policy forward+backward and no-grad reference forward, alternated."""
    import torch
    from transformers import AutoModelForCausalLM

    from grpo.batch import build_batch, token_logprobs
    from grpo.prefix import pack_groups, packed_logprobs

    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=getattr(torch, a.dtype)).to(device).train()
    rng = random.Random(1)
    prompts = [[rng.randrange(3, a.vocab) for _ in range(a.prompt_len)] for _ in range(a.prompts)]
    comps = [[rng.randrange(3, a.vocab) for _ in range(a.new_tokens)] for _ in range(a.prompts * a.G)]
    group_of = [j // a.G for j in range(len(comps))]
    layouts = {
        "plain": build_batch(prompts, comps, group_of, 0, device=device),
        "prefix": pack_groups(prompts, comps, group_of, device),
    }
    forwards = {"plain": token_logprobs, "prefix": packed_logprobs}
    times: dict[str, list[float]] = {}
    for rep in range(a.reps + 1):  # rep 0 is a warm-up
        for name, fn in forwards.items():
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                fn(model, layouts[name], 1.0)
            t1, c1 = time.perf_counter(), time.process_time()
            fn(model, layouts[name], 1.0).sum().backward()
            t2, c2 = time.perf_counter(), time.process_time()
            model.zero_grad(set_to_none=True)
            if rep:
                for key, value in (
                    ("ref", t1 - t0),
                    ("fwdbwd", t2 - t1),
                    ("ref_cpu", c1 - c0),
                    ("fwdbwd_cpu", c2 - c1),
                ):
                    times.setdefault(f"{name}_{key}", []).append(value)
    tokens_plain = int(layouts["plain"].input_ids.numel())
    tokens_packed = int(layouts["prefix"].input_ids.numel())
    return {"times": times, "tokens_plain": tokens_plain, "tokens_packed": tokens_packed}


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    folder = Path(a.assets)
    if a.child == "assets":
        build_assets(folder, a)
        print("RESULT {}", flush=True)
        return
    if a.child == "trl":
        result = run_trl(folder, a)
    elif a.child in ("ours", "ours_plain"):
        result = run_ours(folder, a, shared_prefix=a.child == "ours")
    else:
        result = run_fwdbwd(folder, a)
    if a.device == "cuda":  # the process's peak of tensors on the GPU, and of the caching allocator's reservation
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    # ours resets the kernel's high-water mark per phase (PhasePeaks) and reports the peak it saw
    result["peak_rss_mb"] = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, result.get("peak_hwm_mb", 0.0)
    )
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------- parent
def run_child(script: Path, extra: list[str], a, keys: tuple[str, ...], what: str) -> dict:
    """`script --child ...` in a fresh process (so its ru_maxrss is its own): its RESULT json, plus wall_s."""
    cmd = [sys.executable, str(script), *extra]
    for k in keys:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": str(a.threads),
        "MKL_NUM_THREADS": str(a.threads),
    }
    if getattr(a, "device", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine too: accelerate would put ours on the GPU
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
        seen_mb = watch(proc, getattr(a, "rss_limit_mb", None))
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - t0
    if seen_mb is not None:  # stopped above the limit
        phases = [line.split(" ", 1)[1] for line in stderr.splitlines() if line.startswith("PHASE ")]
        return {"killed": True, "peak_rss_mb": seen_mb, "wall_s": wall, "phase": phases[-1] if phases else "setup"}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(stdout[-3000:] + stderr[-6000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = wall
    return result


def watch(proc: subprocess.Popen, limit_mb: float | None) -> float | None:
    """Waits for `proc`; with `limit_mb`, polls its RSS (with its children's) and kills it once above the limit.
    Returns the RSS (MB) it was stopped at, or None when it ended by itself."""
    if not limit_mb:
        proc.wait()
        return None
    import psutil  # accelerate's dependency

    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in (parent, *parent.children(recursive=True))) / 2**20
        except psutil.Error:  # it ended between the poll and the read
            continue
        if rss > limit_mb:
            for p in (*parent.children(recursive=True), parent):
                p.kill()
            proc.wait()
            return rss
        time.sleep(0.1)
    return None


def spawn(runner: str, loss_type: str, assets: Path, a) -> dict:
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
        "kv_heads",
        "device",
        "dtype",
        "warmup",
        "steps",
        "reps",
        "lr",
        "beta",
        "optim",
    )
    extra = ["--gradient-checkpointing"] if a.gradient_checkpointing else []
    extra += ["--tied"] if a.tied else []
    extra += ["--micro-batch-tokens", str(a.micro_batch_tokens)] if a.micro_batch_tokens else []
    return run_child(
        Path(__file__).resolve(),
        ["--child", runner, "--assets", str(assets), "--loss-type", loss_type, *extra],
        a,
        keys,
        f"{runner} ({loss_type})",
    )


PHASES = {
    "collect_rollouts": "rollout",
    "old_and_reference_logprobs": "ref",
    "update": "train",
    "ref_forward": "ref fwd",
    "forward": "fwd",
    "backward": "bwd",
    "optimizer": "adamw",
}


def phase_peaks(result: dict, warmup: int) -> dict:
    """{phase: (RSS MB at its start, peak RSS MB during it)}, the largest over the steps after the warm-up ones
    (calls end in order, inner ones first: a step's calls are those before its `update` call ends)."""
    out: dict[str, tuple[float, float]] = {}
    updates = 0
    for c in result.get("phases", []):
        if updates >= warmup and c["name"] in PHASES:
            rss, peak = out.get(PHASES[c["name"]], (0.0, 0.0))
            out[PHASES[c["name"]]] = (max(rss, c["rss_mb"]), max(peak, c["peak_mb"]))
        updates += c["name"] == "update"
    return {k: out[k] for k in PHASES.values() if k in out}


def summarize(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:]
    out = {k: statistics.median(s[k] for s in timed) for k in ("step", *PARTS)} | {"n": len(timed)}
    cpu = [s["cpu"] for s in timed if s.get("cpu") is not None]
    out["cpu"] = statistics.median(cpu) if cpu else float("nan")
    return out


BOUND = {(False, True): " or less", (True, False): " or more", (True, True): ", both stopped"}


def killed_text(r: dict, a) -> str:
    return (
        f"stopped: RSS {r['peak_rss_mb']:.0f} MB > --rss-limit-mb {a.rss_limit_mb:.0f} after {r['wall_s']:.0f} s, "
        f"in phase {r['phase']}"
    )


def report(results: dict, a) -> str:
    lines = [
        f"model: Llama hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads or a.heads} KV), "
        f"ffn {a.ffn}, vocab {a.vocab}{', tied' if a.tied else ''}, {a.dtype} on {a.device}; "
        f"{a.prompts} prompts x G={a.G}, {a.prompt_len} prompt tokens, {a.new_tokens} new tokens; beta {a.beta}, "
        f"lr {a.lr}, {a.optim}{', gradient checkpointing' if a.gradient_checkpointing else ''}; {a.threads} threads; "
        f"median of {a.steps} steps after {a.warmup} warm-up",
        "",
    ]
    for loss_type, by_runner in results.items():
        if loss_type == "fwdbwd":
            continue
        lines.append(f"loss_type={loss_type}: seconds per optimizer step (median) and peak RSS")
        lines.append(
            f"  {'runner':<12} {'step':>7} {'gen':>7} {'score':>7} {'ref':>7} {'train':>7} {'other':>7} "
            f"{'cpu s':>7} {'RSS MB':>8}" + (f" {'CUDA MB':>8} {'reserved':>8}" if a.device == "cuda" else "")
        )
        for runner, r in by_runner.items():
            if r.get("killed"):
                lines.append(f"  {runner:<12} {killed_text(r, a)}")
                continue
            s = r["summary"]
            lines.append(
                f"  {runner:<12} {s['step']:7.2f} {s['gen']:7.2f} {s['score']:7.2f} {s['logprobs']:7.2f} "
                f"{s['train']:7.2f} {s['other']:7.2f} {s['cpu']:7.1f} {r['peak_rss_mb']:8.0f}"
                + (f" {r['peak_cuda_mb']:8.0f} {r['peak_cuda_reserved_mb']:8.0f}" if "peak_cuda_mb" in r else "")
            )
        for runner, r in by_runner.items():
            peaks = phase_peaks(r, a.warmup)
            if peaks:
                lines.append(
                    f"  {runner} peak RSS MB per phase (RSS at its start -> peak during it): "
                    + ", ".join(f"{k} {rss:.0f} -> {peak:.0f} (+{peak - rss:.0f})" for k, (rss, peak) in peaks.items())
                )
        if "trl" in by_runner:
            base = by_runner["trl"]
            for runner, r in by_runner.items():
                if runner != "trl" and (r.get("killed") or base.get("killed")):
                    bound = BOUND[bool(r.get("killed")), bool(base.get("killed"))]
                    lines.append(
                        f"  {runner} / trl: peak RSS {r['peak_rss_mb']:.0f} MB vs {base['peak_rss_mb']:.0f} MB "
                        f"({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x{bound}: "
                        "a stopped run has no step time)"
                    )
                elif runner != "trl":
                    lines.append(
                        f"  {runner} / trl: step {r['summary']['step'] / base['summary']['step']:.2f}x, "
                        f"CPU seconds per step {r['summary']['cpu'] / base['summary']['cpu']:.2f}x, "
                        f"peak RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
                        + (
                            f", peak CUDA memory {r['peak_cuda_mb'] / base['peak_cuda_mb']:.2f}x "
                            f"(reserved {r['peak_cuda_reserved_mb'] / base['peak_cuda_reserved_mb']:.2f}x)"
                            if "peak_cuda_mb" in r and "peak_cuda_mb" in base
                            else ""
                        )
                    )
        lines.append("")
    if "fwdbwd" in results:
        r = results["fwdbwd"]
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        lines.append(
            f"training passes on one step's batch (median of {a.reps}; tokens through the model: plain "
            f"{r['tokens_plain']} padded, shared-prefix {r['tokens_packed']})"
        )
        for key, what in (("fwdbwd", "policy forward+backward"), ("ref", "reference forward (no grad)")):
            lines.append(
                f"  {what}: plain {med[f'plain_{key}']:.2f}s, shared-prefix {med[f'prefix_{key}']:.2f}s -> "
                f"{med[f'plain_{key}'] / med[f'prefix_{key}']:.2f}x faster (CPU seconds: "
                f"{med[f'plain_{key}_cpu']:.1f} vs {med[f'prefix_{key}_cpu']:.1f}, "
                f"{med[f'plain_{key}_cpu'] / med[f'prefix_{key}_cpu']:.2f}x)"
            )
    return "\n".join(lines)


def add_shape_args(p) -> None:
    """The DESIGN.md workload's model and sequence shape (shared with benchmarks/lora_memory.py)."""
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)


def parse(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="hidden 256, 4 layers, 2 prompts, 64 prompt / 32 new tokens, 2 timed steps"
    )
    p.add_argument("--loss-types", nargs="+", default=["grpo", "dapo"], choices=["grpo", "dapo", "bnpo", "dr_grpo"])
    p.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--G", type=int, default=8)
    add_shape_args(p)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="repetitions of the fwdbwd runner")
    p.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=None,
        help="ours: grpo.micro_batch_tokens (a token budget per micro-batch) instead of one micro-batch per step",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument(
        "--optim",
        default="adamw",
        choices=["adamw", "adamw_fused"],
        help="both sides: torch's default AdamW kernel, or the fused one (TRL: adamw_torch / adamw_torch_fused)",
    )
    p.add_argument("--kv-heads", type=int, default=0, help="key/value heads (GQA); 0: as many as --heads")
    p.add_argument("--tied", action="store_true", help="tie the output layer to the embeddings (as Qwen2.5-0.5B)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: both trainers on the GPU, peak CUDA memory reported (TRL without vLLM: transformers generate)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights (TRL: bf16 on too)")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="both sides recompute activations in the backward (TRL's own default is on; off here unless given)",
    )
    p.add_argument(
        "--rss-limit-mb",
        type=float,
        help="stop a runner whose RSS passes this many MB (reported as such, with the phase it was in) instead of "
        "letting the machine run out of memory",
    )
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--child", choices=(*RUNNERS, "assets"), help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--loss-type", default="grpo", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and not a.child:
        a.hidden, a.ffn, a.layers, a.heads, a.prompts, a.prompt_len, a.new_tokens, a.steps = (
            256,
            688,
            4,
            4,
            2,
            64,
            32,
            2,
        )
    return a


def require_device(device: str) -> None:
    """`--device cuda` on a machine where torch sees no GPU is one error line (also used by time_to_accuracy.py)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no GPU here; leave --device out to run on the CPU")


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    require_device(a.device)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        assets = Path(tmp)
        # built in a subprocess: a child's ru_maxrss starts at the size of the process that started it
        spawn("assets", "grpo", assets, a)
        for loss_type in a.loss_types:
            for runner in [r for r in a.runners if r != "fwdbwd"]:
                r = spawn(runner, loss_type, assets, a)
                results.setdefault(loss_type, {})[runner] = r
                if r.get("killed"):
                    print(f"[{loss_type}] {runner}: {killed_text(r, a)}", flush=True)
                    continue
                r["summary"] = summarize(r, a.warmup)
                print(
                    f"[{loss_type}] {runner}: {r['summary']['step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB"
                    + (f", peak CUDA {r['peak_cuda_mb']:.0f} MB " if "peak_cuda_mb" in r else " ")
                    + f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
        if "fwdbwd" in a.runners:
            results["fwdbwd"] = spawn("fwdbwd", "grpo", assets, a)
    print()
    print(report(results, a))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
