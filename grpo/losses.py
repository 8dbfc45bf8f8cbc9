"""GRPO-family policy losses: clipped surrogate, k3 KL penalty, and loss aggregation.

Pure functions of tensors (shapes below); no config objects. Aggregation is ONE registered
function per ``loss_type`` (registry `AGGREGATIONS`), and token- vs sequence-level
importance ratios are registered in `IMPORTANCE_LEVELS`, so `policy_loss` has no
``if loss_type`` branches.

Shapes: ``B`` sequences (completions) of up to ``T`` completion tokens. ``mask[b, t]`` is
1/True for a real completion token of sequence ``b`` and 0/False for padding (and for
prompt tokens, which never enter the loss). Values at masked-out positions are ignored.

References:
  - PPO clipped surrogate: Schulman et al. 2017 (arXiv:1707.06347).
  - GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300): per-sequence token mean,
    then mean over sequences; k3 KL estimator ``exp(q - p) - (q - p) - 1`` (Schulman 2020,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html).
  - DAPO: Yu et al. 2025 (arXiv:2503.14476): decoupled clip range (``epsilon_high`` >
    ``epsilon_low``, "clip-higher") and token-level loss over the whole step.
  - Dr. GRPO: Liu et al. 2025 (arXiv:2503.20783): constant normaliser
    ``n_seqs * max_completion_length`` removes the length bias.
  - GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071):
    sequence-level importance ratio ``s_i = exp(mean_t(logp - old_logp))``.
"""

from __future__ import annotations

import torch

from grpo.registry import Registry

Tensor = torch.Tensor

AGGREGATIONS: Registry = Registry("loss type")
IMPORTANCE_LEVELS: Registry = Registry("importance level")


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020; DeepSeekMath eq. 4).

    ``k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1``: unbiased for the KL when tokens
    are sampled from ``pi``, always ``>= 0``, and exactly 0 where ``logp == ref_logp``.

    Args:
      logp: ``[...]`` log-probs of the sampled tokens under the policy.
      ref_logp: ``[...]`` log-probs of the same tokens under the reference policy.

    Returns:
      ``[...]`` per-token estimates. Gradients flow into whichever input requires grad;
      `policy_loss` detaches ``ref_logp``.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


# ----------------------------------------------------------------------------------------
# Importance ratios: fn(logp[B, T], old_logp[B, T], mask[B, T] bool) -> log_ratio[B, T]


@IMPORTANCE_LEVELS.register("token")
def _token_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """PPO/GRPO: ``log r_t = logp_t - old_logp_t``."""
    return logp - old_logp


@IMPORTANCE_LEVELS.register("sequence")
def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO: ``log s_i,t = sg[log s_i] + logp_t - sg[logp_t]``.

    ``log s_i = mean over masked t of (logp_t - old_logp_t)``. The value of every token's
    ratio is ``s_i``; the stop-gradient form (the paper's GSPO-token formulation) makes the
    gradient flow token-wise, ``d s_i,t / d logp_t = s_i``. With the ``grpo`` aggregation
    (token mean per sequence) this gives exactly GSPO's sequence-level gradient.
    """
    diff = torch.where(mask, logp - old_logp, 0.0)
    seq = diff.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return seq.detach().unsqueeze(-1) + logp - logp.detach()


# ----------------------------------------------------------------------------------------
# Aggregations: fn(per_token_loss[B, T], mask[B, T] float, *, max_completion_length,
# num_tokens, local_tokens, num_sequences, num_processes) -> scalar
#
# Each returns this (micro-)batch's exact share of the optimizer step's loss: summed over the
# step's micro-batches on one process, and averaged over processes (DDP / DeepSpeed / FSDP average
# gradients), the shares give the loss the docstring defines, however the step was split. The step
# counts default to this batch's own (one call = one whole step on one process).


@AGGREGATIONS.register("grpo")
def _aggregate_grpo(loss: Tensor, mask: Tensor, *, num_sequences=None, **_) -> Tensor:
    """DeepSeekMath: mean over sequences of (sum_t m*l / sum_t m).

    Divided by this process's sequences in the step; every process has the same number of
    sequences, so the average over processes is the mean over all of them.
    """
    per_seq = (loss * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
    return per_seq.sum() / _count(num_sequences, loss.shape[0], "num_sequences")


@AGGREGATIONS.register("bnpo")
def _aggregate_bnpo(loss: Tensor, mask: Tensor, *, local_tokens=None, **_) -> Tensor:
    """Token mean over this process's batch: sum(m*l) / sum(m) (TRL's "local batch" normaliser)."""
    return (loss * mask).sum() / _count(local_tokens, mask.sum(), "local_tokens").clamp(min=1.0)


@AGGREGATIONS.register("dr_grpo")
def _aggregate_dr_grpo(loss: Tensor, mask: Tensor, *, max_completion_length=None, num_sequences=None, **_) -> Tensor:
    """Dr. GRPO: sum(m*l) / (n_seqs * max_completion_length), a length-independent constant."""
    if max_completion_length is None or int(max_completion_length) < 1:
        raise ValueError(
            "loss_type='dr_grpo' needs max_completion_length (the generation budget, e.g. "
            f"max_new_tokens) as a positive int, got {max_completion_length!r}"
        )
    return (loss * mask).sum() / (_count(num_sequences, loss.shape[0], "num_sequences") * int(max_completion_length))


@AGGREGATIONS.register("dapo")
def _aggregate_dapo(loss: Tensor, mask: Tensor, *, num_tokens=None, num_processes=1, **_) -> Tensor:
    """DAPO: sum(m*l) / num_tokens, num_tokens = completion tokens of the whole optimizer step on all
    processes; times num_processes, which the processes' gradient average divides out again."""
    denom = _count(num_tokens, mask.sum(), "num_tokens").to(loss.dtype)
    return (loss * mask).sum() / denom.clamp(min=1.0) * int(num_processes)


def _count(value, default: Tensor | int, name: str) -> Tensor:
    """A step count as a 0-d tensor (default: this batch's own)."""
    if value is None:
        return torch.as_tensor(default)
    t = torch.as_tensor(value)
    if t.numel() != 1 or float(t) < 0:
        raise ValueError(f"{name} must be a non-negative scalar, got {value!r}")
    return t.reshape(())


# ----------------------------------------------------------------------------------------


def _check_shapes(logp: Tensor, advantages: Tensor, mask: Tensor, **others) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match logp {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    for name, value in others.items():
        if value is not None and value.shape != logp.shape:
            raise ValueError(f"{name} {tuple(value.shape)} must match logp {tuple(logp.shape)}")


@torch.no_grad()
def _metrics(ratio, adv, mask, eps_low, eps_high, kl, entropy) -> dict[str, float]:
    n = mask.sum().clamp(min=1.0)

    def masked_mean(x: Tensor) -> float:
        return float((torch.where(mask > 0, x.float(), 0.0)).sum() / n)

    low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
    metrics = {
        "clip_frac_low": masked_mean(low),
        "clip_frac_high": masked_mean(high),
        "ratio_mean": masked_mean(ratio),
        "tokens": float(mask.sum()),  # the weight of these means when combining micro-batches and ranks
    }
    metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy)
    return metrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    local_tokens: int | float | Tensor | None = None,
    num_sequences: int | None = None,
    num_processes: int = 1,
    entropy: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-surrogate GRPO loss with optional k3 KL penalty (DeepSeekMath eq. 3).

    Per token: ``l = -min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * k3``
    with ``r = exp(logp - old_logp)`` (``importance_level="token"``) or GSPO's sequence ratio
    ``s_i = exp(mean_t(logp - old_logp))`` for every token of sequence ``i``
    (``"sequence"``, implemented with GSPO's stop-gradient form so the gradient flows per
    token; see `_sequence_log_ratio`). Then ``loss = AGGREGATIONS[loss_type](l, mask)``:
      - ``grpo``: mean over sequences of ``sum_t m*l / sum_t m`` (DeepSeekMath);
      - ``bnpo``: ``sum(m*l) / sum(m)``;
      - ``dr_grpo``: ``sum(m*l) / (B * max_completion_length)`` (Dr. GRPO);
      - ``dapo``: ``sum(m*l) / num_tokens`` (DAPO), ``num_tokens`` defaulting to ``sum(m)``.

    Split steps: the aggregation owns its normaliser. Given the step's counts (``num_sequences``
    and ``local_tokens`` of this process, ``num_tokens`` of all processes, ``num_processes``), the
    returned value is this micro-batch's exact share of the step loss: summing the shares of a
    process's micro-batches and averaging over processes (as DDP/DeepSpeed/FSDP average
    gradients) gives the loss above for any split. A framework that divides each micro-batch's
    loss by the accumulation steps (accelerate does) must be undone by the caller.

    Gradients flow only through ``logp``; ``old_logp``, ``ref_logp``, ``advantages`` and
    ``entropy`` are treated as constants (detached). Computation is in float32.

    Args:
      logp: ``[B, T]`` log-probs of the sampled completion tokens under the current policy.
      old_logp: ``[B, T]`` log-probs under the policy that generated the samples, or ``None``
        for on-policy (one update per generation): then ``logp.detach()`` is used, so
        ``r == 1`` in value but the gradient is ``A * d logp``.
      advantages: ``[B]`` one advantage per sequence (e.g. `grpo.advantages.group_advantages`).
      mask: ``[B, T]`` bool or {0, 1}: 1 for completion tokens, 0 for padding.
      loss_type: name in `AGGREGATIONS`.
      epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]``.
      beta: KL coefficient; ``> 0`` requires ``ref_logp``.
      ref_logp: ``[B, T]`` reference-policy log-probs, or ``None``. When given the ``kl``
        metric is reported even if ``beta == 0``.
      importance_level: name in `IMPORTANCE_LEVELS` (``"token"`` or ``"sequence"``).
      max_completion_length: generation budget, required by ``dr_grpo``.
      num_tokens: completion tokens of the whole optimizer step (all processes, all
        accumulation micro-batches), used by ``dapo``; default ``sum(mask)``.
      local_tokens: completion tokens of this process's step (``bnpo``); default ``sum(mask)``.
      num_sequences: sequences of this process's step (``grpo``, ``dr_grpo``); default ``B``.
      num_processes: processes averaging gradients (``dapo``); default 1.
      entropy: optional ``[B, T]`` per-token entropies (`grpo.logprobs.entropy_from_logits`),
        only for the ``entropy`` metric.
      is_weights: optional ``[B, T]`` importance weights multiplying each token's surrogate term
        (not the KL term), e.g. `rollout_correction`'s truncated IS weights; treated as constants.

    Returns:
      ``(loss, metrics)``: scalar float32 loss; python floats computed without grad:
      ``clip_frac_low`` (masked fraction with ``r < 1 - epsilon_low`` and ``A < 0``),
      ``clip_frac_high`` (``r > 1 + epsilon_high`` and ``A > 0``), ``clip_frac`` (their sum),
      ``ratio_mean``, ``kl`` (mean masked k3, only with ``ref_logp``), ``entropy`` (only with
      ``entropy``).
    """
    aggregate = AGGREGATIONS.get(loss_type)
    log_ratio_fn = IMPORTANCE_LEVELS.get(importance_level)
    _check_shapes(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy, is_weights=is_weights)
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ValueError(f"need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-policy log-probs); pass it or set beta=0")

    valid = mask.bool()
    m = valid.float()
    logp = logp.float()
    old = logp.detach() if old_logp is None else old_logp.detach().float()
    adv = advantages.detach().float().unsqueeze(-1)

    # zero the log-ratio on padding so exp() cannot overflow there
    log_ratio = torch.where(valid, log_ratio_fn(logp, old, valid), 0.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().float()

    kl = None
    if ref_logp is not None:
        ref = ref_logp.detach().float()
        kl = kl_k3(torch.where(valid, logp, 0.0), torch.where(valid, ref, 0.0))
        if beta != 0.0:
            per_token = per_token + beta * kl

    loss = aggregate(
        per_token,
        m,
        max_completion_length=max_completion_length,
        num_tokens=num_tokens,
        local_tokens=local_tokens,
        num_sequences=num_sequences,
        num_processes=num_processes,
    )
    metrics = _metrics(ratio, adv, m, epsilon_low, epsilon_high, kl, None if entropy is None else entropy.detach())
    return loss, metrics


ROLLOUT_IS = ("none", "tis")


@torch.no_grad()
def rollout_correction(
    train_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, mode: str = "none", cap: float = 2.0
) -> tuple[Tensor | None, dict[str, float]]:
    """Rollout/training mismatch: the KL between the sampler's and the trainer's distribution, and
    truncated importance sampling (TIS) weights that correct for it.

    The rollout engine samples with its own forward (low precision, other kernels); the trainer's
    forward of the same tokens gives other log-probs. Per token ``d = train_logp - rollout_logp``:
      ``mismatch_kl`` = masked mean of ``exp(d) - d - 1`` (k3 estimate of KL(rollout || train), the
      tokens being drawn from the rollout; 0 iff they agree);
      ``tis`` (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
      training"; verl / OpenRLHF's ``rollout_is``): weights ``min(exp(d), cap)``, the IS ratio from the
      sampling distribution to the trainer's old policy, truncated to bound its variance.
    Note: the engine's log-probs are those of the distribution it sampled from, after top-k/top-p and
    min_new_tokens filtering (grpo.rollout.base), so with filtering on the mismatch includes it.

    Args: ``[B, T]`` tensors (mask 1 on scored tokens); mode: ``"none"`` or ``"tis"``; cap > 0.
    Returns ``(weights [B, T] or None, metrics)``: ``mismatch_kl``, ``tokens``, and with tis
    ``is_weight_mean`` and ``is_capped_frac``.
    """
    if mode not in ROLLOUT_IS:
        raise ValueError(f"unknown rollout_is {mode!r}; valid: {', '.join(ROLLOUT_IS)}")
    valid = mask.bool()
    n = valid.sum().clamp(min=1)
    d = torch.where(valid, train_logp.float() - rollout_logp.float(), 0.0)
    metrics = {"mismatch_kl": float((torch.exp(d) - d - 1.0).sum() / n), "tokens": float(valid.sum())}
    if mode == "none":
        return None, metrics
    if not cap > 0:
        raise ValueError(f"rollout_is_cap must be > 0, got {cap}")
    raw = torch.exp(d)
    weights = torch.where(valid, raw.clamp(max=cap), 0.0)
    metrics.update(
        {"is_weight_mean": float(weights.sum() / n), "is_capped_frac": float(((raw > cap) & valid).sum() / n)}
    )
    return weights, metrics
