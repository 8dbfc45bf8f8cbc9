"""The constraints' Lagrange multipliers: Safe RLHF's dual ascent, one multiplier per constraint, and their
checkpoint state (`grpo.advantages.reward_and_cost_advantages` takes their values)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from torch import Tensor


@dataclass
class LagrangeMultiplier:
    """Safe RLHF's Lagrange multiplier ``lam = exp(log_lam)``, updated by dual ascent.

    ``update(mean_cost)``: ``log_lam += lr * (measure - threshold)``, clamped to
    ``<= log(lam_max)``, where ``measure`` is the step's mean cost or, with ``smoothing`` s > 0, its exponential
    moving average ``ema = s * ema + (1 - s) * mean_cost`` (the first step's value starts it). No lower bound is
    needed: ``lam = exp(.) > 0``. The first
    ``delay_steps`` calls only count (Safe RLHF's ``lambda_update_delay_steps``), letting the
    policy move before the constraint reacts. Parametrising in log space keeps ``lam`` positive
    (Safe RLHF, arXiv:2310.12773, Sec. 3; it uses Adam on ``log_lam``, we use plain SGD).

    Fields:
      log_lam: current ``log(lam)``; 0.0 means ``lam = 1``.
      lr: dual step size in log space.
      threshold: cost budget ``d``; ``lam`` grows while mean cost exceeds it.
      lam_max: upper bound on ``lam``.
      delay_steps: number of initial `update` calls that do not change ``lam``.
      smoothing: weight of the past in the moving average lambda follows (0: the step's own measure).
      step: number of `update` calls so far (checkpointed).
      ema: the moving average so far (checkpointed).
    """

    log_lam: float = 0.0
    lr: float = 0.1
    threshold: float = 0.0
    lam_max: float = 10.0
    delay_steps: int = 0
    smoothing: float = 0.0
    step: int = 0
    ema: float = 0.0

    def __post_init__(self) -> None:
        if not self.lam_max > 0:
            raise ValueError(f"lam_max must be > 0, got {self.lam_max}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.delay_steps < 0:
            raise ValueError(f"delay_steps must be >= 0, got {self.delay_steps}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        self.log_lam = min(float(self.log_lam), math.log(self.lam_max))

    @classmethod
    def from_lambda(cls, lam_init: float = 1.0, **kwargs) -> "LagrangeMultiplier":
        """Builds one from an initial ``lam`` (> 0) instead of ``log_lam``."""
        if not lam_init > 0:
            raise ValueError(f"lam_init must be > 0, got {lam_init}")
        return cls(log_lam=math.log(lam_init), **kwargs)

    @property
    def lam(self) -> float:
        """Current multiplier ``exp(log_lam)``."""
        return math.exp(self.log_lam)

    def update(self, mean_cost: float | Tensor) -> float:
        """One dual-ascent step on the batch's mean cost; returns the new ``lam``.

        Args:
          mean_cost: mean cost of the batch (python float or 0-d tensor; averaged across
            processes by the caller so every rank takes the same step).
        """
        mean_cost = float(mean_cost)
        if not math.isfinite(mean_cost):
            raise ValueError(f"mean_cost must be finite, got {mean_cost}")
        self.step += 1
        self.ema = mean_cost if self.step == 1 else self.smoothing * self.ema + (1 - self.smoothing) * mean_cost
        if self.step > self.delay_steps:
            self.log_lam = min(self.log_lam + self.lr * (self.ema - self.threshold), math.log(self.lam_max))
        return self.lam

    def state_dict(self) -> dict[str, float | int]:
        """All fields, for exact resume."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restores every field saved by `state_dict`; unknown keys are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise KeyError(f"unknown LagrangeMultiplier state keys {unknown}; valid: {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


def multipliers_state_dict(multipliers: dict[str, LagrangeMultiplier]) -> dict[str, dict]:
    """Every multiplier's state by constraint name, for exact resume."""
    return {name: m.state_dict() for name, m in multipliers.items()}


def load_multipliers(multipliers: dict[str, LagrangeMultiplier], state: dict) -> None:
    """Restore every multiplier from `multipliers_state_dict` output, or from one `LagrangeMultiplier.state_dict()`
    (checkpoints written before there could be several constraints), which fits a run with exactly one.

    Raises ValueError when the names differ (a constraint added, removed or renamed since the checkpoint)."""
    if "log_lam" in state:
        if len(multipliers) != 1:
            raise ValueError(
                f"the checkpoint holds one multiplier (the safety constraint); this run has {len(multipliers)}: "
                f"{', '.join(multipliers) or 'none'}"
            )
        next(iter(multipliers.values())).load_state_dict(state)
        return
    if set(state) != set(multipliers):
        raise ValueError(
            f"the checkpoint holds multipliers for constraints {sorted(state)}; this run has {sorted(multipliers)}"
        )
    for name, m in multipliers.items():
        m.load_state_dict(state[name])
