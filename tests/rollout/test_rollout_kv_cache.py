"""SharedPrefixKV: prefix-shared decode attention equals plain attention over [prompt | own tokens]."""

from __future__ import annotations

import torch
from rollout_models import single_thread  # noqa: F401  (autouse fixture)

from grpo.rollout.kv_cache import SharedPrefixKV

S, N, H, HKV, DK, DV = 2, 3, 4, 2, 6, 5  # slots, samples per prompt, heads, kv heads, key dim, value dim


def reference(q, k, v, scale):
    """q [H, Dk], k [L, Hkv, Dk], v [L, Hkv, Dv] -> [H, Dv] (GQA: head h reads kv head h // (H / Hkv))."""
    kk = k.repeat_interleave(H // HKV, dim=1)  # [L, H, Dk]
    vv = v.repeat_interleave(H // HKV, dim=1)
    w = torch.softmax(torch.einsum("hd,lhd->hl", q, kk) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", w, vv)


def test_prefill_and_decode_match_plain_attention():
    torch.manual_seed(0)
    cache = SharedPrefixKV(S, N, prefix_len=5, suffix_len=4, device=torch.device("cpu"), dtype=torch.float32)
    lens, scale = [5, 2], 0.37
    T = sum(lens)
    q, k, v = torch.randn(1, H, T, DK), torch.randn(1, HKV, T, DK), torch.randn(1, HKV, T, DV)
    cache.begin_prefill([1, 0], lens)  # prompt 0 -> slot 1, prompt 1 -> slot 0
    out = cache.attend(0, q, k, v, scale, None)[0]  # [T, H, Dv]
    seqs = {
        1: (k[0, :, :5].transpose(0, 1), v[0, :, :5].transpose(0, 1)),
        0: (k[0, :, 5:].transpose(0, 1), v[0, :, 5:].transpose(0, 1)),
    }  # slot -> [L, Hkv, D]
    for t in range(T):  # causal within each prompt
        slot, pos = (1, t) if t < 5 else (0, t - 5)
        ks, vs = seqs[slot]
        assert torch.allclose(out[t], reference(q[0, :, t], ks[: pos + 1], vs[: pos + 1], scale), atol=1e-5)
    prompt_len = torch.tensor([2, 5])
    gen_len = torch.zeros(S * N, dtype=torch.long)
    history = {r: ([], []) for r in range(S * N)}
    for step, rows in enumerate([list(range(6)), [0, 2, 3, 5], [2]]):  # rows leave as they finish
        rows_t = torch.tensor(rows)
        pos = gen_len[rows_t].clone()
        gen_len[rows_t] += 1
        cache.begin_decode(rows_t, pos, prompt_len, gen_len, max_prompt=5, max_gen=int(gen_len.max()))
        qd, kd, vd = (
            torch.randn(len(rows), H, 1, DK),
            torch.randn(len(rows), HKV, 1, DK),
            torch.randn(len(rows), HKV, 1, DV),
        )
        out = cache.attend(0, qd, kd, vd, scale, None)  # [A, 1, H, Dv]
        for i, r in enumerate(rows):
            history[r][0].append(kd[i, :, 0])
            history[r][1].append(vd[i, :, 0])
            pk, pv = seqs[r // N]
            ks = torch.cat([pk, torch.stack(history[r][0])])
            vs = torch.cat([pv, torch.stack(history[r][1])])
            assert torch.allclose(out[i, 0], reference(qd[i, :, 0], ks, vs, scale), atol=1e-5), (step, r)
