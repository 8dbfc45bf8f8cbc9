"""From prompt records to scored completions: the one path GRPO training and eval share.

`sampling_params` maps the recipe's `rollout` section to `SamplingParams` (every field: training and
eval sample from the same distribution, except what eval overrides explicitly: greedy, its own
length); `generate` runs a rollout backend, optionally one seeded call per prompt; `decode_and_score`
turns completions into text and calls every reward with the dataset columns.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from grpo.config import RolloutConfig
from grpo.rollout import Completion, SamplingParams, make_rollout
from grpo.rules import raise_first, sampling
from grpo.scoring import score


def sampling_params(
    cfg: RolloutConfig,
    eos_token_id: int | None,
    *,
    seed: int | None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
) -> SamplingParams:
    """`SamplingParams` from the `rollout` section; eos is always a stop token."""
    return SamplingParams(
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_new_tokens=cfg.min_new_tokens,
        stop_token_ids=tuple(dict.fromkeys([eos_token_id, *cfg.stop_token_ids])),
        seed=seed,
    )


def make_backend(cfg: RolloutConfig, model, tokenizer):
    """The recipe's rollout backend on `model`, with the engine's options (`rollout.static_decode`, `max_batch`)."""
    opts = {}
    if cfg.backend == "engine":
        raise_first(sampling(cfg, train=False))
        static = cfg.static_decode
        if isinstance(static, str):  # "auto"
            static = next(model.parameters()).device.type == "cuda"
        opts = {"static_decode": bool(static), "max_batch": cfg.max_batch}
    return make_rollout(cfg.backend, model, tokenizer, **opts)


def generate(
    rollout, prompt_ids: list[list[int]], n: int, params: SamplingParams, seeds: list[int] | None = None
) -> list[Completion]:
    """n completions per prompt, grouped by prompt; with per-prompt `seeds` each group is drawn by its own call."""
    if seeds is None:
        return rollout.generate(prompt_ids, n, params)
    out = []
    for i, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
        for c in rollout.generate([ids], n, dataclasses.replace(params, seed=seed)):
            c.prompt_index = i
            out.append(c)
    return out


def decode_and_score(
    tokenizer,
    rewards,
    records: list[dict],
    completions: list[Completion],
    stop_ids,
    *,
    on_error: str = "raise",
    extra_columns: dict[str, list] | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor, float]:
    """Texts (stop tokens dropped), rewards R[N, K], ok[N] and the seconds spent scoring.

    Every reward gets the prompt texts, the completion texts, every dataset column of each sample's
    record and ``completion_ids`` (the reward protocol, DESIGN.md), plus `extra_columns` (one value per completion:
    a multi-turn episode's turns, grpo.environments.episode_columns).
    """
    stop = set(stop_ids)
    texts = [
        tokenizer.decode([t for t in c.token_ids if t not in stop], skip_special_tokens=False) for c in completions
    ]
    rows = [records[c.prompt_index] for c in completions]
    if not rewards:
        return texts, torch.zeros(len(completions), 0), torch.ones(len(completions), dtype=torch.bool), 0.0
    columns = {k: [row.get(k) for row in rows] for k in records[0] if k not in ("prompt_ids", "prompt_text")}
    columns["completion_ids"] = [c.token_ids for c in completions]
    columns.update(extra_columns or {})
    t = time.perf_counter()
    R, ok = score(rewards, [row["prompt_text"] for row in rows], texts, columns, on_error=on_error)
    return texts, R, ok, time.perf_counter() - t
