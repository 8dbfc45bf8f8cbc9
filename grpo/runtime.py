"""What every stage needs before its loop: threads, seeds, the accelerator, the stage folder, the optimizer.

Stage folders: stage X of a run writes into `run.output_dir/X`. A folder that already holds a
finished stage (a `DONE` marker) is never overwritten unless `run.overwrite=true`; a folder that
holds an unfinished GRPO run is resumed from when `grpo.resume` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from grpo.errors import UserError

log = logging.getLogger(__name__)

DONE = "DONE"


def setup(seed: int, threads: int | None) -> None:
    """Seed python/numpy/torch and set the CPU thread count (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(grad_accum: int = 1):
    """An Accelerator that also works on CPU under DeepSpeed (gloo process group)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers)
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator) -> None:
    """Refuse launches where accelerate quietly set up something other than what its config asked for.

    Seen on CPU: an FSDP config gives `DistributedType.NO` (every process trains alone, gradients never
    synced) or, with ACCELERATE_USE_CPU=true, plain DDP; a DeepSpeed config with ACCELERATE_USE_CPU=true
    gives DDP. accelerate's FSDP needs GPUs, so on CPU the sharded route is DeepSpeed ZeRO.
    """
    from accelerate.utils import DistributedType

    flag = lambda name: os.environ.get(name, "false").lower() in ("true", "1", "yes")
    got = accelerator.distributed_type
    fix = "on CPU use recipes/accelerate_configs/cpu_ddp.yaml (with ACCELERATE_USE_CPU=true) or zero2.yaml/zero3.yaml"
    if flag("ACCELERATE_USE_FSDP") and got != DistributedType.FSDP:
        raise UserError(f"the accelerate config asks for FSDP but accelerate set up {got.value} "
                        f"(accelerate runs FSDP on GPUs only{'' if torch.cuda.is_available() else ' and this machine has none'}); {fix}")
    if flag("ACCELERATE_USE_DEEPSPEED") and got != DistributedType.DEEPSPEED:
        raise UserError(f"the accelerate config asks for DeepSpeed but accelerate set up {got.value}"
                        f"{' (ACCELERATE_USE_CPU=true overrides it: unset it)' if flag('ACCELERATE_USE_CPU') else ''}")
    if accelerator.num_processes > 1 and got == DistributedType.NO:
        raise UserError(f"{accelerator.num_processes} processes were launched but accelerate set up no distributed backend "
                        f"(each would train alone); {fix}")


def stage_dir(output_dir: str, stage: str, *, overwrite: bool, resume: bool = False) -> Path:
    """The folder a stage writes into; refuses to clobber a finished stage."""
    out = Path(output_dir) / stage
    if (out / DONE).exists() and not overwrite and not resume:
        raise UserError(f"{out} already holds a finished '{stage}' run; set run.overwrite=true or choose another run.output_dir")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent} (run.output_dir={output_dir}); choose a writable folder")
    return out


def mark_done(out: Path) -> None:
    (out / DONE).write_text("ok\n")


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters (no decay on biases and norms)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    kind = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[name]
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, 1))


def configure_deepspeed(accelerator, micro_batch_size: int, grad_accum: int, max_grad_norm: float) -> int:
    """Fill the DeepSpeed config's batch geometry from the recipe (no dataloader to infer it from).

    Returns the ZeRO stage (0 when DeepSpeed is not in use). A torch optimizer is passed to
    DeepSpeed, which avoids building its fused Adam; with optimizer offload that needs
    `zero_force_ds_cpu_optimizer: false`.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return 0
    cfg = plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * accelerator.num_processes
    cfg["zero_force_ds_cpu_optimizer"] = False
    if cfg.get("gradient_clipping") in (None, "auto"):
        cfg["gradient_clipping"] = max_grad_norm
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def gathered_parameters(model, zero_stage: int):
    """Context with every parameter materialised on each rank (ZeRO-3), read-only; else a no-op.

    Costs one full copy of the weights per rank for the duration (the rollout).
    """
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def place_reference(ref, accelerator, zero_stage: int):
    """Put the frozen reference policy where it costs least: sharded under ZeRO-3, else on the device.

    Under ZeRO-3 it becomes a DeepSpeed engine without an optimizer: its parameters are partitioned
    across ranks like the policy's and gathered layer by layer during its forward, instead of one
    full copy per rank. Every rank must then call its forward the same number of times (true here:
    the ranks hold the same number of micro-batches). ZeRO-3's parameter offload setting carries over.
    """
    if ref is None:
        return None
    if zero_stage != 3:
        return ref.to(accelerator.device)
    import copy

    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = {k: v for k, v in cfg["zero_optimization"].items() if k != "offload_optimizer"}
    hidden = getattr(getattr(ref, "config", None), "hidden_size", None)
    if hidden:  # shard all but vector-sized parameters (norms), whatever the policy's persistence threshold
        zero["stage3_param_persistence_threshold"] = 10 * hidden
    keep = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "steps_per_print")
    cfg = {**{k: cfg[k] for k in keep if k in cfg}, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=ref, config=cfg)
    engine.eval()
    return engine
