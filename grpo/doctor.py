"""`grpo doctor [RECIPE]`: what this machine has, and what a recipe will need, before a long run.

Prints the versions of the packages the toolkit uses (optional ones marked missing), the devices and thread
settings, whether DeepSpeed's CPU ops can be built, the free disk; with a recipe, its batch arithmetic for the
process count (`--num-processes`, else WORLD_SIZE), the memory budget of `grpo.memory` (from config.json on the
meta device: no weights are loaded) and every preflight problem, one line each with its fix. Exit code 0 when
nothing is wrong, 2 otherwise.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "deepspeed",
    "datasets",
    "safetensors",
    "wandb",
    "tensorboard",
    "trl",
    "math-verify",
)
OPTIONAL = {"deepspeed", "datasets", "wandb", "tensorboard", "trl", "math-verify"}


def environment() -> tuple[list[str], list[str]]:
    """(report lines, problems) about this machine."""
    import torch

    lines, problems = [f"python {platform.python_version()} on {platform.platform()}"], []
    for name in PACKAGES:
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            if name in OPTIONAL:
                lines.append(f"{name}: not installed (optional)")
            else:
                problems.append(f"{name} is not installed; pip install -e . (or pip install {name})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
    else:
        lines.append(
            "no CUDA device: CPU only (multi-process runs: ACCELERATE_USE_CPU=true with cpu_ddp.yaml, or "
            "zero2/zero3.yaml)"
        )
    lines.append(
        f"CPU cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}"
    )
    lines.append(_deepspeed_ops())
    return lines, problems


def _deepspeed_ops() -> str:
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # not installed, or it fails to import here
        return f"deepspeed ops: unavailable ({type(e).__name__}); ZeRO needs deepspeed (pip install deepspeed)"
    ok = CPUAdamBuilder().is_compatible(verbose=False)
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", "(unset: ~/.cache/torch_extensions)")
    return (
        f"deepspeed ops: CPU Adam {'can' if ok else 'can NOT'} be built (first use JIT-compiles ~1-2 min; "
        f"TORCH_EXTENSIONS_DIR={cache}); grpo passes a torch optimizer, so only ZeRO offload needs it"
    )


def recipe_report(recipe, world: int) -> tuple[list[str], list[str]]:
    """(report lines, problems) for a recipe on `world` processes."""
    from grpo.preflight import preflight

    g, r = recipe.grpo, recipe.rollout
    lines = []
    free = shutil.disk_usage(_existing_parent(Path(recipe.run.output_dir))).free
    lines.append(f"output {recipe.run.output_dir}: {free / 2**30:.1f} GiB free")
    per_process = g.prompts_per_step // max(world, 1) * g.num_generations
    micro = f"{g.micro_batch_tokens} packed tokens" if g.micro_batch_tokens else f"{g.micro_batch_size} completions"
    lines.append(
        f"batch on {world} process(es): {g.prompts_per_step} prompts x G={g.num_generations} = "
        f"{g.prompts_per_step * g.num_generations} completions per generation round, {per_process} per process, "
        f"micro-batches of <= {micro}; {g.num_iterations} optimizer step(s) per round; {g.steps} steps; "
        f"<= {r.max_new_tokens} new tokens each"
    )
    budget = _memory(recipe)
    if budget:
        lines.append(budget)
    problems = []
    for i, stage in enumerate(recipe.run.stages):
        problems += [f"[{stage}] {p}" for p in preflight(recipe, stage, world, earlier=tuple(recipe.run.stages[:i]))]
    return lines, list(dict.fromkeys(problems))


def _memory(recipe) -> str | None:
    """The memory budget from config.json alone (a model on the meta device), or None if the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo.memory import format_budget, memory_budget
    from grpo.modeling import DTYPES

    try:
        config = AutoConfig.from_pretrained(
            recipe.model.name_or_path, revision=recipe.model.revision, trust_remote_code=False
        )
        dtype = DTYPES[recipe.model.dtype]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
        if recipe.model.lora.enabled:
            from grpo.modeling import apply_lora

            model = apply_lora(model, recipe.model.lora)
        ref = model if recipe.grpo.beta > 0 and not recipe.model.lora.enabled else None
        return format_budget(memory_budget(model, ref, recipe), torch.device("cpu")).replace(
            "(before step 1)", "(estimate)"
        )
    except Exception as e:  # a hub id without network, a custom architecture: the budget is only a convenience
        return f"memory budget: not estimated ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
