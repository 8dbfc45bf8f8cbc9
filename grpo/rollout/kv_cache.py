"""Shared-prefix KV cache and the attention that reads it (the engine's hot loop).

GRPO samples `n` completions of every prompt. The prompt's keys/values are computed once (prefill)
and stored once per prompt; each sample stores only the keys/values of its own generated tokens.
A decode step attends over [shared prompt KV | own suffix KV] (cascade / shared-prefix attention):
the n samples' queries hit the prompt's KV block together, in one small GEMM per (prompt, kv head),
so the prompt KV is read once per prompt rather than once per sample, and no prompt computation is
repeated; one softmax spans the prompt and the sample's own tokens.

The attention is registered in transformers' `AttentionInterface` as ``"grpo_rollout"``; the engine
switches the model's `config._attn_implementation` to it during generation and passes this cache
as the `rollout_kv` forward kwarg, which transformers forwards to the attention function. The HF
model computes everything else (projections, RoPE, norms, MoE, LoRA) with its own modules, so any
decoder whose attention goes through `AttentionInterface` runs unchanged, including DeepSeek's MLA
(which hands the attention function its expanded per-head keys and values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "grpo_rollout"


class SharedPrefixKV:
    """Preallocated KV storage for `slots` prompts x `n` samples each.

    Row `r = s * n + j` is sample `j` of the prompt held in slot `s` (`rows = slots * n`).
    Per layer `l` (allocated on the layer's first write, with the model's own head counts/dims):
      prefix_k[l]: [slots, Hkv, prefix_len, Dk]  keys of slot s's prompt; positions [0, prompt_len[s]) valid
      prefix_v[l]: [slots, Hkv, prefix_len, Dv]
      suffix_k[l]: [rows, Hkv, suffix_len, Dk]   keys of row r's generated tokens; [0, gen_len[r]) valid
      suffix_v[l]: [rows, Hkv, suffix_len, Dv]
    Storage is zero-initialised and never freed between steps: invalid positions hold finite stale
    values that the attention masks out (a NaN there would leak through `0 * NaN`).
    Memory: layers * (slots * prefix_len + rows * suffix_len) * Hkv * (Dk + Dv) * dtype bytes.
    """

    def __init__(self, slots: int, n: int, prefix_len: int, suffix_len: int, device: torch.device, dtype: torch.dtype):
        self.slots, self.n, self.rows = slots, n, slots * n
        self.prefix_len, self.suffix_len = prefix_len, suffix_len
        self.device, self.dtype = device, dtype
        self.prefix_k: dict[int, torch.Tensor] = {}
        self.prefix_v: dict[int, torch.Tensor] = {}
        self.suffix_k: dict[int, torch.Tensor] = {}
        self.suffix_v: dict[int, torch.Tensor] = {}
        self.mode: str | None = None

    def fits(
        self, slots: int, n: int, prefix_len: int, suffix_len: int, device: torch.device, dtype: torch.dtype
    ) -> bool:
        """Whether this storage can serve a call of these sizes (same n: rows are laid out by n)."""
        return (
            n == self.n
            and slots <= self.slots
            and prefix_len <= self.prefix_len
            and suffix_len <= self.suffix_len
            and device == self.device
            and dtype == self.dtype
        )

    # ------------------------------------------------------------------ step descriptors
    def begin_prefill(self, slots: list[int], lengths: list[int]) -> None:
        """Next forward is a packed prefill: prompt i (length lengths[i]) goes to slot slots[i]; the
        forward's input is the concatenation of the prompts, [1, sum(lengths)]."""
        self.mode, self.seg_slots, self.seg_lens = "prefill", slots, lengths

    def begin_extend(self, rows: list[int], starts: list[int], lengths: list[int], prompt_lens: list[int]) -> None:
        """Next forward appends tokens to rows' own sequences (multi-turn continuation, `grpo.rollout.continuation`).

        The forward's input is the concatenation of the chunks, [1, sum(lengths)]; chunk i goes to row rows[i] at
        suffix positions [starts[i], starts[i] + lengths[i]) (the row's KV before starts[i] is kept) and attends to
        its slot's whole prompt (prompt_lens[i] tokens) plus its own suffix up to itself (causal)."""
        self.mode = "extend"
        self.seg_rows, self.seg_starts, self.seg_lens, self.seg_plens = rows, starts, lengths, prompt_lens

    def begin_decode(
        self,
        rows: torch.Tensor,
        write_pos: torch.Tensor,
        prompt_len: torch.Tensor,
        gen_len: torch.Tensor,
        max_prompt: int,
        max_gen: int,
    ) -> None:
        """Next forward is one decode token for each active row.

        Args:
          rows: [A] long, active row ids, sorted (the forward's batch is [A, 1]).
          write_pos: [A] long, suffix position of the token being fed (its KV is stored there).
          prompt_len: [slots] long, prompt length per slot (0 for a free slot).
          gen_len: [rows] long, valid suffix length per row AFTER this step's write.
          max_prompt, max_gen: python ints >= the maxima of prompt_len / gen_len (attention spans).
        """
        self.mode, self.rows_active, self.write_pos = "decode", rows, write_pos
        self.all_rows = rows.numel() == self.rows
        self.span_p, self.span_s = max(max_prompt, 1), max(max_gen, 1)
        self.window_span = self.span_p + self.span_s
        self.bias = self._decode_bias(prompt_len, gen_len)

    def begin_static_decode(
        self,
        rows: torch.Tensor,
        write_pos: torch.Tensor,
        prompt_len: torch.Tensor,
        gen_len: torch.Tensor,
        all_rows: bool,
    ) -> None:
        """Next forward is a static-shape decode step (no host sync, CUDA-graph capturable).

        As `begin_decode`, except: `rows` [B] are distinct row ids in any order (rows the caller
        pads with are computed and their outputs discarded by the caller); `all_rows` (a Python bool
        fixed per step shape) says `rows` is `arange(rows)`; attention spans the whole storage
        (prefix_len + suffix_len) with a mask, so no shape depends on the lengths.
        """
        self.mode, self.rows_active, self.write_pos, self.all_rows = "decode", rows, write_pos, all_rows
        self.span_p, self.span_s = self.prefix_len, self.suffix_len
        self.window_span = self.prefix_len + self.suffix_len
        self.bias = self._decode_bias(prompt_len, gen_len)

    def _decode_bias(self, prompt_len: torch.Tensor, gen_len: torch.Tensor) -> torch.Tensor:
        """Additive mask [rows, 1, span_p + span_s] over [prompt | own tokens]; every length counts as
        >= 1 so idle slots/rows attend to finite stale entries instead of producing NaN."""
        pos_p = torch.arange(self.span_p, device=self.device)
        pos_s = torch.arange(self.span_s, device=self.device)
        keep = torch.cat(
            [
                (pos_p < prompt_len.clamp_min(1)[:, None]).repeat_interleave(self.n, dim=0),
                pos_s < gen_len.clamp_min(1)[:, None],
            ],
            dim=1,
        )
        return torch.zeros(keep.shape, device=self.device).masked_fill_(~keep, float("-inf"))[:, None]

    # ------------------------------------------------------------------ storage
    def _alloc(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        hkv, dk, dv = key.shape[1], key.shape[-1], value.shape[-1]
        z = dict(device=self.device, dtype=self.dtype)
        self.prefix_k[layer] = torch.zeros(self.slots, hkv, self.prefix_len, dk, **z)
        self.prefix_v[layer] = torch.zeros(self.slots, hkv, self.prefix_len, dv, **z)
        self.suffix_k[layer] = torch.zeros(self.rows, hkv, self.suffix_len, dk, **z)
        self.suffix_v[layer] = torch.zeros(self.rows, hkv, self.suffix_len, dv, **z)

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Stores this step's K/V and attends. query [B, H, T, Dk], key [B, Hkv, T, Dk], value
        [B, Hkv, T, Dv] (post-RoPE) -> output [B, T, H, Dv] (transformers' attention-output layout)."""
        if layer not in self.prefix_k:
            self._alloc(layer, key, value)
        if self.mode == "prefill":
            if sliding_window is not None and max(self.seg_lens) > sliding_window:
                raise NotImplementedError(f"engine: sequences longer than the sliding window ({sliding_window})")
            return self._prefill(layer, query, key, value, scale)
        if self.mode == "extend":
            longest = max(p + s + n for p, s, n in zip(self.seg_plens, self.seg_starts, self.seg_lens))
            if sliding_window is not None and longest > sliding_window:
                raise NotImplementedError(f"engine: sequences longer than the sliding window ({sliding_window})")
            return self._extend(layer, query, key, value, scale)
        if self.mode == "decode":
            if sliding_window is not None and self.window_span > sliding_window:
                raise NotImplementedError(f"engine: sequences longer than the sliding window ({sliding_window})")
            return self._decode(layer, query, key, value, scale)
        raise RuntimeError("SharedPrefixKV: call begin_prefill/begin_extend/begin_decode before the forward")

    def _prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Packed prompts [1, *, T, *]: causal attention within each prompt; stores its KV in its slot."""
        out = q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1])  # [1, T, H, Dv]
        gqa = q.shape[1] != k.shape[1]
        start = 0
        for slot, length in zip(self.seg_slots, self.seg_lens):
            ks, vs = k[:, :, start : start + length], v[:, :, start : start + length]
            self.prefix_k[layer][slot, :, :length] = ks[0]
            self.prefix_v[layer][slot, :, :length] = vs[0]
            o = F.scaled_dot_product_attention(
                q[:, :, start : start + length], ks, vs, is_causal=True, scale=scale, enable_gqa=gqa
            )
            out[:, start : start + length] = o.transpose(1, 2)
            start += length
        return out

    def _extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Packed per-row chunks [1, *, T, *]: each stored in its row's suffix, attending over [prompt | own suffix]
        with a causal mask inside the chunk. One attention call per chunk (once per turn, not per token)."""
        out = q.new_empty(1, q.shape[2], q.shape[1], v.shape[-1])  # [1, T, H, Dv]
        gqa = q.shape[1] != k.shape[1]
        sk, sv = self.suffix_k[layer], self.suffix_v[layer]
        off = 0
        for row, start, length, plen in zip(self.seg_rows, self.seg_starts, self.seg_lens, self.seg_plens):
            end, slot = start + length, row // self.n
            sk[row, :, start:end] = k[0, :, off : off + length]
            sv[row, :, start:end] = v[0, :, off : off + length]
            keys = torch.cat([self.prefix_k[layer][slot, :, :plen], sk[row, :, :end]], dim=1)[None]
            values = torch.cat([self.prefix_v[layer][slot, :, :plen], sv[row, :, :end]], dim=1)[None]
            # query i (suffix position start + i) sees the prompt and suffix positions <= start + i
            i = torch.arange(length, device=q.device)[:, None]
            visible = torch.arange(plen + end, device=q.device)[None] <= plen + start + i
            o = F.scaled_dot_product_attention(
                q[:, :, off : off + length], keys, values, attn_mask=visible, scale=scale, enable_gqa=gqa
            )
            out[:, off : off + length] = o.transpose(1, 2)
            off += length
        return out

    def _decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One token per active row: q [A, H, 1, Dk] -> [A, 1, H, Dv].

        Scores against the prompt are computed per (slot, kv-head) for all n*g queries that share the
        block (one small GEMM, prompt KV read once per prompt); scores against the row's own tokens per
        row; one softmax over [prompt | own tokens], then the two weighted sums of values are added.
        """
        rows, (S, n, R), (Lp, Ls) = self.rows_active, (self.slots, self.n, self.rows), (self.span_p, self.span_s)
        H, dk = q.shape[1], q.shape[-1]
        hkv = k.shape[1]
        g = H // hkv
        sk, sv = self.suffix_k[layer], self.suffix_v[layer]
        sk[rows, :, self.write_pos] = k[:, :, 0]
        sv[rows, :, self.write_pos] = v[:, :, 0]
        if self.all_rows:
            qs = q[:, :, 0] * scale
        else:  # scatter active rows into the slot layout; idle rows compute on zeros and are dropped
            qs = q.new_zeros(R, H, dk)
            qs[rows] = q[:, :, 0] * scale
        qp = qs.view(S, n, hkv, g, dk).permute(0, 2, 1, 3, 4).reshape(S, hkv, n * g, dk)
        sp = torch.matmul(qp, self.prefix_k[layer][:, :, :Lp].transpose(-1, -2))  # [S, hkv, n*g, Lp]
        sp = sp.view(S, hkv, n, g, Lp).permute(0, 2, 1, 3, 4).reshape(R, H, Lp)
        ss = torch.matmul(qs.view(R, hkv, g, dk), sk[:, :, :Ls].transpose(-1, -2)).view(R, H, Ls)
        w = torch.softmax(torch.cat([sp, ss], dim=-1).float().add_(self.bias), dim=-1).to(v.dtype)  # [R, H, Lp+Ls]
        wp = w[..., :Lp].reshape(S, n, hkv, g, Lp).permute(0, 2, 1, 3, 4).reshape(S, hkv, n * g, Lp)
        op = torch.matmul(wp, self.prefix_v[layer][:, :, :Lp])  # [S, hkv, n*g, Dv]
        dv = op.shape[-1]
        op = op.view(S, hkv, n, g, dv).permute(0, 2, 1, 3, 4).reshape(R, H, dv)
        os_ = torch.matmul(w[..., Lp:].reshape(R, hkv, g, Ls), sv[:, :, :Ls]).view(R, H, dv)
        out = op.add_(os_)
        if not self.all_rows:
            out = out[rows]
        return out[:, None]  # [A, 1, H, Dv]


def rollout_attention(
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
    rollout_kv: SharedPrefixKV | None = None,
    **kwargs,
):
    """transformers attention-interface entry point (signature of `sdpa_attention_forward`).

    Returns (attn_output [B, T, H, Dv], None). `attention_mask` is ignored: masking comes from the
    cache's step descriptor (transformers builds no mask for an implementation it does not know).
    """
    if rollout_kv is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} runs only inside the rollout engine (no rollout_kv given)")
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("engine: attention logit softcapping / sinks are not supported; use backend 'hf'")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise NotImplementedError(f"engine: {type(module).__name__} has no layer_idx; use backend 'hf'")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return rollout_kv.attend(layer, query, key, value, scale, sliding_window), None


AttentionInterface.register(ATTN_NAME, rollout_attention)
