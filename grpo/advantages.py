"""Group-relative advantages (GRPO), multi-reward combination and the constraints' Lagrangian advantages
(their multipliers: `grpo.multipliers`).

Pure functions of tensors; no config objects. Rows are grouped: completions
``i*G ... i*G+G-1`` belong to prompt ``i`` (``G = group_size``), so ``N = P * G``.

References:
  - GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), eq. for outcome supervision:
    ``A_i = (r_i - mean(r)) / std(r)`` within the group of one prompt.
  - Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783):
    drop the std division (``scale="none"``).
  - Batch-level std: Hu et al. 2025, "REINFORCE++" (arXiv:2501.03262) and
    "Tricks or Traps? A Deep Dive into RL for LLM Reasoning" (arXiv:2508.08221): group mean,
    batch std (``scale="batch"``).
  - GDPO: Liu et al. 2026, "GDPO: Group reward-Decoupled Normalization Policy Optimization
    for Multi-reward RL Optimization" (arXiv:2601.05242): normalise each reward within the
    group before summing, then batch-normalise (``mode="normalize_then_sum"``).
  - Safe RLHF: Dai et al. 2023 (arXiv:2310.12773): PPO-Lagrangian,
    ``A = (A_r - lam * A_c) / (1 + lam)`` with ``lam`` updated by dual ascent on
    ``J_c - d``. Here it is applied to critic-free group advantages, with K costs:
    ``A = (A_r - sum_k lam_k A_k) / (1 + sum_k lam_k)``, one multiplier per constraint.
  - Constrained GRPO: Girgis et al. 2026 (arXiv:2602.05863): indicator costs for violation-rate
    constraints (``cost_signal(c, "indicator")``), and the two ways to combine (``CONSTRAINT_SCHEMES``): normalise
    each part then combine (``separate``, their "scalarized advantages", which they recommend) or
    combine raw values then normalise once (``scalarized``, their "scalarized rewards").

Registries (one signature each, see `grpo.registry.Registry`):
  - `SCALES`: ``fn(rewards[P, G], valid[P, G] bool, eps) -> advantages[P, G]``.
  - `COMBINE_MODES`: ``fn(R[N, K], weights[K], group_size, scale, eps) -> advantages[N]``.
  - `CONSTRAINT_SCHEMES`: ``fn(R[N, J] rewards, w[J], C[N, K] cost signals, mu[K] coefficients, lam[K]
    multipliers (0 = a plain penalty), floors[K], group_size, mode, scale, eps) -> advantages[N]``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from grpo.registry import Registry

Tensor = torch.Tensor

SCALES: Registry = Registry("advantage scale")
COMBINE_MODES: Registry = Registry("reward combination mode")


# ----------------------------------------------------------------------------------------
# Masked group statistics (shared by single- and multi-reward paths)


def _masked_mean(x: Tensor, valid: Tensor, dim=None) -> Tensor:
    """Mean of ``x`` over ``valid`` entries; 0 where there are none."""
    keep = dim is not None
    total = torch.where(valid, x, 0.0).sum(dim=dim, keepdim=keep)
    count = valid.to(x.dtype).sum(dim=dim, keepdim=keep)
    return total / count.clamp(min=1.0)


def _masked_std(x: Tensor, valid: Tensor, dim=None) -> Tensor:
    """Unbiased (N-1) std of ``x`` over ``valid`` entries; 0 where fewer than two."""
    keep = dim is not None
    mean = _masked_mean(x, valid, dim)
    sq = torch.where(valid, (x - mean) ** 2, 0.0).sum(dim=dim, keepdim=keep)
    count = valid.to(x.dtype).sum(dim=dim, keepdim=keep)
    var = sq / (count - 1.0).clamp(min=1.0)
    return torch.where(count > 1.0, var.sqrt(), torch.zeros_like(var))


def _divide(centered: Tensor, denom: Tensor) -> Tensor:
    """``centered / denom``, 0 where ``denom == 0`` (a constant group with ``eps=0``)."""
    return torch.where(denom > 0, centered / torch.where(denom > 0, denom, 1.0), 0.0)


@SCALES.register("group")
def _scale_group(rewards: Tensor, valid: Tensor, eps: float) -> Tensor:
    """GRPO (DeepSeekMath): ``(r - mean_group) / (std_group + eps)``."""
    mean = _masked_mean(rewards, valid, dim=-1)
    std = _masked_std(rewards, valid, dim=-1)
    return _divide(rewards - mean, std + eps)


@SCALES.register("batch")
def _scale_batch(rewards: Tensor, valid: Tensor, eps: float) -> Tensor:
    """REINFORCE++-style: group mean, std over the whole batch: ``(r - mean_group) / (std_batch + eps)``."""
    mean = _masked_mean(rewards, valid, dim=-1)
    std = _masked_std(rewards, valid)
    return _divide(rewards - mean, std + eps)


@SCALES.register("none")
def _scale_none(rewards: Tensor, valid: Tensor, eps: float) -> Tensor:
    """Dr. GRPO: ``r - mean_group``, no std division (``eps`` unused)."""
    return rewards - _masked_mean(rewards, valid, dim=-1)


def _check_groups(n: int, group_size: int) -> int:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(
            f"number of completions ({n}) is not a multiple of group_size ({group_size}); "
            f"rows i*G..i*G+G-1 must be the G completions of prompt i"
        )
    return n // group_size


def _grouped_advantages(rewards: Tensor, valid: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """Masked group normalisation of a flat ``[N]`` vector; invalid entries get 0."""
    n_groups = _check_groups(rewards.shape[0], group_size)
    scale_fn = SCALES.get(scale)
    r = torch.where(valid, rewards, 0.0).reshape(n_groups, group_size)
    v = valid.reshape(n_groups, group_size)
    adv = scale_fn(r, v, eps)
    return torch.where(v, adv, 0.0).reshape(-1)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages, GRPO outcome supervision (DeepSeekMath, arXiv:2402.03300).

    ``A_i = (r_i - mean_group(r)) / (std + eps)`` where ``std`` is the sample (N-1,
    `torch.std` default) standard deviation of the group (``scale="group"``) or of the whole
    batch (``scale="batch"``); ``scale="none"`` is Dr. GRPO (arXiv:2503.20783): ``r - mean``.
    A group of one (or a batch of one for ``batch``) has std 0, so its advantage is 0; with
    ``eps=0`` a constant group also gets 0 instead of 0/0. "Batch" means the tensor passed
    in: gather rewards from all processes first if the std should be global.

    Args:
      rewards: ``[N]`` float, one scalar reward per completion, ``N = P * group_size``;
        rows ``i*G .. i*G+G-1`` are the completions of prompt ``i``. Must be finite.
      group_size: ``G``, completions per prompt.
      scale: name in `SCALES` (``"group"``, ``"batch"``, ``"none"``).
      eps: added to the std before dividing.

    Returns:
      ``[N]`` advantages, same dtype as ``rewards``; no gradient is expected to flow.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not torch.is_floating_point(rewards):
        rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool)
    return _grouped_advantages(rewards, valid, group_size, scale, eps)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (zero advantage, no learning signal).

    Args:
      rewards: ``[N]`` rewards grouped as in `group_advantages`.
      group_size: ``G``.

    Returns:
      Python float in ``[0, 1]``; a metric (DAPO's dynamic sampling filters these groups).
    """
    n_groups = _check_groups(rewards.shape[0], group_size)
    if n_groups == 0:
        return 0.0
    g = rewards.detach().reshape(n_groups, group_size)
    flat = (g.max(dim=-1).values == g.min(dim=-1).values).float()
    return float(flat.mean().item())


# ----------------------------------------------------------------------------------------
# Several rewards R[N, K]


def _as_weights(weights, k: int, like: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).reshape(-1)
    if w.shape[0] != k:
        raise ValueError(f"got {w.shape[0]} reward weights for {k} reward columns")
    return w


@COMBINE_MODES.register("sum")
def _combine_sum(R: Tensor, w: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """Weighted sum over rewards (NaN = 0), then group-normalise (TRL / open-r1 default)."""
    total = (torch.nan_to_num(R, nan=0.0) * w).sum(dim=-1)
    return group_advantages(total, group_size, scale=scale, eps=eps)


@COMBINE_MODES.register("normalize_then_sum")
def _combine_normalize_then_sum(R: Tensor, w: Tensor, group_size: int, scale: str, eps: float) -> Tensor:
    """GDPO: group-normalise each column over its non-NaN entries, weighted sum, batch-normalise."""
    valid = ~torch.isnan(R)
    cols = [_grouped_advantages(R[:, k], valid[:, k], group_size, scale, eps) for k in range(R.shape[1])]
    total = (torch.stack(cols, dim=-1) * w).sum(dim=-1)
    everything = torch.ones_like(total, dtype=torch.bool)
    return _divide(total - total.mean(), _masked_std(total, everything) + eps)


def combine_rewards(
    R: Tensor,
    weights: Tensor | Sequence[float],
    group_size: int,
    mode: str = "sum",
    scale: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Advantages from several rewards per completion.

    Modes (registry `COMBINE_MODES`):
      - ``"sum"``: ``r = sum_k w_k R[:, k]`` then `group_advantages` (GRPO as in TRL/open-r1).
      - ``"normalize_then_sum"`` (GDPO, arXiv:2601.05242): group-normalise each column with
        ``scale``/``eps``, take the weighted sum, then batch-normalise it to mean 0 and
        (sample) std 1: ``(x - mean) / (std + eps)``. Keeps a sparse reward from being drowned
        by a dense one and stops different reward combinations collapsing to the same advantage.

    NaN entries mean "this reward does not apply to this sample" (the reward returned
    ``None``). Choice made here: in ``"sum"`` a NaN counts as 0 before summing; in
    ``"normalize_then_sum"`` a column's group mean/std use its non-NaN entries only and the
    NaN entries then contribute 0 to the weighted sum (after normalisation, so they neither
    shift nor scale that column's statistics). Every sample, including those with no
    applicable reward, takes part in the final batch normalisation.

    Args:
      R: ``[N, K]`` rewards, ``N = P * group_size``, rows grouped by prompt; NaN = not applicable.
      weights: ``[K]`` weights.
      group_size: ``G``.
      mode: name in `COMBINE_MODES`.
      scale: name in `SCALES`, used for the group step of either mode.
      eps: added to every std before dividing.

    Returns:
      ``[N]`` advantages.
    """
    if R.dim() != 2:
        raise ValueError(f"R must be 2-D [N, K], got shape {tuple(R.shape)}")
    if not torch.is_floating_point(R):
        R = R.float()
    if torch.isinf(R).any():
        raise ValueError("R contains inf; rewards must be finite (NaN marks 'not applicable')")
    combine = COMBINE_MODES.get(mode)
    SCALES.get(scale)  # fail early on a bad scale name
    _check_groups(R.shape[0], group_size)
    return combine(R, _as_weights(weights, R.shape[1], R), group_size, scale, eps)


# ----------------------------------------------------------------------------------------
# Constraints (Safe RLHF's Lagrangian on group advantages, any number of costs)

CONSTRAINT_SCHEMES: Registry = Registry("constraint advantage scheme")
COST_SIGNALS = ("cost", "indicator")


def constrained_advantages(a_useful: Tensor, a_cost: Tensor, lam) -> Tensor:
    """Safe RLHF (Dai et al. 2023, arXiv:2310.12773) advantage for the Lagrangian objective, K costs.

    ``A = (A_useful - sum_k lam_k * A_k) / (1 + sum_k lam_k)``. The ``1 + sum lam`` division keeps the
    scale of ``A`` bounded as the multipliers grow. Both inputs are critic-free group advantages (e.g.
    `group_advantages` of the rewards and of each cost, higher cost = worse).

    Args:
      a_useful: ``[N]`` advantages of the reward to maximise.
      a_cost: ``[N]`` (one cost) or ``[N, K]`` advantages of the costs to keep below their thresholds.
      lam: the multipliers ``>= 0``: a float / 0-d tensor for ``[N]`` costs, ``K`` of them for ``[N, K]``.

    Returns:
      ``[N]`` combined advantages.
    """
    one = a_cost.dim() == 1
    costs = a_cost[:, None] if one else a_cost
    if costs.dim() != 2 or costs.shape[0] != a_useful.shape[0] or a_useful.dim() != 1:
        raise ValueError(
            f"a_useful {tuple(a_useful.shape)} and a_cost {tuple(a_cost.shape)} must have the same shape "
            "([N] and [N] or [N, K])"
        )
    lam = torch.as_tensor(lam, dtype=a_useful.dtype, device=a_useful.device).reshape(-1)
    if lam.shape[0] != costs.shape[1]:
        raise ValueError(f"got {lam.shape[0]} multipliers for {costs.shape[1]} costs")
    if (lam < 0).any():
        raise ValueError(f"lam must be >= 0, got {lam.tolist()}")
    return (a_useful - costs @ lam) / (1.0 + lam.sum())


def cost_signal(cost: Tensor, signal: str) -> Tensor:
    """What a cost puts into the advantage: the cost itself (``"cost"``; the quantity of E[c] <= d) or the indicator
    ``c > 0`` (``"indicator"``; the quantity of P(c > 0) <= d, a chance constraint: Constrained GRPO's indicator
    costs, Girgis et al. 2026, arXiv:2602.05863). NaN (the cost does not apply) counts as 0."""
    if signal not in COST_SIGNALS:
        raise ValueError(f"unknown cost signal {signal!r}; valid: {', '.join(COST_SIGNALS)}")
    c = torch.nan_to_num(cost, nan=0.0)
    return (c > 0).to(c.dtype) if signal == "indicator" else c


def _separate_parts(
    R: Tensor, w: Tensor, C: Tensor, floors: Tensor, group_size: int, mode: str, scale: str, eps: float
) -> tuple[Tensor, Tensor]:
    """``A_r`` ``[N]`` from `combine_rewards` and ``A_k`` ``[N, K]``, ``(c_k - group mean) / (group std + floor_k)``."""
    a_r = (
        combine_rewards(R, w, group_size, mode=mode, scale=scale, eps=eps)
        if R.shape[1]
        else torch.zeros(C.shape[0], dtype=C.dtype)
    )
    a_c = torch.stack(
        [group_advantages(C[:, k], group_size, scale="group", eps=float(floors[k])) for k in range(C.shape[1])], dim=-1
    )
    return a_r, a_c


@CONSTRAINT_SCHEMES.register("separate")
def _scheme_separate(
    R: Tensor,
    w: Tensor,
    C: Tensor,
    mu: Tensor,
    lam: Tensor,
    floors: Tensor,
    group_size: int,
    mode: str,
    scale: str,
    eps: float,
) -> Tensor:
    """Normalise each part, then combine: ``(A_r - sum_k mu_k A_k) / (1 + sum_k lam_k)`` with ``A_r`` from
    `combine_rewards` and ``A_k = (c_k - group mean) / (group std + floor_k)`` (Safe RLHF on group advantages; what
    Constrained GRPO, arXiv:2602.05863, calls scalarised *advantages*: each multiplier weighs a unit-scale term).
    ``mu`` weighs every cost column (a multiplier, or a plain penalty's weight); ``lam`` is the multipliers, 0 for
    the columns that are not constrained."""
    a_r, a_c = _separate_parts(R, w, C, floors, group_size, mode, scale, eps)
    return (a_r - a_c @ mu) / (1.0 + lam.sum())


@CONSTRAINT_SCHEMES.register("active")
def _scheme_active(
    R: Tensor,
    w: Tensor,
    C: Tensor,
    mu: Tensor,
    lam: Tensor,
    floors: Tensor,
    group_size: int,
    mode: str,
    scale: str,
    eps: float,
) -> Tensor:
    """`separate` with each group's own normaliser: ``(A_r - sum_k mu_k A_k) / (1 + sum_k lam_k [c_k varies in the
    group])``. A group whose cost k is constant (all safe, or all unsafe) has ``A_k = 0`` there, so its reward
    advantage is not divided by that multiplier: groups the constraint has nothing to say about (math, benign
    requests) keep their full reward signal however large lambda grows, while a group that carries the constraint
    gets exactly `separate`'s convex combination. With ``kind: mean`` costs that vary in every group it is
    `separate`."""
    a_r, a_c = _separate_parts(R, w, C, floors, group_size, mode, scale, eps)
    n_groups = _check_groups(C.shape[0], group_size)
    grouped = C.reshape(n_groups, group_size, C.shape[1])
    varies = (grouped.amax(dim=1) != grouped.amin(dim=1)).to(C.dtype)  # [groups, K]
    denom = 1.0 + (varies * lam).sum(dim=-1)
    return (a_r - a_c @ mu) / denom.repeat_interleave(group_size)


@CONSTRAINT_SCHEMES.register("scalarized")
def _scheme_scalarized(
    R: Tensor,
    w: Tensor,
    C: Tensor,
    mu: Tensor,
    lam: Tensor,
    floors: Tensor,
    group_size: int,
    mode: str,
    scale: str,
    eps: float,
) -> Tensor:
    """Combine first, normalise once: ``group_advantages((r - sum_k mu_k c_k) / (1 + sum_k lam_k))``, ``r`` the
    weighted reward sum (NaN = 0). The multipliers trade raw units (reward per unit of cost), and a group's std is
    that of the combination (Constrained GRPO, arXiv:2602.05863, calls this scalarised *rewards* and shows the group
    std then reweights the terms). Needs ``mode="sum"``; the floors are unused."""
    if mode != "sum":
        raise ValueError(f"the scalarized scheme combines raw rewards: it needs mode='sum', got {mode!r}")
    total = torch.nan_to_num(R, nan=0.0) @ w if R.shape[1] else torch.zeros(C.shape[0], dtype=C.dtype)
    return group_advantages((total - C @ mu) / (1.0 + lam.sum()), group_size, scale=scale, eps=eps)


def reward_and_cost_advantages(
    R: Tensor,
    weights: Sequence[float],
    is_cost: Sequence[bool],
    group_size: int,
    *,
    mode: str = "sum",
    scale: str = "group",
    eps: float = 1e-4,
    cost_std_floor: float | Sequence[float] = 1.0,
    lam: float | Sequence[float | None] | None = None,
    signals: Sequence[str] | None = None,
    scheme: str = "separate",
) -> tuple[Tensor, dict[str, float]]:
    """Advantages ``[N]`` from rewards ``R[N, K]`` whose columns are rewards or costs (higher = worse).

    Reward columns are combined with their weights (``mode``, ``scale``, ``eps``, as `combine_rewards`). Each cost
    column ``k`` enters through `cost_signal` (``signals[k]``: ``cost`` = the cost, NaN = 0; ``indicator`` = ``c > 0``)
    with a coefficient: its multiplier ``lam_k`` when constrained, else (``lam`` None, or
    None at its place) its fixed weight, a plain penalty left out of the ``1 + sum lam`` normaliser. Scheme
    (registry `CONSTRAINT_SCHEMES`):
      - ``separate``: ``(A_r - sum_k lam_k A_k) / (1 + sum_k lam_k)``, each part group-normalised on its own (the
        costs with ``group std + cost_std_floor``: groups whose cost barely varies get ~0, not amplified noise);
      - ``active``: ``separate`` with each group divided by ``1 + sum_k lam_k`` over the costs that vary in it only
        (a group with constant costs keeps its full reward advantage);
      - ``scalarized``: ``r - sum_k lam_k c_k`` (over ``1 + sum_k lam_k``), then group-normalised once.
    Without a cost column both are the rewards' advantages alone.

    Args:
      R: ``[N, K]`` rewards, rows grouped by prompt; NaN = not applicable.
      weights: ``[K]`` weights (a cost's weight is used only when it is not constrained).
      is_cost: ``[K]`` flags; the cost columns, in column order, are the ones ``lam``, ``signals`` and
        ``cost_std_floor`` refer to.
      lam: None (no constraint), one float (one cost column) or one entry per cost column (None = not constrained).
      signals: one ``cost`` / ``indicator`` per cost column (default all ``cost``).
      cost_std_floor: one float for every cost, or one per cost column (``separate`` only).

    Returns ``(advantages, metrics)``, metrics of this batch only (the caller averages them over processes and steps
    the multipliers): ``zero_std_frac`` (groups whose weighted reward is constant; only with a reward column) and,
    for each cost column at index ``k`` of ``R``, ``cost/k`` (its mean, NaN = 0) and ``rate/k`` (fraction > 0); with
    exactly one cost column also ``cost`` and ``unsafe_rate``, the same two numbers.
    """
    if len(weights) != R.shape[1] or len(is_cost) != R.shape[1]:
        raise ValueError(f"R has {R.shape[1]} columns but {len(weights)} weights and {len(is_cost)} is_cost flags")
    cost_k = [k for k, c in enumerate(is_cost) if c]
    use_k = [k for k, c in enumerate(is_cost) if not c]
    n_cost = len(cost_k)
    lams = [lam] * n_cost if lam is None or isinstance(lam, (int, float, Tensor)) else list(lam)
    signals = list(signals) if signals is not None else ["cost"] * n_cost
    floors = [cost_std_floor] * n_cost if isinstance(cost_std_floor, (int, float)) else list(cost_std_floor)
    if not len(lams) == len(signals) == len(floors) == n_cost:
        raise ValueError(
            f"{n_cost} cost columns but {len(lams)} multipliers, {len(signals)} signals, {len(floors)} std floors"
        )
    scheme_fn = CONSTRAINT_SCHEMES.get(scheme)
    metrics: dict[str, float] = {}
    useful, w = R[:, use_k], torch.tensor([float(weights[k]) for k in use_k], dtype=R.dtype)
    if use_k:
        metrics["zero_std_frac"] = zero_std_fraction(torch.nan_to_num(useful, nan=0.0) @ w, group_size)
    if not cost_k:
        return (
            combine_rewards(useful, w, group_size, mode=mode, scale=scale, eps=eps)
            if use_k
            else torch.zeros(R.shape[0], dtype=R.dtype)
        ), metrics
    for k in cost_k:
        c = torch.nan_to_num(R[:, k], nan=0.0)
        metrics[f"cost/{k}"], metrics[f"rate/{k}"] = float(c.mean()), float((c > 0).to(c.dtype).mean())
    if n_cost == 1:
        metrics["cost"], metrics["unsafe_rate"] = metrics[f"cost/{cost_k[0]}"], metrics[f"rate/{cost_k[0]}"]
    C = torch.stack([cost_signal(R[:, k], sig) for k, sig in zip(cost_k, signals)], dim=-1)
    mu = torch.tensor([float(weights[k]) if x is None else float(x) for k, x in zip(cost_k, lams)], dtype=R.dtype)
    if any(x is not None and float(x) < 0 for x in lams):
        raise ValueError(f"lam must be >= 0, got {[float(x) for x in lams if x is not None]}")
    # the multipliers (0 for a plain penalty) in the rewards' dtype, as Safe RLHF's (1 + lam) on a tensor: the same
    # rounding as one constraint always had
    lam_t = torch.tensor([0.0 if x is None else float(x) for x in lams], dtype=R.dtype)
    return scheme_fn(
        useful, w, C, mu, lam_t, torch.tensor(floors, dtype=R.dtype), group_size, mode, scale, eps
    ), metrics
