"""Shared-prefix log-probabilities: each group's prompt is computed once, not G times.

GRPO scores G completions of the same prompt. The plain forward (`grpo.batch.build_batch` +
`grpo.batch.token_logprobs`) lays out G rows ``[left-padded prompt | right-padded completion]`` and
runs the prompt G times, forward and backward, plus the padding. Here a micro-batch is packed into
ONE row without padding tokens::

    [prompt_1 | c_11 | c_12 | ... | c_1G | prompt_2 | c_21 | ... ]
    positions: prompt 0..P_i-1; every completion restarts at P_i (RoPE sees what the plain forward sees)

The HF model computes everything but attention with its own modules (embeddings, projections, RoPE,
norms, MLP, LoRA, lm_head); attention goes through `prefix_attention`, registered in transformers'
`AttentionInterface` as ``"grpo_prefix"`` and switched on only for the duration of the forward (as
the rollout engine does with ``"grpo_rollout"``). Per layer it gathers the packed row into a buffer

- prompts ``[groups, H, P_max, D]``: causal attention within each prompt (one sdpa call), and
- completions ``[rows, H, C_max, D]`` attending to ``[its group's prompt keys | its own keys]``
  (prompt keys valid up to P_i, own keys causal; one masked sdpa call),

and gathers the outputs back into the packed row. Gradients from all G completions meet in the
shared prompt keys/values, so the prompt's backward is also done once. Both gathers have gathers as
backward (each position feeds exactly one real buffer entry), never a CPU scatter-add. Padding
exists only inside that attention buffer, never in the linear layers. Logits are computed only at
the positions that predict completion tokens (``logits_to_keep`` = an index tensor), through
`grpo.logprobs.forward_logprobs` (the output layer chunk by chunk: no ``[tokens, vocab]`` logits).
Tokens through the model per group: P + sum_j C_j instead of G (P_max + C_max). (The completion attention reads its
prompt's K/V as G broadcast copies, as much
K/V memory as the plain forward; a cascade/LSE-merge attention would remove that copy.)

API: `shared_prefix_logprobs` takes token lists; `pack_groups` + `packed_logprobs` separate building
the layout from running it (the trainer builds one layout per micro-batch: `grpo.batch.micro_batches`).

Exact against the plain forward (same math, summation order aside: <= 1e-5 in fp32, values and
gradients, see tests/test_prefix.py: Llama, Qwen2, DeepSeek-V3 MLA+MoE, LoRA, DDP). Works with peft
LoRA models (the adapter's layers are ordinary modules of the forward; disable the adapter around
the call for reference logprobs) and under DDP (pass the wrapped module: its forward runs, so DDP's
hooks fire). Any decoder whose attention goes through transformers' `AttentionInterface` with RoPE
positions from ``position_ids`` works; a forward that never reached the attention function raises.

Limits: gradient checkpointing works when the model's own attention implementation is one of
transformers' `AttentionInterface` entries (sdpa, flash_attention_*, flex_attention; the default):
the backward's recompute runs after the switch to ``"grpo_prefix"`` is undone, so that entry is
wrapped once to run `prefix_attention` on calls carrying a ``prefix_layout`` (every other call goes
to the original function unchanged). Under ``attn_implementation="eager"`` (each model file's own
function, not in the registry) it cannot be routed: with grad and checkpointing `packed_logprobs`
refuses, `supports_training` is False. No attention logit softcapping / sinks, sequences no longer
than a sliding window. The output layer runs chunk by chunk (`grpo.logprobs.forward_logprobs`):
no ``[tokens, vocab]`` logits, forward or backward.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo.logprobs import forward_logprobs
from grpo.rollout.base import attention_implementation, unwrap_model

Tensor = torch.Tensor
ATTN_NAME = "grpo_prefix"


# ------------------------------------------------------------------------------------- layout
@dataclass
class PackedGroups:
    """One packed row for a set of completions and the prompts they continue (all on one device).

    Rows are completions in the caller's order; groups are the distinct prompts they continue, in
    order of first use. Attention works on a buffer of M = g * P + N * C entries: the prompts
    right-padded to P (group-major), then the completions right-padded to C (row-major).
      input_ids, position_ids: [1, T] the packed row (T = sum of prompt lengths + completion lengths).
      src: [M] flat position feeding each buffer entry (padding: 0); src_zero: the same with padding
        = T (a zero row appended to a gradient); inv: [T] buffer entry of each flat position.
      kv_idx: [N * (P + C)] buffer entries row j's completion queries attend: its group's prompt, then itself.
      row_group: [N] group of each row; group_size: G when row j is in group j // G for all j
        (the prompt is then broadcast, not gathered), else 0.
      comp_mask: [N, 1, C, P + C] bool, True where a completion query may attend (its group's real
        prompt keys, then its own keys causally).
      keep_idx: [K] flat positions whose logits predict a completion token (the group's last prompt
        token for token 0, else the previous completion token); target: [K] those tokens;
        rows/cols: [K] where each log-prob goes in the [N, width] output.
      width: columns of the output (completion tokens beyond it are neither fed nor scored).
    """

    input_ids: Tensor
    position_ids: Tensor
    src: Tensor
    src_zero: Tensor
    inv: Tensor
    kv_idx: Tensor
    row_group: Tensor
    comp_mask: Tensor
    keep_idx: Tensor
    target: Tensor
    rows: Tensor
    cols: Tensor
    groups: int  # g
    prompt_width: int  # P
    n_rows: int  # N
    comp_width: int  # C (>= 1)
    group_size: int
    width: int
    max_len: int  # longest prompt + completion (for sliding-window checks)
    calls: int = 0  # attention calls in the last forward (a forward that never used them is an error)

    @property
    def mask(self) -> Tensor:
        """[N, width] float, 1 on scored completion tokens."""
        m = torch.zeros(self.n_rows, self.width, device=self.input_ids.device)
        m[self.rows, self.cols] = 1.0
        return m


def pack_groups(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    prompt_index: Sequence[int],
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> PackedGroups:
    """Builds the packed layout: completion j continues prompt ``prompt_ids[prompt_index[j]]``.

    Only prompts some completion continues are packed, each once, in order of first use. Completions
    are cut to `width` tokens (default: the longest); tokens past it cannot change the scored ones.
    """
    if len(completions) != len(prompt_index):
        raise ValueError(f"{len(completions)} completions but {len(prompt_index)} prompt indices")
    if not completions:
        raise ValueError("pack_groups: no completions")
    width = max(1, max(len(c) for c in completions)) if width is None else int(width)
    comps = [[int(t) for t in c][:width] for c in completions]
    groups = list(dict.fromkeys(int(i) for i in prompt_index))
    gpos = {p: i for i, p in enumerate(groups)}
    for p in groups:
        if not 0 <= p < len(prompt_ids) or not len(prompt_ids[p]):
            raise ValueError(f"prompt_index {p}: no such (non-empty) prompt among {len(prompt_ids)}")
    row_group = [gpos[int(p)] for p in prompt_index]
    members: list[list[int]] = [[] for _ in groups]
    for j, i in enumerate(row_group):
        members[i].append(j)
    plens = [len(prompt_ids[p]) for p in groups]
    clens = [len(c) for c in comps]
    g, n, P, C = len(groups), len(comps), max(plens), max(1, max(clens))

    ids: list[int] = []
    pos: list[int] = []
    src = [-1] * (g * P + n * C)  # -1 = padding
    keep, target, rows, cols = [], [], [], []
    for i, p in enumerate(groups):
        start = len(ids)
        ids += [int(t) for t in prompt_ids[p]]
        pos += range(plens[i])
        src[i * P : i * P + plens[i]] = range(start, start + plens[i])
        for j in members[i]:
            c0, b0 = len(ids), g * P + j * C
            ids += comps[j]
            pos += range(plens[i], plens[i] + clens[j])
            src[b0 : b0 + clens[j]] = range(c0, c0 + clens[j])
            keep += [start + plens[i] - 1, *range(c0, c0 + clens[j] - 1)][: clens[j]]
            target += comps[j]
            rows += [j] * clens[j]
            cols += range(clens[j])
    T = len(ids)
    inv = [0] * T
    for b, t in enumerate(src):
        if t >= 0:
            inv[t] = b
    G = n // g
    uniform = n == g * G and row_group == [j // G for j in range(n)]

    dev = torch.device(device)
    longs = dict(dtype=torch.long, device=dev)
    src_t = torch.tensor(src, **longs)
    row_group_t = torch.tensor(row_group, **longs)
    prompt_ok = torch.arange(P, device=dev)[None, :] < torch.tensor(plens, **longs)[row_group_t][:, None]  # [N, P]
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    kv_idx = torch.cat(
        [row_group_t[:, None] * P + torch.arange(P, device=dev), g * P + torch.arange(n * C, device=dev).view(n, C)],
        dim=1,
    ).reshape(-1)
    comp_mask = torch.cat([prompt_ok[:, None, :].expand(n, C, P), causal.expand(n, C, C)], dim=-1)[:, None]
    return PackedGroups(
        input_ids=torch.tensor(ids, **longs)[None],
        position_ids=torch.tensor(pos, **longs)[None],
        src=src_t.clamp(min=0),
        src_zero=torch.where(src_t < 0, T, src_t),
        inv=torch.tensor(inv, **longs),
        kv_idx=kv_idx,
        row_group=row_group_t,
        comp_mask=comp_mask.contiguous(),
        keep_idx=torch.tensor(keep, **longs),
        target=torch.tensor(target, **longs),
        rows=torch.tensor(rows, **longs),
        cols=torch.tensor(cols, **longs),
        groups=g,
        prompt_width=P,
        n_rows=n,
        comp_width=C,
        group_size=G if uniform else 0,
        width=width,
        max_len=max(plens[i] + clens[j] for j, i in enumerate(row_group)),
    )


# ------------------------------------------------------------------------------------- forward
def packed_logprobs(
    model: nn.Module,
    packed: PackedGroups,
    temperature: float,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(completion token) at `temperature` for every row of `packed`: [N, width], 0 where not scored.

    `model` is called as given (DDP / peft wrappers included); grad follows the caller's grad mode, gradient
    checkpointing included (see `supports_training`). The output layer runs `chunk_size` tokens at a time
    (`grpo.logprobs.forward_logprobs`); `with_entropy` also returns the per-token entropies ([N, width], no grad).
    """
    hf = unwrap_model(model)
    if torch.is_grad_enabled() and not supports_training(model):
        raise NotImplementedError(
            f"shared-prefix logprobs under gradient checkpointing need an attention implementation from transformers' "
            f"AttentionInterface, not {hf.config._attn_implementation!r}: load the model with "
            "attn_implementation='sdpa' "
            "or use the plain forward"
        )
    packed.calls = 0
    with _attention(hf, ATTN_NAME):
        out = forward_logprobs(
            model,
            dict(input_ids=packed.input_ids, position_ids=packed.position_ids, prefix_layout=packed),
            packed.target[None],
            packed.keep_idx,
            temperature,
            chunk_size,
            with_entropy,
        )
    if packed.calls == 0:
        raise RuntimeError(
            f"{type(hf).__name__} never called the '{ATTN_NAME}' attention: its attention does not go "
            "through transformers' AttentionInterface, so shared-prefix logprobs cannot be used with it"
        )
    logp, entropy = out if with_entropy else (out, None)
    full = logp.new_zeros(packed.n_rows, packed.width).index_put((packed.rows, packed.cols), logp[0])
    if not with_entropy:
        return full
    return full, entropy.new_zeros(packed.n_rows, packed.width).index_put((packed.rows, packed.cols), entropy[0])


def shared_prefix_logprobs(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    group_size: int,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Completion log-probs with each group's prompt computed once.

    Rows are grouped as everywhere in GRPO: completions ``i*G .. i*G+G-1`` continue ``prompt_ids[i]``.
    Returns ``(logp [N, C], mask [N, C])``, C = the longest completion; logp is 0 where mask is 0.
    Equals `grpo.batch.token_logprobs` on `grpo.batch.build_batch` of the same data (to fp32 rounding).
    """
    if group_size < 1 or len(completions) != len(prompt_ids) * group_size:
        raise ValueError(
            f"need len(completions) == len(prompt_ids) * group_size, got {len(completions)}, "
            f"{len(prompt_ids)}, {group_size}"
        )
    device = next(unwrap_model(model).parameters()).device
    packed = pack_groups(prompt_ids, completions, [j // group_size for j in range(len(completions))], device)
    return packed_logprobs(model, packed, temperature), packed.mask


def supports_training(model: nn.Module) -> bool:
    """Whether `packed_logprobs` can run with grad on `model`: always, except under gradient checkpointing with an
    attention implementation outside transformers' `AttentionInterface` (``"eager"``; see the module's Limits)."""
    hf = unwrap_model(model)
    return not _checkpointing(hf) or _routable(hf.config._attn_implementation)


def _checkpointing(hf: nn.Module) -> bool:
    return hf.training and any(getattr(m, "gradient_checkpointing", False) is True for m in hf.modules())


def _routable(name: str | None) -> bool:
    return name == ATTN_NAME or (name is not None and name in ALL_ATTENTION_FUNCTIONS)


@contextlib.contextmanager
def _attention(hf: nn.Module, name: str) -> Iterator[None]:
    """Switches the model to attention `name` for the forward (no mask is built for it). The model's own
    implementation is routed too (`_route_prefix`): a gradient-checkpointing recompute in the backward runs
    after this block, under the model's own implementation, and must still reach `prefix_attention`."""
    _route_prefix(hf.config._attn_implementation)
    with attention_implementation(hf, name):
        yield


def _route_prefix(name: str | None) -> None:
    """Wraps the attention function registered as `name` (once) so that a call carrying ``prefix_layout`` runs
    `prefix_attention`; every other call goes to the original function with the same arguments."""
    if name == ATTN_NAME or not _routable(name):
        return
    original = ALL_ATTENTION_FUNCTIONS[name]
    if getattr(original, "grpo_prefix_routed", False):
        return

    @functools.wraps(original)
    def routed(module, query, key, value, attention_mask, *args, prefix_layout: PackedGroups | None = None, **kwargs):
        if prefix_layout is not None:
            return prefix_attention(
                module, query, key, value, attention_mask, *args, prefix_layout=prefix_layout, **kwargs
            )
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    routed.grpo_prefix_routed = True
    if name in ALL_ATTENTION_FUNCTIONS._local_mapping:
        ALL_ATTENTION_FUNCTIONS[name] = routed
    else:
        AttentionInterface.register(name, routed)


# ------------------------------------------------------------------------------------- attention
class _Unpack(torch.autograd.Function):
    """Packed row [T, ...] -> attention buffer [M, ...] (``x[src]``); backward gathers ``grad[inv]``.

    Every flat position feeds exactly one real buffer entry, so the backward is a gather, not a
    scatter; padding entries are dropped. Their gradient is exactly zero here: padded queries'
    outputs are never read, and padded keys are masked for real queries (or causally after them).
    """

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class _Pack(torch.autograd.Function):
    """Attention buffer [M, ...] -> packed row [T, ...] (``buf[inv]``); backward gathers ``[grad; 0][src_zero]``."""

    @staticmethod
    def forward(ctx, buf: Tensor, inv: Tensor, src_zero: Tensor) -> Tensor:
        ctx.save_for_backward(src_zero)
        return buf.index_select(0, inv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (src_zero,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])]).index_select(0, src_zero), None, None


class _WithPrompt(torch.autograd.Function):
    """Attention buffer [M, ...] -> [N * (P + C), ...]: row j's group prompt (P entries), then row j (C).

    One gather (``buf[kv_idx]``). The backward sums each prompt's G copies (a reshape-sum when the
    groups are uniform, else an index_add) and places the completion part, again without a scatter.
    """

    @staticmethod
    def forward(ctx, buf: Tensor, layout: "PackedGroups") -> Tensor:
        ctx.layout, ctx.feat = layout, buf.shape[1:]
        return buf.index_select(0, layout.kv_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        L = ctx.layout
        g, P, N, C, G = L.groups, L.prompt_width, L.n_rows, L.comp_width, L.group_size
        grad = grad.view(N, P + C, -1)
        if G:
            prompt = grad[:, :P].reshape(g, G, P, -1).sum(1)
        else:
            prompt = grad.new_zeros(g, P, grad.shape[-1]).index_add_(0, L.row_group, grad[:, :P].contiguous())
        out = torch.cat([prompt.reshape(g * P, -1), grad[:, P:].reshape(N * C, -1)])
        return out.view(-1, *ctx.feat), None


def prefix_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    s_aux=None,
    prefix_layout: PackedGroups | None = None,
    **kwargs,
):
    """transformers attention-interface entry point for the packed row (signature of `sdpa_attention_forward`).

    query [1, H, T, Dk], key [1, Hkv, T, Dk], value [1, Hkv, T, Dv] (post-RoPE) -> ([1, T, H, Dv], None).
    `attention_mask` is ignored (transformers builds none for this implementation); masking comes from the layout.
    """
    L = prefix_layout
    if L is None:
        raise RuntimeError(
            f"attention {ATTN_NAME!r} runs only inside grpo.prefix.packed_logprobs (no prefix_layout given)"
        )
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("shared-prefix logprobs: attention logit softcapping / sinks are not supported")
    if sliding_window is not None and L.max_len > sliding_window:
        raise NotImplementedError(
            f"shared-prefix logprobs: sequences longer than the sliding window ({sliding_window})"
        )
    L.calls += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    drop = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    g, P, N, C = L.groups, L.prompt_width, L.n_rows, L.comp_width
    # token-major [T, H, D] views, then the buffer: prompts [g, P, H, D] | completions [N, C, H, D]
    q, k, v = (_Unpack.apply(x[0].transpose(0, 1), L.src, L.inv) for x in (query, key, value))

    def prompts(x: Tensor) -> Tensor:
        return x[: g * P].view(g, P, *x.shape[1:])

    def completions(x: Tensor) -> Tensor:
        return x[g * P :].view(N, C, *x.shape[1:])

    def with_prompt(x: Tensor) -> Tensor:  # [N, P + C, H, D]: own group's prompt, then own tokens
        return _WithPrompt.apply(x, L).view(N, P + C, *x.shape[1:])

    # prompts: causal within each (right padding reaches only padded queries)
    op = F.scaled_dot_product_attention(
        prompts(q).transpose(1, 2),
        prompts(k).transpose(1, 2),
        prompts(v).transpose(1, 2),
        is_causal=True,
        dropout_p=drop,
        scale=scale,
        enable_gqa=gqa,
    )  # [g, H, P, Dv]
    # completions: [own group's prompt | own tokens], masked
    oc = F.scaled_dot_product_attention(
        completions(q).transpose(1, 2),
        with_prompt(k).transpose(1, 2),
        with_prompt(v).transpose(1, 2),
        attn_mask=L.comp_mask,
        dropout_p=drop,
        scale=scale,
        enable_gqa=gqa,
    )  # [N, H, C, Dv]
    H, dv = op.shape[1], op.shape[-1]
    buf = torch.cat([op.transpose(1, 2).reshape(g * P, H, dv), oc.transpose(1, 2).reshape(N * C, H, dv)])
    return _Pack.apply(buf, L.inv, L.src_zero)[None], None  # [1, T, H, Dv]


AttentionInterface.register(ATTN_NAME, prefix_attention)
