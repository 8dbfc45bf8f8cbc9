"""Atomic checkpoints and exact resume.

A checkpoint is a folder `ckpt-<step>` holding the model (or LoRA adapter) as safetensors plus
tokenizer, and `state.pt` with the optimizer, scheduler, RNG states, step, data position and any
extra state (e.g. the Lagrange multiplier). It is written into `ckpt-<step>.tmp` and renamed when
complete, so a crash mid-write never damages the previous checkpoint; only the last `keep_last`
are kept. `state.pt` is read with `torch.load(weights_only=True)` (no pickle code execution).

Under DeepSpeed the optimizer state is sharded across ranks: every rank also writes its shard with
DeepSpeed's own `engine.save_checkpoint` into `ckpt-<step>.tmp/deepspeed/` (`start_checkpoint` on rank
0, a barrier, the shards, a barrier, then rank 0 finishes and renames), and a resume at the same
process count loads them back with `engine.load_checkpoint`, so Adam's moments continue exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from grpo.errors import UserError

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])


DEEPSPEED = "deepspeed"  # sub-folder (and DeepSpeed tag) of the sharded engine state


def _fresh_tmp(final: Path) -> Path:
    tmp = Path(final).with_name(Path(final).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def start_checkpoint(out_dir: Path, step: int) -> Path:
    """Create an empty `ckpt-<step>.tmp` (main process), for other ranks to add their shards to."""
    return _fresh_tmp(Path(out_dir) / f"ckpt-{step}")


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, state: dict, keep_last: int = 2, weights: dict | None = None,
                    started: bool = False) -> Path:
    """Write ckpt-<step> atomically (tmp folder + rename) and prune old ones. Main process only.

    `weights` overrides the model's own state dict (weights gathered from DeepSpeed ZeRO shards);
    `started`: the tmp folder was made by `start_checkpoint` and may already hold DeepSpeed shards.
    """
    final = Path(out_dir) / f"ckpt-{step}"
    with atomic_folder(final, started=started) as tmp:
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "state.pt")
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (unfinished `.tmp` folders are ignored)."""
    if not Path(out_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _NAME.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def earlier_run_problem(out_dir: Path, *, overwrite: bool, resume: bool) -> str | None:
    """A fresh (not resumed) GRPO run into a folder holding another run's checkpoints would mix the two
    (a later resume could pick the old run's latest): refuse unless run.overwrite, which removes them."""
    found = list_checkpoints(out_dir)
    if not found or resume or overwrite:
        return None
    return (f"{out_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in found)}); continue it with "
            "grpo.resume=true, or set run.overwrite=true to start over (its checkpoints are then deleted)")


def remove_checkpoints(out_dir: Path) -> int:
    """Delete every checkpoint folder (finished or not) in out_dir: the start of an overwriting run."""
    old = [p for p in Path(out_dir).iterdir() if re.match(r"ckpt-\d+(\.tmp)?$", p.name)] if Path(out_dir).is_dir() else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return len(old)


@contextlib.contextmanager
def atomic_folder(final: Path, *, started: bool = False) -> Iterator[Path]:
    """Yields an empty `<final>.tmp` to write into (`started`: the one `start_checkpoint` made, kept);
    when the block ends without error it replaces `final` whole (fsync, then rename), so the folder is
    never half-written and holds no stale files from an earlier save."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp") if started else _fresh_tmp(final)
    yield tmp
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def find_resume(out_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: None (fresh run), the latest in out_dir, or an explicit path."""
    if resume is False or resume == "":
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "latest"):
        path = Path(resume)
        if not (path / "state.pt").is_file():
            raise UserError(f"grpo.resume={resume}: not a checkpoint folder (expected {path}/state.pt)")
        return path
    found = list_checkpoints(out_dir)
    if not found:
        log.info("resume: no checkpoint in %s, starting fresh", out_dir)
        return None
    return found[-1]


def load_state(path: Path) -> dict:
    """`state.pt` of a checkpoint, read with weights_only=True: tensors and plain containers only, no code runs."""
    try:
        return torch.load(Path(path) / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for disallowed objects, RuntimeError/EOFError for damaged files
        raise UserError(f"checkpoint {path}: state.pt cannot be loaded safely ({type(e).__name__}: it holds objects other than "
                        "tensors and plain containers, or is damaged); resume from another checkpoint (grpo.resume=PATH) "
                        "or start fresh") from None
