"""What every stage needs before its loop: threads, seeds, the accelerator, the stage folder, the optimizer,
and where the models live across processes (ZeRO-3 / FSDP placement of the reference and rollout weights).

Stage folders: stage X of a run writes into `run.output_dir/X`. A folder that already holds a
finished stage (a `DONE` marker) is never overwritten unless `run.overwrite=true`; a folder that
holds an unfinished GRPO run is resumed from when `grpo.resume` is set (a fresh run into it is
refused, or deletes its checkpoints under `run.overwrite=true`: grpo.checkpoint.earlier_run_problem).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from grpo.errors import ForcedStop, UserError

log = logging.getLogger(__name__)

DONE = "DONE"


def setup(seed: int, threads: int | None) -> None:
    """Seed python/numpy/torch and set the CPU thread count (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def make_accelerator(grad_accum: int = 1):
    """An Accelerator that also works on CPU under DeepSpeed and FSDP (gloo process group).

    FSDP on CPU: accelerate only sets FSDP up on accelerators, although torch's FSDP2 (`fully_shard`)
    runs over gloo; with an FSDP config on a machine without GPUs (and more than one process) the
    FSDP plugin is switched on here, from the same FSDP_* variables `accelerate launch` sets. Every
    rank must hold real weights before `prepare` (the reference and the rollout copy are made from
    them), so FSDP's rank-0-only loading (`fsdp_cpu_ram_efficient_loading`) is turned off.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; grpo runs FSDP2: "
            "set fsdp_version: 2 (as in recipes/accelerate_configs/fsdp.yaml)"
        )
    handlers = []
    if not torch.cuda.is_available() and world > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        log.info(
            "FSDP: fsdp_cpu_ram_efficient_loading turned off (every rank loads the weights: the reference and the "
            "rollout copy need them)"
        )
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers)
    if (
        _flag("ACCELERATE_USE_FSDP")
        and not torch.cuda.is_available()
        and world > 1
        and accelerator.num_processes == world
    ):
        PartialState().distributed_type = DistributedType.FSDP  # both: AcceleratorState re-reads PartialState's
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator) -> None:
    """Refuse launches where accelerate quietly set up something other than what its config asked for.

    Seen on CPU: an FSDP config gives `DistributedType.NO` (every process trains alone, gradients never
    synced) or, with ACCELERATE_USE_CPU=true, plain DDP; a DeepSpeed config with ACCELERATE_USE_CPU=true
    gives DDP. accelerate's FSDP needs GPUs, so on CPU the sharded route is DeepSpeed ZeRO.
    """
    from accelerate.utils import DistributedType

    got = accelerator.distributed_type
    fix = "on CPU use recipes/accelerate_configs/cpu_ddp.yaml (with ACCELERATE_USE_CPU=true) or zero2.yaml/zero3.yaml"
    if _flag("ACCELERATE_USE_FSDP") and got != DistributedType.FSDP:
        raise UserError(
            f"the accelerate config asks for FSDP but accelerate set up {got.value} "
            f"(accelerate runs FSDP on GPUs only{'' if torch.cuda.is_available() else ' and this machine has none'}); "
            f"{fix}"
        )
    if _flag("ACCELERATE_USE_DEEPSPEED") and got != DistributedType.DEEPSPEED:
        raise UserError(
            f"the accelerate config asks for DeepSpeed but accelerate set up {got.value}"
            f"{' (ACCELERATE_USE_CPU=true overrides it: unset it)' if _flag('ACCELERATE_USE_CPU') else ''}"
        )
    if accelerator.num_processes > 1 and got == DistributedType.NO:
        raise UserError(
            f"{accelerator.num_processes} processes were launched but accelerate set up no distributed backend "
            f"(each would train alone); {fix}"
        )


def stage_dir(output_dir: str, stage: str, *, overwrite: bool, resume: bool = False) -> Path:
    """The folder a stage writes into, locked for this run (`lock_stage`); refuses to clobber a finished stage."""
    out = Path(output_dir) / stage
    if (out / DONE).exists() and not overwrite and not resume:
        raise UserError(
            f"{out} already holds a finished '{stage}' run; set run.overwrite=true or choose another run.output_dir"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent} (run.output_dir={output_dir}); choose a writable folder")
    lock_stage(out)
    return out


def mark_done(out: Path) -> None:
    """Mark a stage folder finished (a later run will not overwrite it) and release its lock."""
    (out / DONE).write_text("ok\n")
    release_stage(out)


# ------------------------------------------------------------------------------------- one run per stage folder
LOCK = ".lock"  # in the stage folder, while a run writes into it
_HELD: dict[Path, tuple[int | None, list[Path]]] = {}  # stage folder -> (locked fd, the folders made for it)


def lock_stage(out: Path) -> None:
    """Take the exclusive lock of a stage folder for this process (the main process of a launch), or refuse.

    Two runs writing one folder mix their checkpoints, config.yaml and metrics, and both "finish". The lock is
    an OS lock (`flock`) on `<stage>/.lock`, which holds the owner's pid, host, start time and command for the
    refusal line. The OS drops it when its process dies, however it dies, so the lock of a crashed or killed
    run is stale by construction and simply taken over. It is released by `mark_done` (or at exit); the
    `.lock` file is then removed, with the folders made for it when they are still empty. A filesystem
    without locks (some network mounts) gets a warning and no lock. Same process again: a no-op.
    """
    import fcntl

    if os.environ.get("RANK", "0").strip() not in ("0", ""):
        return
    key = Path(out).expanduser().resolve()
    if key in _HELD:
        return
    made = [p for p in [key, *key.parents] if not p.exists()][::-1]
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            _remove_empty(made)
            raise UserError(
                f"{out} is in use by another run ({holder}); wait for it to finish (or stop it), or choose another "
                "run.output_dir: two runs writing one stage folder would mix their checkpoints and metrics"
            ) from None
        except OSError as e:
            os.close(fd)
            log.warning(
                "cannot lock %s (%s): another run writing into it at the same time would not be noticed",
                path,
                e.strerror,
            )
            _HELD[key] = (None, made)
            return
        try:  # a run that just finished may have removed the file between our open and flock: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    earlier = _holder(fd)
    if earlier != "unknown":
        log.info("%s: taking over the lock of an earlier run that is gone (%s)", out, earlier)
    import json
    import socket
    import sys
    import time

    os.ftruncate(fd, 0)
    os.pwrite(
        fd,
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300],
            }
        ).encode(),
        0,
    )
    if not _HELD:
        import atexit

        atexit.register(release_all)
    _HELD[key] = (fd, made)


def release_stage(out: Path) -> None:
    """Release a stage folder's lock (if this process holds it): remove `.lock`, and the folders made for it if
    empty."""
    key = Path(out).expanduser().resolve()
    fd, made = _HELD.pop(key, (None, []))
    if fd is not None:
        try:
            os.unlink(key / LOCK)  # before unlocking: a waiting run then locks a fresh file (see lock_stage)
        except OSError:
            pass
        os.close(fd)
    _remove_empty(made)


def release_all() -> None:
    """Release every stage lock this process holds (at exit, and when the CLI stops on an error)."""
    for key in list(_HELD):
        release_stage(key)


def lock_holder(out: Path) -> str | None:
    """Who holds a stage folder's lock, if another process does (for preflight's early refusal); None if free."""
    import fcntl

    if os.environ.get("RANK", "0").strip() not in ("0", ""):
        return None  # a worker of a launch: its rank 0 holds (or takes) the lock for the whole launch
    key = Path(out).expanduser().resolve()
    if key in _HELD or not (key / LOCK).is_file():
        return None
    try:
        fd = os.open(key / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops a lock we took
    return None


def _holder(fd: int) -> str:
    import json

    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "unknown"


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):  # deepest first
        try:
            p.rmdir()
        except OSError:
            break  # not empty (the run wrote something) or gone


def build_optimizer(model, lr: float, weight_decay: float, optim: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over trainable parameters (no decay on biases and norms).

    `optim` "adamw" is torch's default kernel choice (a per-parameter loop on CPU, `foreach` on CUDA; the step's
    temporaries: `grpo.memory.optimizer_step_bytes`); "adamw_fused" is one fused kernel (`fused=True`, CPU and
    CUDA): no step-sized temporaries and a faster step, results equal to "adamw" up to the last bits (README
    "Optimizer"). transformers' Trainer, hence TRL, defaults to the fused one.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim not in ("adamw", "adamw_fused"):
        raise ValueError(f"optim must be 'adamw' or 'adamw_fused', got {optim!r}")
    fused = True if optim == "adamw_fused" else None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


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


def sharded(accelerator, zero_stage: int) -> bool:
    """Whether the prepared model's parameters are split across processes (ZeRO-3 or FSDP): then every
    rank must run its forwards together, and saving needs the weights gathered first."""
    return zero_stage == 3 or accelerator.is_fsdp2


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
    keep = (
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "bf16",
        "fp16",
        "steps_per_print",
    )
    cfg = {**{k: cfg[k] for k in keep if k in cfg}, "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=ref, config=cfg)
    engine.eval()
    return engine


def rollout_copy(model):
    """A frozen whole copy of the policy for generation under FSDP (made before `prepare` shards it).

    Generating on the FSDP-wrapped policy would run a collective in every layer of every decoding
    step, and ranks decode different numbers of steps. The copy costs one full set of weights per
    process (as ZeRO-3's gather for the rollout does, but held for the run) and is refreshed from
    the shards after every optimizer step (`copy_full_weights`).
    """
    import copy

    gen = copy.deepcopy(model).eval()
    gen.requires_grad_(False)
    return gen


def copy_full_weights(sharded, gen) -> None:
    """All ranks: gather the FSDP policy's weights whole and load them into the rollout copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    gen.load_state_dict(full)


def full_optimizer_state(model, optimizer) -> dict:
    """All ranks: the FSDP optimizer state gathered whole onto rank 0 (CPU), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model,
        getattr(optimizer, "optimizer", optimizer),
        options=StateDictOptions(full_state_dict=True, cpu_offload=True),
    )


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """All ranks: load a whole, name-keyed optimizer state into the FSDP shards (any process count)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, getattr(optimizer, "optimizer", optimizer), state, options=StateDictOptions(full_state_dict=True)
    )


def max_over_ranks(value: int, accelerator) -> int:
    """The largest `value` of any process (every rank gets the same answer)."""
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([float(value)], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, accelerator) -> bool:
    """True if `flag` holds on any process (every rank then takes the same branch: collectives stay aligned)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


class StopRequest:
    """Catches SIGTERM/SIGINT during training so the loop can checkpoint and exit cleanly.

    The first signal sets `requested`; the loop checks it after each step (all ranks agree via
    `any_rank`). A second one (SIGTERM or SIGINT: schedulers send SIGTERM again) stops at once, wherever
    the process is (a reward that never returns included), by raising `ForcedStop` (exit code 128 + signal);
    no checkpoint is written then, the earlier ones stay intact. Once the stop's checkpoint is saved
    (`winding_down`: the curves are being drawn), a signal is noted and ignored: under a launcher, the rank that
    exits first makes the launcher SIGTERM the others while they finish the same stop.
    """

    def __init__(self):
        self.requested = False
        self.winding_down = False
        self.signal = None
        self._old = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        import signal

        name = signal.Signals(signum).name
        if self.winding_down:
            log.info("%s while stopping: the checkpoint is saved, finishing", name)
            return
        if self.requested:
            raise ForcedStop(
                f"second {name}: stopped at once, without waiting for the step or saving a checkpoint (earlier "
                "checkpoints are intact: continue with grpo.resume=true)",
                code=128 + signum,
            )
        self.requested, self.signal = True, signum
        log.warning(
            "received %s: saving a checkpoint after this step, then stopping (send it again to stop at once)", name
        )

    def any_rank(self, accelerator) -> bool:
        return any_rank(self.requested, accelerator)

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
