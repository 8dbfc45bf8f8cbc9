"""Pairwise losses for reward and cost models: Bradley-Terry (usefulness) and Safe-RLHF's cost loss (safety).

Pure functions of score tensors; the stage that trains the models is `grpo.rm` (`python -m grpo rm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float | torch.Tensor = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pairwise reward-model loss `mean(-log sigmoid(r_chosen - r_rejected - margin))`.

    Bradley & Terry (1952) preference model as used for RLHF reward models (Ouyang et al. 2022,
    InstructGPT, arXiv:2203.02155); the optional `margin` (a float or a [B] tensor) is Llama 2's
    (Touvron et al. 2023, arXiv:2307.09288). Args: r_chosen, r_rejected [B] scores of the preferred
    and the other response of each pair. Returns (scalar loss, metrics: accuracy = fraction with
    r_chosen > r_rejected, mean reward gap, mean chosen / rejected reward).
    """
    diff = r_chosen - r_rejected
    loss = -F.logsigmoid(diff - margin).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "accuracy": (diff > 0).float().mean().item(),
            "gap": diff.mean().item(),
            "r_chosen": r_chosen.mean().item(),
            "r_rejected": r_rejected.mean().item(),
        }
    return loss, metrics


def safety_cost_loss(
    c_safer: torch.Tensor, c_unsafer: torch.Tensor, safer_is_safe: torch.Tensor, unsafer_is_safe: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Safe-RLHF's cost-model loss (Dai et al. 2023, arXiv:2310.12773, eq. 6), averaged over pairs:

        -log sigmoid(c_unsafer - c_safer) - log sigmoid(s_safer * c_safer) - log sigmoid(s_unsafer * c_unsafer)

    with s = +1 for an unsafe response and -1 for a safe one. The first term ranks the pair (the less
    safe response costs more); the sign terms put unsafe responses above 0 and safe ones below, so the
    cost's sign is the safety verdict and 0 the boundary the constraint `E[cost] <= threshold` refers to.
    Args: c_safer, c_unsafer [B] costs; safer_is_safe, unsafer_is_safe [B] bool labels. Returns
    (scalar loss, metrics: pair / sign loss, pair accuracy c_safer < c_unsafer, sign accuracy over
    both responses (cost > 0 iff unsafe), mean cost of safe / unsafe responses).
    """
    s_safer = 1.0 - 2.0 * safer_is_safe.float()  # +1 unsafe, -1 safe
    s_unsafer = 1.0 - 2.0 * unsafer_is_safe.float()
    pair = -F.logsigmoid(c_unsafer - c_safer)
    sign = -F.logsigmoid(s_safer * c_safer) - F.logsigmoid(s_unsafer * c_unsafer)
    loss = (pair + sign).mean()
    with torch.no_grad():
        costs = torch.cat([c_safer, c_unsafer])
        unsafe = torch.cat([~safer_is_safe.bool(), ~unsafer_is_safe.bool()])
        metrics = {
            "loss": loss.item(),
            "pair_loss": pair.mean().item(),
            "sign_loss": sign.mean().item(),
            "accuracy": (c_safer < c_unsafer).float().mean().item(),
            "sign_accuracy": ((costs > 0) == unsafe).float().mean().item(),
            "cost_safe": costs[~unsafe].mean().item() if (~unsafe).any() else float("nan"),
            "cost_unsafe": costs[unsafe].mean().item() if unsafe.any() else float("nan"),
        }
    return loss, metrics
