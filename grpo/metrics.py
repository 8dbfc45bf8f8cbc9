"""What a GRPO step reports: reward statistics, per-token means over all ranks, the console line,
the curves drawn as PNGs, and the end-of-run parameter checksums that show the ranks agree."""

from __future__ import annotations

import math

import torch

from grpo import runtime


def curves(rewards, constraints=()) -> dict[str, list[str]]:
    """The PNG the tracker draws at the end of a run: its name and the metrics plotted in it (`constraints`: the
    names of the run's constraints, each drawn as its measured value and its multiplier)."""
    return {
        "reward_curves": [
            "reward",
            *[x.name for x in rewards],
            "kl",
            "lambda",
            *[k for name in constraints for k in (f"constraint/{name}", f"lambda/{name}")],
            "cost",
            "unsafe_rate",
            "completion_len",
            "clip_frac",
            "adv_abs_mean",
            "tokens_per_s",
        ],
        "eval_curves": [
            "eval/accuracy",
            "eval/unsafe_compliance",
            "eval/over_refusal",
            *[f"eval/constraint/{name}" for name in constraints],
            *[f"eval/reward/{x.name}" for x in rewards],
            "eval/completion_len",
        ],
    }


CHECKSUM_CHUNK = 1 << 20  # elements per float64 chunk (8 MiB)


def _sums(p: torch.Tensor) -> tuple[float, float]:
    """(sum, abs-sum) of `p` in float64, a chunk at a time: a float64 copy of a whole tensor would be 2x (fp32) to 4x
    (bf16) its size, twice (sum and abs), at the very end of a run (an embedding of 152k x 3584 in bf16: +8.8 GB)."""
    total = absolute = 0.0
    for chunk in p.detach().reshape(-1).split(CHECKSUM_CHUNK):
        c = chunk.double()
        total += float(c.sum())
        absolute += float(c.abs().sum())
    return total, absolute


def run_info(model, accelerator, zero_stage: int) -> dict:
    """World size and a checksum of the parameters on every rank; ranks that disagree are a bug."""
    total = 0.0
    with runtime.gathered_parameters(model, zero_stage):
        for i, p in enumerate(model.parameters()):
            # each tensor's sum weighted by its position (i + 2: with a weight of 1, sum + abs-sum would ignore every
            # negative entry of the first tensor, usually the embeddings), plus its abs-sum; FSDP: one DTensor
            # gathered whole at a time
            plain, absolute = _sums(p.full_tensor() if hasattr(p, "full_tensor") else p)
            total += plain * (i + 2) + absolute
    sums = accelerator.gather(torch.tensor([total], dtype=torch.float64, device=accelerator.device)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"parameters differ across ranks after training: checksums {sums}")
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "zero_stage": zero_stage,
        "param_checksums": sums,
    }


def reward_metrics(R: torch.Tensor, rewards) -> dict[str, float]:
    """Per reward: mean and std over applicable samples, fraction None; plus the weighted total."""
    out = {}
    for k, x in enumerate(rewards):
        col = R[:, k]
        valid = ~torch.isnan(col)
        out[x.name] = float(col[valid].mean()) if valid.any() else float("nan")
        out[f"{x.name}_std"] = float(col[valid].std()) if valid.sum() > 1 else float("nan")
        out[f"{x.name}_none_frac"] = float((~valid).float().mean())
    w = torch.tensor([x.weight if x.role != "safety" else 0.0 for x in rewards])
    out["reward"] = float((torch.nan_to_num(R, nan=0.0) @ w).mean())
    return out


TOKEN_MEANS = (
    "clip_frac_low",
    "clip_frac_high",
    "clip_frac",
    "ratio_mean",
    "kl",
    "entropy",
    "mismatch_kl",
    "is_weight_mean",
    "is_capped_frac",
)


def token_means(ds: list[dict], accelerator) -> dict[str, float]:
    """Per-token metrics as means over every completion token of the step, on all ranks together
    (weighting each micro-batch by its tokens), so they do not depend on how the batch was split."""
    # a fixed layout on every rank (a rank may have no micro-batch): weighted sums, then token counts
    sums = torch.tensor(
        [sum(d[k] * d["tokens"] for d in ds if k in d) for k in TOKEN_MEANS]
        + [sum(d["tokens"] for d in ds if k in d) for k in TOKEN_MEANS],
        dtype=torch.float64,
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    n = len(TOKEN_MEANS)
    return {k: float(sums[i]) / max(float(sums[n + i]), 1.0) for i, k in enumerate(TOKEN_MEANS) if sums[n + i] > 0}


def mean_dicts(ds: list[dict]) -> dict[str, float]:
    keys = {k for d in ds for k in d if k not in TOKEN_MEANS and k != "tokens"}
    return {k: sum(d[k] for d in ds if k in d) / sum(1 for d in ds if k in d) for k in keys}


def reduce_metrics(metrics: dict[str, float], accelerator) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    vals = accelerator.reduce(vals, reduction="mean")
    return dict(zip(keys, vals.tolist()))


def console_line(step: int, steps: int, m: dict[str, float], rewards) -> str:
    """One line per step: rewards, KL, clipping, zero-std groups, length, speed, where time went."""
    parts = [f"step {step}/{steps}", f"reward {m['reward']:.3f}"]
    parts += [f"{x.name} {m[x.name]:.3f}" for x in rewards if not math.isnan(m[x.name])]
    parts += [f"lam[{k[7:]}] {m[k]:.3f}" for k in m if k.startswith("lambda/")]  # each constraint's multiplier
    for key, fmt in (
        ("kl", "kl {:.4f}"),
        ("unsafe_rate", "unsafe {:.3f}"),
        ("clip_frac", "clip {:.3f}"),
        ("zero_std_frac", "zero-std {:.2f}"),
        ("adv_abs_mean", "|A| {:.3f}"),
        ("completion_len", "len {:.1f}"),
        ("eval/accuracy", "eval acc {:.3f}"),
    ):
        if key in m and not math.isnan(m[key]):
            parts.append(fmt.format(m[key]))
    parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    parts.append(
        f"t {m['time_step']:.2f}s (gen {m['time_rollout']:.2f} score {m['time_score']:.2f} "
        f"logp {m['time_logprobs']:.2f} train {m['time_train']:.2f})"
    )
    return " | ".join(parts)
