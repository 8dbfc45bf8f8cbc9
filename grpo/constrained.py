"""A GRPO step's advantages under the run's constraints, and each multiplier's dual step.

The math is `grpo.advantages.reward_and_cost_advantages` and `grpo.multipliers.LagrangeMultiplier`; this module
feeds them the step's reward matrix in their column order, restricts a constraint with `where` to the prompts it
is about, and measures each constraint over every process, so every rank moves every multiplier identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.advantages import reward_and_cost_advantages
from grpo.batch import Rollouts
from grpo.config import cost_signal_of, resolved_constraints, std_floor_of, where_matches
from grpo.train_state import TrainState


def step_advantages(s: TrainState, r: Rollouts) -> tuple[torch.Tensor, dict]:
    """Group advantages of the step (skipped samples get 0) under the run's constraints; each multiplier's dual step.

    Each constraint's measure (its cost's mean, or the fraction of samples with cost > 0) is taken over all
    processes, so every rank moves every multiplier identically; the ranks' multipliers are compared in the same
    collective, and a mismatch stops the run. A constraint with `where` is measured over the samples of the prompts
    it selects (a sum and a count from every process), and its cost is not applicable (NaN: 0 in the advantage)
    anywhere else; a step without one of its prompts leaves its multiplier alone and logs no `constraint/<name>`.
    """
    cfg, cols = s.recipe.grpo, cost_columns(s)
    cons = resolved_constraints(s.recipe)
    lam = [s.multipliers[name].lam for name, _, _ in cons]
    R = r.rewards[:, cols.order]  # a copy: the where-masking below leaves r.rewards as scored
    G = cfg.num_generations
    masks = [
        torch.tensor([where_matches(c.where, r.rows[i // G]) for i in range(R.shape[0])]) if c.where else None
        for _, c, _ in cons
    ]
    for i, mask in enumerate(masks):
        if mask is not None:
            R[~mask, cols.n_rewards + i] = float("nan")
    adv, m = reward_and_cost_advantages(
        R,
        [s.rewards[k].weight for k in cols.order],
        [i >= cols.n_rewards for i in range(len(cols.order))],
        G,
        mode=cfg.reward_mode,
        scale=cfg.scale,
        eps=cfg.eps,
        scheme=cfg.constraint_scheme,
        lam=lam + [None] * len(cols.free),
        signals=[cost_signal_of(c) for _, c, _ in cons] + ["cost"] * len(cols.free),
        cost_std_floor=[std_floor_of(c) for _, c, _ in cons] + [s.recipe.safety.cost_std_floor] * len(cols.free),
    )
    stats = {key: v for key, v in m.items() if key.startswith(("cost", "rate", "unsafe_rate"))}
    metrics = {key: v for key, v in m.items() if key not in stats}
    values = []  # per constraint: its measure (no where), or the sum and the count over its prompts' samples
    for i, ((_, c, _), mask) in enumerate(zip(cons, masks)):
        if mask is None:
            values.append(stats[f"{'rate' if c.kind == 'rate' else 'cost'}/{cols.n_rewards + i}"])
        else:
            cost = torch.nan_to_num(R[mask, cols.n_rewards + i].double(), nan=0.0)
            values += [float((cost > 0).sum() if c.kind == "rate" else cost.sum()), float(mask.sum())]
    if cols.safety is not None:  # the role: safety cost, constrained or not: its mean and its fraction > 0, all samples
        values += mean_and_rate(r.rewards[:, cols.order[cols.safety]])
    agreed = agree_on_ranks(s, values, [s.multipliers[name].log_lam for name, _, _ in cons])
    if cols.safety is not None:
        metrics["cost"], metrics["unsafe_rate"] = agreed[-2:]
    at = 0
    for (name, c, _), mask, used in zip(cons, masks, lam):
        if mask is None:
            value, at = agreed[at], at + 1
        else:  # means over processes of sums and counts: their ratio is the measure over all processes' samples
            total, count, at = agreed[at], agreed[at + 1], at + 2
            value = total / count if count > 0 else None
        metrics[f"lambda/{name}"] = used
        if value is not None:
            s.multipliers[name].update(value)
            metrics.update({f"constraint/{name}": value, f"violation/{name}": float(value > c.threshold)})
    if cons and not s.recipe.constraints:  # the old safety section: its metric names as they were
        metrics.update({"lambda": lam[0], "constraint_violation": metrics[f"violation/{cons[0][0]}"]})
    return adv * r.ok, metrics


def mean_and_rate(cost: torch.Tensor) -> list[float]:
    """A cost column's mean and fraction > 0 (NaN counts as 0), as `reward_and_cost_advantages` reports them."""
    c = torch.nan_to_num(cost, nan=0.0)
    return [float(c.mean()), float((c > 0).to(c.dtype).mean())]


@dataclass
class CostColumns:
    """Columns of the step's reward matrix, reordered for `reward_and_cost_advantages`: the rewards (in recipe order),
    then one column per constraint (its reward, repeated if two constraints share it), then the role: safety
    rewards no constraint names (a plain penalty of their weight). `safety`: where the role: safety cost sits."""

    order: list[int]
    n_rewards: int
    free: list[int]
    safety: int | None


def cost_columns(s: TrainState) -> CostColumns:
    constrained = [col for _, _, col in resolved_constraints(s.recipe)]
    plain = [k for k, x in enumerate(s.rewards) if x.role != "safety" and k not in constrained]
    free = [k for k, x in enumerate(s.rewards) if x.role == "safety" and k not in constrained]
    order = plain + constrained + free
    safety = next((i for i, k in enumerate(order) if i >= len(plain) and s.rewards[k].role == "safety"), None)
    return CostColumns(order, len(plain), free, safety)


def agree_on_ranks(s: TrainState, values: list[float], log_lams: list[float]) -> list[float]:
    """`values` averaged over processes (one collective that also brings every rank's multipliers, which must agree)."""
    if s.world == 1 or not (values or log_lams):
        return values
    both = torch.tensor(values + log_lams, dtype=torch.float64, device=s.accelerator.device)
    rows = s.accelerator.gather(both[None]).reshape(s.world, -1).cpu()
    lams = rows[:, len(values) :]
    if not torch.equal(lams, lams[:1].expand_as(lams)):
        raise RuntimeError(
            f"the Lagrange multipliers differ across processes (log lambda per rank: {lams.tolist()}); a bug"
        )
    return rows[:, : len(values)].mean(dim=0).tolist()
