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
import errno
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from grpo.errors import UserError, first_line

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }


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


def save_checkpoint(
    out_dir: Path,
    step: int,
    model,
    tokenizer,
    state: dict,
    keep_last: int = 2,
    weights: dict | None = None,
    started: bool = False,
) -> Path:
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
    found = [
        (int(m.group(1)), p)
        for p in Path(out_dir).iterdir()
        if (m := _NAME.match(p.name)) and (p / "state.pt").is_file()
    ]
    return [p for _, p in sorted(found)]


def earlier_run_problem(out_dir: Path, *, overwrite: bool, resume: bool) -> str | None:
    """A fresh (not resumed) GRPO run into a folder holding another run's checkpoints would mix the two
    (a later resume could pick the old run's latest): refuse unless run.overwrite, which removes them."""
    found = list_checkpoints(out_dir)
    if not found or resume or overwrite:
        return None
    return (
        f"{out_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in found)}); continue it with "
        "grpo.resume=true, or set run.overwrite=true to start over (its checkpoints are then deleted)"
    )


def remove_checkpoints(out_dir: Path) -> int:
    """Delete every checkpoint folder (finished or not) in out_dir: the start of an overwriting run."""
    old = (
        [p for p in Path(out_dir).iterdir() if re.match(r"ckpt-\d+(\.tmp)?$", p.name)] if Path(out_dir).is_dir() else []
    )
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
    try:
        yield tmp
        _fsync_dir(tmp)
    except BaseException as e:  # a failed or interrupted write leaves no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e, final.parent):
            kept = [p.name for p in list_checkpoints(final.parent)] + ([final.name] if final.exists() else [])
            raise UserError(
                f"no space left on the device while writing {final} ({type(e).__name__}: {first_line(e, 160)}); the "
                f"unfinished copy was removed{', ' + ', '.join(kept) + ' intact' if kept else ''}; free some space "
                "(or lower grpo.keep_last) and continue with grpo.resume=true"
            ) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC/EDQUOT, or a writer that hides the errno (torch.save's
    "file write failed", safetensors' "StorageFull") on a disk that is (nearly) full."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    text = str(e)
    if any(s in text for s in ("No space left", "StorageFull", "Disk quota exceeded")):
        return True
    if isinstance(e, (OSError, RuntimeError)) or "Safetensor" in type(e).__name__:
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


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
        raise UserError(
            f"checkpoint {path}: state.pt cannot be loaded safely ({type(e).__name__}: it holds objects other than "
            "tensors and plain containers, or is damaged); resume from another checkpoint (grpo.resume=PATH) "
            "or start fresh"
        ) from None


# ---------------------------------------------------------------------------------------- resuming with a changed
# recipe
# What a resumed run must keep to continue the same optimisation exactly: the batch geometry, the loss, the
# model (the reference policy is loaded from it) and its adapter. Anything else may change, with a warning.
RESUME_FIXED = (
    "grpo.prompts_per_step",
    "grpo.num_generations",
    "grpo.num_iterations",
    "grpo.loss_type",
    "grpo.importance_level",
    "grpo.scale",
    "grpo.reward_mode",
    "grpo.beta",
    "grpo.epsilon_low",
    "grpo.epsilon_high",
    "model.name_or_path",
    "model.dtype",
    "model.lora",
)
# settings that do not touch the GRPO run (or are expected to change when resuming)
RESUME_IGNORED = (
    "grpo.resume",
    "run.overwrite",
    "run.stages",
    "run.threads",
    "run.output_dir",
    "tracking",
    "eval",
    "sft",
    "rm",
    "data.sft_train",
    "data.sft_eval",
    "data.eval",
)


def _flat(d, prefix: str = "") -> dict:
    """{dotted key: value} of a nested config; lists of mappings by index (rewards.0.weight)."""
    items = d.items() if isinstance(d, dict) else enumerate(d)
    out = {}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def resume_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, warned): `key: old -> new` for each setting that differs between the config.yaml a run was started
    with and the recipe resuming it (both redacted: a `<redacted>` secret compares equal to anything)."""
    a, b = _flat(old), _flat(new)
    refused, warned = [], []
    for key in sorted(set(a) | set(b)):
        if (
            key.startswith(RESUME_IGNORED)
            or a.get(key) == b.get(key)
            or "<redacted>" in (str(a.get(key)), str(b.get(key)))
        ):
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        (refused if key.startswith(RESUME_FIXED) else warned).append(line)
    return refused, warned


def resume_recipe_problem(new: dict, ckpt: Path) -> tuple[str | None, list[str]]:
    """(the refusal line or None, the warned changes) for resuming from `ckpt` with the recipe `new` (recipe_to_dict),
    compared with the config.yaml of the run that wrote it (none to compare: nothing to say)."""
    import yaml

    from grpo.recipe_yaml import redact

    saved = Path(ckpt).parent / "config.yaml"
    try:
        old = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        old = None
    if not isinstance(old, dict):
        return None, []
    refused, warned = resume_changes(old, redact(new))
    if refused:
        return (
            f"grpo.resume: {ckpt} was written by a run with other settings ({'; '.join(refused)}); a resumed run must "
            "keep the "
            "batch geometry, the loss and the model to continue exactly: restore them, or start a new run (another "
            "run.output_dir, or run.overwrite=true)"
        ), warned
    return None, warned


def check_resumed_recipe(new: dict, ckpt: Path, out: Path, *, main: bool = True) -> None:
    """Refuse a resume whose recipe changes what exactness needs (`RESUME_FIXED`); warn on other changes and keep
    the earlier config.yaml as `config.before-resume-<step>.yaml` next to the new one (main process only)."""
    problem, warned = resume_recipe_problem(new, ckpt)
    if problem:
        raise UserError(problem)
    if not warned or not main:
        return
    kept = Path(out) / f"config.before-resume-{Path(ckpt).name.removeprefix('ckpt-')}.yaml"
    if (Path(out) / "config.yaml").is_file():
        shutil.copyfile(Path(out) / "config.yaml", kept)
    log.warning(
        "resuming from %s with a changed recipe (%s); the earlier config is kept as %s",
        ckpt,
        "; ".join(warned),
        kept.name,
    )
