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
from rewards import RewardError

log = logging.getLogger(__name__)


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float
    role: str
    timeout_s: float | None = None  # seconds one call may take (the recipe entry's timeout_s); None = no limit


def _label(spec: RewardSpec, i: int) -> str:
    """Metric name of a reward: a registered name, a dotted path's function, a model folder's name."""
    return reward_label(spec.name)


def build_rewards(
    specs: list[RewardSpec], *, device=None, load_models: bool = True, output_dir: str | None = None
) -> list[Reward]:
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
                out.append(Reward(label, None, spec.weight, spec.role, spec.timeout_s))
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
        out.append(Reward(label, fn, spec.weight, spec.role, spec.timeout_s))
    return out


def _is_model_spec(name: str) -> bool:
    from pathlib import Path

    return Path(name, "config.json").is_file() or name.startswith("hf:")


def _check_kwargs(fn, spec: RewardSpec, i: int, registered: bool) -> None:
    """The entry's settings fit the function (rewards.signature_problems: the rule preflight applies)."""
    from rewards import signature_problems

    raise_first(signature_problems(fn, spec.kwargs, where=f"rewards.{i} ({spec.name})", registered=registered))


def score(
    rewards: list[Reward],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    *,
    on_error: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward on the batch.

    Returns (R[N, K] with NaN where a reward returned None, ok[N] bool: False for samples whose
    reward failed and were skipped because on_error == "skip"). With on_error == "raise" a reward
    that raises, returns the wrong length or a non-finite value stops the run naming the reward and
    the sample.
    """
    n = len(completions)
    R = torch.full((n, len(rewards)), float("nan"))
    ok = torch.ones(n, dtype=torch.bool)
    for k, r in enumerate(rewards):
        try:
            R[:, k] = torch.tensor(call_with_timeout(r, prompts, completions, columns))
        except RewardError as e:
            if on_error == "raise":
                raise UserError(f"{e} (set grpo.on_reward_error=skip to skip such samples)") from None
            log.warning("skipping samples: %s", e)
            if isinstance(e, RewardTimedOut):  # calling it again, sample by sample, could hang again
                ok[:] = False
                continue
            values = _per_sample(r, prompts, completions, columns)
            for i, v in enumerate(values):
                if v is None:
                    continue  # not applicable: stays NaN in R
                if math.isfinite(v):
                    R[i, k] = v
                else:
                    ok[i] = False
    return R, ok


class RewardTimedOut(RewardError):
    """A reward call that outlived its timeout_s."""


class _Alarm(BaseException):
    """Raised inside a reward by SIGALRM: a BaseException, so the reward's own `except Exception` cannot swallow it."""


def call_with_timeout(r: Reward, prompts: list[str], completions: list[str], columns: dict) -> list[float]:
    """`rewards.call_reward` under the reward's `timeout_s`: a call that outlives it raises `RewardTimedOut` naming it.

    In the main thread (the CLI) a SIGALRM timer interrupts the reward where it is (a sleep, a loop, a socket
    wait); elsewhere the call runs in a daemon thread that is abandoned on expiry (the run then stops, or
    skips the call's samples).
    """
    import signal
    import threading

    from rewards import call_reward

    t = r.timeout_s
    if not t or t <= 0:
        return call_reward(r.name, r.fn, prompts, completions, **columns)
    expired = RewardTimedOut(
        f"reward {r.name!r} did not return within its timeout_s={t:g} s (a call on {len(completions)} completions); "
        f"make it faster or raise timeout_s in its recipe entry (null = no limit)"
    )
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def alarm(signum, frame):
            raise _Alarm()

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, t)
        try:
            return call_reward(r.name, r.fn, prompts, completions, **columns)
        except _Alarm:
            raise expired from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def work():
        try:
            box["values"] = call_reward(r.name, r.fn, prompts, completions, **columns)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=work, name=f"reward-{r.name}", daemon=True)
    worker.start()
    worker.join(t)
    if worker.is_alive():
        raise expired
    if "error" in box:
        raise box["error"]
    return box["values"]


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


# ---------------------------------------------------------------------------------------- reward health
SWAMP_RATIO = 1e3  # one reward's weighted spread this many times another's: the smaller one is lost in the sum
FLOAT32_EPS = 2.0**-23


@dataclass
class RewardHealth:
    """What `check_reward_health` remembers across the steps of a run."""

    step: int | None = None  # the step seen last
    signal: bool = False  # some reward applied to some sample in that step
    counted: int | None = None  # the last step counted as without any reward
    without: int = 0  # steps in a row without any applicable reward
    warned: set = dataclasses.field(default_factory=set)


def check_reward_health(R: torch.Tensor, rewards: list[Reward], step: int, state) -> None:
    """After scoring a step's completions: rewards that give no signal, or whose scale drowns the others.

    - A reward that returned None for every sample of a step: warned once (e.g. `accuracy` on data whose
      `answer` column is empty).
    - No reward applied to any sample: warned at once, and the run stops (one line) after
      `grpo.max_steps_without_reward` such steps in a row (0 = never): every advantage is 0, nothing is learnt.
    - Under `grpo.reward_mode: sum`, a reward whose weighted spread is SWAMP_RATIO times another's, or whose
      size leaves another's differences below the float32 resolution of the sum: warned once, naming both.

    `state` is the GRPO run's TrainState (its recipe, accelerator; the counters live on it). Counts of
    applicable samples are summed over processes, so every rank stops at the same step.
    """
    cfg = state.recipe.grpo
    health = vars(state).setdefault("reward_health", RewardHealth())
    cols = [k for k, r in enumerate(rewards) if r.role != "safety" and r.weight != 0]
    if not cols:
        return
    counts = (~torch.isnan(R[:, cols])).sum(0).float()
    acc = state.accelerator
    if acc.num_processes > 1:
        counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
    say = log.warning if acc.is_main_process else log.debug
    for k, c in zip(cols, counts.tolist()):
        if c == 0 and ("none", k) not in health.warned:
            health.warned.add(("none", k))
            say(
                "reward %r returned None (not applicable) for every sample at step %d; check the columns it reads in "
                "data.train",
                rewards[k].name,
                step + 1,
            )
    if step != health.step:
        health.step, health.signal = step, False
    if counts.sum() > 0:
        health.signal, health.without = True, 0
        if cfg.reward_mode == "sum" and "scale" not in health.warned:
            _check_scales(R, rewards, cols, health, say)
        return
    if health.signal or health.counted == step:
        return
    health.counted, health.without = step, health.without + 1
    names = ", ".join(repr(rewards[k].name) for k in cols)
    if health.without == 1:
        say(
            "no reward applied to any sample at step %d (%s all returned None): no learning signal; the run stops "
            "after %s such "
            "steps in a row (grpo.max_steps_without_reward)",
            step + 1,
            names,
            cfg.max_steps_without_reward or "no",
        )
    if cfg.max_steps_without_reward and health.without >= cfg.max_steps_without_reward:
        raise UserError(
            f"no reward applied to any sample in {health.without} steps in a row (steps "
            f"{step + 2 - health.without}-{step + 1}: "
            f"{names} all returned None), so nothing is learnt; check the columns the rewards read (e.g. answer) in "
            "data.train, or raise grpo.max_steps_without_reward (0 = never stop)"
        )


def _check_scales(R, rewards, cols, health, say) -> None:
    """Warn once when, in the weighted reward sum, one reward drowns another (see check_reward_health)."""
    spread, size = {}, {}
    for k in cols:
        v = R[:, k][~torch.isnan(R[:, k])].double() * rewards[k].weight
        if len(v):
            spread[k] = float(v.std()) if len(v) > 1 else 0.0
            size[k] = float(v.abs().max())
    resolution = FLOAT32_EPS * sum(size.values())  # of the float32 sum of the rewards
    for j, sj in spread.items():
        if sj == 0:
            continue
        for k in spread:
            if k == j:
                continue
            lost = resolution >= 0.01 * sj and size[k] > 1e3 * sj
            if spread[k] >= SWAMP_RATIO * sj or lost:
                health.warned.add("scale")
                say(
                    "reward %r swamps %r in the reward sum: weighted spread %.3g and size %.3g against %.3g (std), so "
                    "%r barely "
                    "moves the advantages; rescale %r (its weight) or use grpo.reward_mode=normalize_then_sum",
                    rewards[k].name,
                    rewards[j].name,
                    spread[k],
                    size[k],
                    sj,
                    rewards[j].name,
                    rewards[k].name,
                )
                return
