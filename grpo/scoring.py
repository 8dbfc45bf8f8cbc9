"""Turning the recipe's `rewards:` entries into callables, and scoring a batch of completions.

Each entry is `{name, weight, role, ...kwargs}`. `name` is a registered reward (`accuracy`,
`format`, ...), a dotted path `package.module:function` (code that runs with your rights: only
point it at code you trust), or a reward-model folder / hub id (`rewards.models`). `role` is
`reward` (plain), `usefulness` (a reward model's score, higher is better) or `safety` (a cost:
higher is less safe; it drives the Lagrangian constraint and never enters the reward sum).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from grpo.config import RewardSpec, reward_label
from grpo.errors import UserError
from grpo.rules import raise_first

log = logging.getLogger(__name__)


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float
    role: str


def _label(spec: RewardSpec, i: int) -> str:
    """Metric name of a reward: a registered name, a dotted path's function, a model folder's name."""
    return reward_label(spec.name)


def build_rewards(specs: list[RewardSpec], *, device=None, load_models: bool = True, output_dir: str | None = None) -> list[Reward]:
    """Resolve every reward entry; a bad name, path or keyword argument is one clear error.

    `{output_dir}` in a name is replaced by run.output_dir (reward models trained by this run's `rm` stage).
    """
    from rewards import REWARDS, RewardError, resolve_reward

    out, seen = [], set()
    for i, spec in enumerate(specs):
        if output_dir is not None and "{output_dir}" in spec.name:
            spec = dataclasses.replace(spec, name=spec.name.replace("{output_dir}", str(output_dir)))
        label = _label(spec, i)
        if label in seen:
            label = f"{label}_{i}"
        seen.add(label)
        if _is_model_spec(spec.name):
            if not load_models:
                out.append(Reward(label, None, spec.weight, spec.role))
                continue
            from rewards.models import RewardModelScorer
            fn = RewardModelScorer.from_spec(spec, device=device)
        else:
            try:
                fn = resolve_reward(spec.name)
            except RewardError as e:
                raise UserError(f"rewards.{i}: {e}") from None
            _check_kwargs(fn, spec, i, spec.name in REWARDS)
            fn = functools.partial(fn, **spec.kwargs) if spec.kwargs else fn
        out.append(Reward(label, fn, spec.weight, spec.role))
    return out


def _is_model_spec(name: str) -> bool:
    from pathlib import Path
    return Path(name, "config.json").is_file() or name.startswith("hf:")


def _check_kwargs(fn, spec: RewardSpec, i: int, registered: bool) -> None:
    """The entry's settings fit the function (rewards.signature_problems: the rule preflight applies)."""
    from rewards import signature_problems

    raise_first(signature_problems(fn, spec.kwargs, where=f"rewards.{i} ({spec.name})", registered=registered))


def score(rewards: list[Reward], prompts: list[str], completions: list[str], columns: dict[str, list],
          *, on_error: str = "raise") -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward on the batch.

    Returns (R[N, K] with NaN where a reward returned None, ok[N] bool: False for samples whose
    reward failed and were skipped because on_error == "skip"). With on_error == "raise" a reward
    that raises, returns the wrong length or a non-finite value stops the run naming the reward and
    the sample.
    """
    from rewards import RewardError, call_reward

    n = len(completions)
    R = torch.full((n, len(rewards)), float("nan"))
    ok = torch.ones(n, dtype=torch.bool)
    for k, r in enumerate(rewards):
        try:
            R[:, k] = torch.tensor(call_reward(r.name, r.fn, prompts, completions, **columns))
        except RewardError as e:
            if on_error == "raise":
                raise UserError(f"{e} (set grpo.on_reward_error=skip to skip such samples)") from None
            log.warning("skipping samples: %s", e)
            values = _per_sample(r, prompts, completions, columns)
            for i, v in enumerate(values):
                if v is None:
                    continue  # not applicable: stays NaN in R
                if math.isfinite(v):
                    R[i, k] = v
                else:
                    ok[i] = False
    return R, ok


def _per_sample(r: Reward, prompts, completions, columns) -> list[float | None]:
    """A failing reward's values, sample by sample: NaN marks a bad one (all NaN if it raises)."""
    bad = [float("nan")] * len(completions)
    try:
        values = list(r.fn(prompts, completions, **columns))
    except Exception:
        return bad
    if len(values) != len(completions):
        return bad
    out = []
    for v in values:
        try:
            out.append(None if v is None else float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out
