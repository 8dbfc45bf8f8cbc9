"""The data of one GRPO step: scored rollouts, and the micro-batches the forward/backward runs on.

`Rollouts` is what a step generated and scored (one prompt record per group, G completions per
record, rewards). `micro_batches` cuts a step's rows into `MicroBatch`es, each carrying its
completion mask, advantages and (filled in by the trainer) old/reference log-probs, and a token
layout the policy forward runs on:

- shared prefix (the default, `grpo.prefix.PackedGroups`): built straight from the rollout's
  token lists, each group's prompt once, no padding tokens;
- `PaddedBatch` (``grpo.shared_prefix: false``, or gradient checkpointing): G rows
  ``[left-padded prompt | right-padded completion]``, the plain forward (`token_logprobs`).

Both give the same ``[n, C]`` log-probs (tests/test_prefix.py). A micro-batch's completion width C
is the last column any of its rows scores (a row whose loss is masked is still fed, cut to C).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from grpo.logprobs import forward_logprobs
from grpo.prefix import PackedGroups, pack_groups, packed_logprobs
from grpo.rollout import Completion

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    """G scored completions for each of a step's prompts (on this process).

    rows: one prompt record per group (``prompt_ids``, ``prompt_text`` and the dataset columns);
    completions: ``len(rows) * G``, completion ``i * G + j`` continues ``rows[i]``;
    texts: the completions decoded (stop tokens dropped); rewards: ``[N, K]`` (NaN = not applicable);
    ok: ``[N]`` bool, False for samples whose reward failed under ``on_reward_error: skip``;
    score_seconds: time spent in the reward functions; episodes: one `grpo.rollout.multiturn.Episode` per
    completion for multi-turn rollouts (None: single turn).
    """

    rows: list[dict]
    completions: list[Completion]
    texts: list[str]
    rewards: Tensor
    ok: Tensor
    score_seconds: float = 0.0
    episodes: list | None = None

    @staticmethod
    def select(parts: Sequence["Rollouts"], chosen: Sequence[tuple[int, int]], G: int) -> "Rollouts":
        """The groups ``(part, group)`` in `chosen`, concatenated in that order (prompt indices renumbered)."""
        rows, comps, texts, Rs, oks, eps = [], [], [], [], [], []
        for new_index, (k, i) in enumerate(chosen):
            part, span = parts[k], slice(i * G, (i + 1) * G)
            rows.append(part.rows[i])
            comps += [dataclasses.replace(c, prompt_index=new_index) for c in part.completions[span]]
            texts += part.texts[span]
            Rs.append(part.rewards[span])
            oks.append(part.ok[span])
            eps += part.episodes[span] if part.episodes is not None else []
        return Rollouts(
            rows,
            comps,
            texts,
            torch.cat(Rs),
            torch.cat(oks),
            sum(p.score_seconds for p in parts),
            eps if any(p.episodes is not None for p in parts) else None,
        )


# ------------------------------------------------------------------------------------- plain layout
@dataclass
class PaddedBatch:
    """G rows ``[left-padded prompt | right-padded completion]`` (the plain forward).

    input_ids, attention_mask, position_ids: ``[N, P + C]``; completion_ids: ``[N, C]``. Completion
    token j of row i sits at column P + j, so the logits predicting it are at column P + j - 1.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    completion_ids: Tensor


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    pad_id: int,
    width: int | None = None,
    device=None,
) -> PaddedBatch:
    """The padded layout of completion j continuing ``prompt_ids[prompt_index[j]]``, completions cut to `width`
    columns (default: the longest), prompts left-padded to the longest one used."""
    n = len(completions)
    P = max(len(prompt_ids[i]) for i in prompt_index)
    C = max(1, max(len(c) for c in completions)) if width is None else width
    ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + C), dtype=torch.long)
    for j, (c, i) in enumerate(zip(completions, prompt_index)):
        p, c = prompt_ids[i], list(c)[:C]
        ids[j, P - len(p) : P] = torch.tensor(p)
        attn[j, P - len(p) : P] = 1
        if c:
            ids[j, P : P + len(c)] = torch.tensor(c)
            attn[j, P : P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(*(t.to(device) for t in (ids, attn, pos, ids[:, P:])))


def token_logprobs(model, batch: PaddedBatch, temperature: float) -> Tensor:
    """log pi(completion token) under `model` at `temperature`: [N, C] (float32).

    The output layer runs on the C positions that predict completion tokens only, chunk by chunk
    (`grpo.logprobs.forward_logprobs`): no ``[tokens, vocab]`` logits, forward or backward.
    """
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return forward_logprobs(model, inputs, batch.completion_ids, temperature=temperature)


# ------------------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One forward/backward's rows. mask: ``[n, C]`` 1 on completion tokens that carry loss;
    advantages: ``[n]``; old_logp / ref_logp: ``[n, C]`` when computed; rollout_logp: ``[n, C]`` the
    sampling log-probs the rollout returned (for `mismatch_kl` / TIS); layout: what the forward runs on."""

    layout: PackedGroups | PaddedBatch
    mask: Tensor
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    rollout_logp: Tensor | None = None

    def logprobs(self, model, temperature: float) -> Tensor:
        """log pi(completion tokens) under `model`: ``[n, C]`` (the same numbers for either layout)."""
        if isinstance(self.layout, PackedGroups):
            return packed_logprobs(model, self.layout, temperature)
        return token_logprobs(model, self.layout, temperature)


def loss_mask(completions: Sequence[Completion], ok: Tensor, mask_truncated: bool) -> Tensor:
    """``[N, C]`` 1 on each completion's tokens (stop token included), 0 for skipped samples and, with
    `mask_truncated` (DAPO), for completions cut at max_new_tokens. C = the longest completion (>= 1).
    Multi-turn trajectories: 0 on inserted observation tokens (``Completion.sampled_mask``): no loss, no KL."""
    C = max(1, max(len(c.token_ids) for c in completions))
    mask = torch.zeros(len(completions), C)
    for i, c in enumerate(completions):
        if c.token_ids and bool(ok[i]) and not (mask_truncated and c.finish_reason == "length"):
            mask[i, : len(c.token_ids)] = (
                1 if c.sampled_mask is None else torch.tensor(c.sampled_mask, dtype=mask.dtype)
            )
    return mask


def split_rows(rollouts: Rollouts, *, size: int, token_budget: int | None = None) -> list[list[int]]:
    """Which rows go into which micro-batch.

    Without a budget: consecutive runs of `size` rows. With `token_budget` (``grpo.micro_batch_tokens``):
    packed tokens per micro-batch (each distinct prompt once + its rows' completion tokens), groups kept
    whole where they fit, placed longest first into the first micro-batch with room (first-fit decreasing);
    a group over the budget is cut by rows. The loss normalisers are exact for any split (grpo.losses).
    """
    n = len(rollouts.completions)
    if token_budget is None:
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(rollouts.completions):
        groups.setdefault(c.prompt_index, []).append(i)

    def cost(rows: list[int], prompt: int) -> int:
        return len(rollouts.rows[prompt]["prompt_ids"]) + sum(len(rollouts.completions[i].token_ids) for i in rows)

    pieces = []  # (cost, rows): whole groups, or a group's rows cut to fit the budget
    for prompt, rows in groups.items():
        piece: list[int] = []
        for i in rows:
            if piece and cost(piece + [i], prompt) > token_budget:
                pieces.append((cost(piece, prompt), piece))
                piece = []
            piece.append(i)
        pieces.append((cost(piece, prompt), piece))
    bins: list[tuple[int, list[int]]] = []
    for c, rows in sorted(pieces, key=lambda x: -x[0]):
        for k, (used, members) in enumerate(bins):
            if used + c <= token_budget:
                bins[k] = (used + c, members + rows)
                break
        else:
            bins.append((c, list(rows)))
    return [sorted(rows) for _, rows in bins]


def split_to_count(splits: list[list[int]], count: int) -> list[list[int]]:
    """Cut the largest micro-batches in two until there are `count` (every process must run as many
    micro-batches as the others: gradients are reduced at the last one). Needs `count` <= rows."""
    splits = [list(r) for r in splits]
    while len(splits) < count:
        k = max(range(len(splits)), key=lambda j: len(splits[j]))
        rows = splits.pop(k)
        if len(rows) < 2:
            raise ValueError(f"cannot cut {sum(map(len, splits)) + len(rows)} rows into {count} micro-batches")
        splits[k:k] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return splits


def rollout_logprobs(completions: Sequence[Completion], width: int) -> Tensor | None:
    """``[n, width]`` the sampling log-probs the rollout returned (0 past each completion), or None if it returned
    none."""
    if any(c.logprobs is None for c in completions):
        return None
    out = torch.zeros(len(completions), width)
    for j, c in enumerate(completions):
        lp = c.logprobs[:width]
        if lp:
            out[j, : len(lp)] = torch.tensor(lp)
    return out


def micro_batches(
    rollouts: Rollouts,
    mask: Tensor,
    advantages: Tensor,
    splits: list[list[int]],
    *,
    shared_prefix: bool,
    pad_id: int,
    device,
) -> list[MicroBatch]:
    """One micro-batch per row list of `splits` (`split_rows`), each with its own layout on `device`, trimmed to its
    widths.

    Rows whose prompts have the same tokens share one group in the packed layout (also when the same
    prompt was drawn twice in a step), so each distinct prompt is computed once per micro-batch.
    """
    distinct: dict[tuple[int, ...], int] = {}
    group = [distinct.setdefault(tuple(row["prompt_ids"]), len(distinct)) for row in rollouts.rows]
    prompts = list(distinct)
    out = []
    for rows in splits:
        comps = [rollouts.completions[i] for i in rows]
        m = mask[rows]
        used = m.sum(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 1
        tokens = [c.token_ids for c in comps]
        index = [group[c.prompt_index] for c in comps]
        if shared_prefix:
            layout = pack_groups(prompts, tokens, index, device, width=width)
        else:
            layout = build_batch(prompts, tokens, index, pad_id, width=width, device=device)
        sampled = rollout_logprobs(comps, width)
        out.append(
            MicroBatch(
                layout,
                m[:, :width].to(device),
                advantages[rows].to(device),
                rollout_logp=None if sampled is None else sampled.to(device),
            )
        )
    return out


# ------------------------------------------------------------------------------------- dump and replay
def dump_path(folder, step: int, rank: int):
    from pathlib import Path

    return Path(folder) / f"step_{step:06d}.rank{rank}.json.gz"


def dump_rollouts(folder, step: int, rank: int, r: Rollouts, advantages: Tensor) -> None:
    """One step's rollouts of this process as gzipped JSON (rows without token-free duplication, completions,
    rewards with NaN as null, ok, advantages), written atomically."""
    import gzip
    import json
    import math
    import os

    path = dump_path(folder, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "step": step,
        "rank": rank,
        "rows": r.rows,
        "completions": [
            {
                "prompt_index": c.prompt_index,
                "token_ids": c.token_ids,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
                "sampled_mask": c.sampled_mask,
            }
            for c in r.completions
        ],
        "rewards": [[None if math.isnan(v) else v for v in row] for row in r.rewards.tolist()],
        "ok": r.ok.tolist(),
        "advantages": advantages.tolist(),
    }
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def load_rollouts(folder, step: int, rank: int) -> tuple[list[dict], list[Completion]]:
    """The prompt records and completions `dump_rollouts` wrote for (step, rank) (to be scored again)."""
    import gzip
    import json

    from grpo.errors import UserError

    path = dump_path(folder, step, rank)
    if not path.is_file():
        raise UserError(
            f"replay: {path} does not exist (a rollout.dump_dir folder holds step_NNNNNN.rankR.json.gz for every step "
            "it ran; replay as many steps, with the same process count)"
        )
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    return doc["rows"], [
        Completion(c["prompt_index"], c["token_ids"], c["logprobs"], c["finish_reason"], c.get("sampled_mask"))
        for c in doc["completions"]
    ]
