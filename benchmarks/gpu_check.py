"""The prepared GPU check (issue 17): every GPU-side check and timing in one command, table printed last.

Run on the device (the repo root is the working directory; grpo need not be installed, this script puts
the repo root on sys.path; no network is needed):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

CPU, tiny shapes, the same code paths (what CI runs through tests/test_gpu_check.py, well under a minute):

    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check

Sections, each isolated (one failing loses none of the others) and time-boxed (`--budget` seconds in all,
default 450; a section or row that would start past its share is recorded as skipped). The JSON
(`OUT/gpu_check.json`) is rewritten after every section, so partial results survive a kill:
  env               versions, missing optional packages, GPU name and memory, measured bf16 matmul rate
                    (8192^3, median of 10 after warm-up, CUDA events) and device-to-device copy bandwidth
                    (1 GiB copies, bytes read + written).
  correctness_bf16  on the device in bf16: `engine` greedy == `hf` generate token for token (data/tiny_base,
  correctness_fp32  trained, so no near-ties decide it); engine sampling logprobs vs a fresh model's forward;
                    shared-prefix (`grpo.prefix`), plain padded (`token_logprobs`) and chunked LM-head
                    (`grpo.logprobs.chunked_logprobs`, where it exists) logprobs vs a reference (each sequence
                    alone, full logits, fp32 log_softmax), values and parameter gradients,
                    on tiny_base (Llama) and a tiny random Qwen2 (GQA, biases). Errors are relative L2 norms;
                    limits: bf16 1e-2 (values), 3e-2 (gradients); fp32 1e-5. A "sensitivity" line shows each
                    comparison would catch a wrong context (prompt cut to one token).
  attention         the shared-prefix pass's masked completion attention with grouped K/V heads at that model's
                    head shape (64 completions, 128 prompt + 256 own tokens): as grpo/prefix.py calls it (on CUDA
                    SDPA's math kernel), with the K/V heads expanded, with the query heads folded into the length,
                    and the padded layout's causal call; ms, memory kept for the backward, peak (section_attention).
  rollout           bf16, random-init Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, FFN 4864,
                    vocab 151936, tied), 64 prompts x 256 tokens, G=8, 256 new tokens (fixed length): `engine`,
                    `engine` static_decode (if the option exists), and on a subset of prompts (`--hf-prompts`,
                    default 16: hf keeps [rows, 151936] fp32 scores per step for its logprobs) `hf`, `hf`
                    static cache (auto-compile off: compile-free) and `engine` on the same subset. Completion
                    tokens/s, ms per decode step, and the fraction of the memory-bandwidth floor: bytes that
                    must be read per decode step (weights once + the KV cache, each prompt's KV once per
                    group) / the measured copy bandwidth, summed over steps, over the measured wall time
                    (which also holds prefill and sampling).
  train             the real train stage (`grpo.cli.main(["train", recipe])`, in this process) on that model in
                    bf16: a model folder (random weights + a WordLevel tokenizer covering the vocab), a JSONL of
                    prompts and a recipe written to a temp folder; reward `repetition` (char trigrams: varies
                    between samples), beta 0.04 (reference forward included). Step time split from
                    metrics.jsonl, tokens/s, peak CUDA memory. ZeRO-2 (accelerate launch, one process) runs
                    only where deepspeed imports and the device is CUDA; else it says skipped.
Exit status 1 if any check failed or any section raised; 0 otherwise (skipped rows do not fail).

The GPU image (Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, accelerate 1.15, peft, tokenizers) has
no deepspeed, datasets, wandb or trl. None is needed here: datasets is optional (grpo.data reads local
JSONL without it), wandb only loads when a recipe reports to it, trl only in benchmarks/vs_trl.py. To add
the ZeRO-2 row, carry (pip install --no-index --find-links DIR): deepspeed (sdist; ops are JIT-built only
when used, and grpo passes a torch optimizer) with einops, hjson, msgpack, ninja, py-cpuinfo (psutil,
pydantic, numpy, packaging, tqdm are usually there). For `datasets` (other data formats, hub datasets):
datasets, pyarrow, dill, multiprocess, xxhash, pandas, fsspec.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "offline",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from gpu_check_report import Report, Section, free_memory, print_table  # noqa: E402  (sys.path[0] is this folder)

OPTIONAL = ("deepspeed", "datasets", "wandb", "trl", "tensorboard", "matplotlib", "peft")
QWEN05 = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
)
TINY_QWEN = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1024,
)
FULL = dict(
    model=QWEN05,
    attn=dict(rows=64, G=8, P=128, C=256),  # the attention section: completions, group size, prompt / own tokens
    matmul=8192,
    copy_mb=1024,
    prompts=64,
    prompt_len=256,
    G=8,
    new=256,
    hf_prompts=16,
    train_prompts=16,
    train_steps=4,
    micro=32,
)
TINY = dict(
    model=TINY_QWEN,
    attn=dict(rows=8, G=4, P=8, C=8),
    matmul=256,
    copy_mb=16,
    prompts=4,
    prompt_len=16,
    G=4,
    new=8,
    hf_prompts=2,
    train_prompts=4,
    train_steps=2,
    micro=8,
)
TOL = {"bfloat16": {"values": 1e-2, "grads": 3e-2}, "float32": {"values": 1e-5, "grads": 1e-5}}
# share of --budget per section (a section stops starting new rows past its share; the rest roll over)
SHARES = {
    "env": 0.08,
    "correctness_bf16": 0.12,
    "correctness_fp32": 0.12,
    "attention": 0.06,
    "rollout": 0.32,
    "train": 0.30,
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------- 1. environment
def section_env(s: Section, ctx: dict) -> None:
    dev, versions = ctx["device"], s.report.data["meta"]["versions"]
    s.data["missing_optional"] = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        s.data["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}",
            "count": torch.cuda.device_count(),
        }
    s.log(f"versions {versions}; missing optional: {s.data['missing_optional']}; gpu {s.data.get('gpu')}")
    n = ctx["shape"]["matmul"]
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    t = _median_time(lambda: a @ b, dev)
    ctx["matmul_tflops"] = 2 * n**3 / t / 1e12
    nbytes = ctx["shape"]["copy_mb"] * 2**20
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    src.fill_(1)
    t = _median_time(lambda: dst.copy_(src), dev)
    ctx["copy_gbps"] = 2 * nbytes / t / 1e9  # each byte read once and written once
    s.row(
        {
            "name": "ceilings",
            "bf16_matmul_tflops": round(ctx["matmul_tflops"], 2),
            "matmul_n": n,
            "copy_gbps": round(ctx["copy_gbps"], 1),
            "copy_mib": ctx["shape"]["copy_mb"],
        }
    )


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "peft", "tokenizers", "safetensors", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__})"
    out["cuda"] = torch.version.cuda
    return out


def _median_time(fn, dev: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn() after warm-up (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- models
def qwen_model(
    shape: dict, device: torch.device, dtype: torch.dtype, seed: int, init: float = 0.02, max_pos: int = 2048
):
    """A random-init tied-embedding Qwen2 causal LM built directly on `device` in `dtype` (pad 0, eos 1)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        **shape,
        tie_word_embeddings=True,
        max_position_embeddings=max_pos,
        initializer_range=init,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def tiny_base(device: torch.device, dtype: torch.dtype):
    """The shipped trained tiny Llama (data/tiny_base), freshly loaded, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ROOT / "data" / "tiny_base"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval(), AutoTokenizer.from_pretrained(
        path
    )


def toy_prompts(tok, n: int) -> list[list[int]]:
    """n held-out toy-world prompts (math, benign and harmful how-to), token ids."""
    rows = [json.loads(x) for x in (ROOT / "data" / "toyworld" / "eval.jsonl").read_text().splitlines() if x.strip()]
    step = max(1, len(rows) // n)
    return [tok(r["prompt"])["input_ids"] for r in rows[::step][:n]]


# ----------------------------------------------------------------------------------------- 2. correctness
def section_correctness(s: Section, ctx: dict, dtype_name: str) -> None:
    from grpo.rollout import SamplingParams, make_rollout

    dev, dtype, tol = ctx["device"], DTYPES[dtype_name], TOL[dtype_name]
    model, tok = tiny_base(dev, dtype)
    prompts = toy_prompts(tok, 16)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    eng = make_rollout("engine", model, tok).generate(prompts, 2, greedy)
    ref = make_rollout("hf", model, tok).generate(prompts, 2, greedy)
    diff = [i for i, (a, b) in enumerate(zip(eng, ref)) if a.token_ids != b.token_ids]
    first = None
    if diff:
        a, b = eng[diff[0]].token_ids, ref[diff[0]].token_ids
        first = {
            "completion": diff[0],
            "position": next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
        }
    s.check(
        "greedy engine == hf (tiny_base)",
        not diff and len(eng) == len(ref),
        completions=len(eng),
        differing=len(diff),
        tokens=sum(len(c.token_ids) for c in eng),
        first_difference=first,
    )
    fresh = lambda: tiny_base(dev, dtype)[0]  # noqa: E731
    _logprob_checks(s, "tiny_base", model, fresh, prompts[::4][:4], tok.eos_token_id, tok.pad_token_id, tol, T=2.0)
    del model
    qwen = qwen_model(TINY_QWEN, dev, dtype, seed=1, init=0.2)
    g = torch.Generator().manual_seed(2)
    qprompts = [torch.randint(3, TINY_QWEN["vocab_size"], (k,), generator=g).tolist() for k in (5, 11, 3, 8)]
    _logprob_checks(s, "qwen2_tiny", qwen, lambda: copy.deepcopy(qwen), qprompts, 1, 0, tol)


def _logprob_checks(
    s: Section, label: str, model, fresh, prompts, eos: int, pad: int, tol: dict, G: int = 4, T: float = 0.8
) -> None:
    """Engine sampling logprobs vs a fresh forward; shared-prefix, plain and chunked logprobs (values, grads) vs the
    reference."""
    from grpo.prefix import shared_prefix_logprobs
    from grpo.rollout import SamplingParams, make_rollout

    params = SamplingParams(max_new_tokens=16, temperature=T, seed=3, stop_token_ids=(eos,))
    outs = make_rollout("engine", model, None).generate(prompts, G, params)
    comps = [c.token_ids for c in outs]
    other = fresh()
    with torch.no_grad():
        ref_fresh = torch.cat(_reference(other, prompts, comps, G, T))
        wrong = torch.cat(_reference(other, [p[-1:] for p in prompts], comps, G, T))
    del other
    eng_lp = torch.tensor([x for c in outs for x in c.logprobs])
    e = _rel(eng_lp, ref_fresh.cpu())
    s.check(
        f"engine logprobs vs fresh forward ({label})",
        e <= tol["values"],
        rel_err=e,
        limit=tol["values"],
        tokens=len(eng_lp),
    )
    sens = _rel(wrong, ref_fresh)
    s.check(
        f"sensitivity: wrong context detected ({label})",
        sens >= 10 * tol["values"],
        rel_err_wrong_context=sens,
        needs=10 * tol["values"],
    )
    dev = next(model.parameters()).device
    C = max(len(c) for c in comps)
    w = torch.randn(len(comps), C, generator=torch.Generator().manual_seed(4)).to(dev)
    mask = torch.zeros(len(comps), C, device=dev)
    for j, c in enumerate(comps):
        mask[j, : len(c)] = 1

    def ref_loss():
        lps = _reference(model, prompts, comps, G, T)
        return sum((w[j, : len(c)] * lp).sum() for j, (c, lp) in enumerate(zip(comps, lps))), torch.cat(lps)

    ref_vals, ref_grads = _with_grads(model, ref_loss)
    paths = [
        ("shared-prefix", lambda: shared_prefix_logprobs(model, prompts, comps, G, T)[0]),
        ("plain forward", lambda: _plain_logprobs(model, prompts, comps, G, T, pad)),
    ]
    try:
        from grpo.logprobs import chunked_logprobs  # issue 14's chunked LM head (absent in older trees)
    except ImportError:
        s.row({"name": f"chunked LM head ({label})", "not_available": "grpo.logprobs has no chunked_logprobs"})
    else:
        paths.append(
            (
                "chunked LM head",
                lambda: torch.nn.utils.rnn.pad_sequence(
                    _reference(model, prompts, comps, G, T, chunked=chunked_logprobs), batch_first=True
                ),
            )
        )
    for name, fn in paths:

        def loss(fn=fn):
            lp = fn()[:, :C]
            return (w * lp * mask).sum(), lp[mask.bool()]

        vals, grads = _with_grads(model, loss)
        ev, eg = _rel(vals, ref_vals), _rel(grads, ref_grads)
        s.check(
            f"{name} logprobs vs reference ({label})",
            ev <= tol["values"] and eg <= tol["grads"],
            rel_err_values=ev,
            rel_err_grads=eg,
            limit_values=tol["values"],
            limit_grads=tol["grads"],
            tokens=int(mask.sum()),
        )


def _reference(model, prompts, comps, G: int, T: float, chunked=None) -> list[torch.Tensor]:
    """Per completion [len(c)] fp32: each sequence run alone (no padding, no packing), full logits, fp32 log_softmax.

    With `chunked` (grpo.logprobs.chunked_logprobs): the same sequences, but the output layer, log-softmax and
    gather run 3 tokens at a time from the decoder's hidden states (several chunks per sequence).
    """
    dev = next(model.parameters()).device
    out = []
    for j, c in enumerate(comps):
        p = prompts[j // G]
        ids = torch.tensor([p + c], device=dev)
        at, target = slice(len(p) - 1, len(p) + len(c) - 1), ids[0, len(p) :]
        if chunked is not None:
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0, at]
            out.append(chunked(hidden, model.get_output_embeddings(), target, T, chunk_size=3).float())
            continue
        logits = model(input_ids=ids, use_cache=False).logits[0, at]
        out.append(torch.log_softmax(logits.float() / T, dim=-1).gather(1, target[:, None]).squeeze(1))
    return out


def _plain_logprobs(model, prompts, comps, G: int, T: float, pad: int) -> torch.Tensor:
    """The trainer's plain padded forward, [N, C]: grpo.batch (current layout) or grpo.trainer (before the move)."""
    dev = next(model.parameters()).device
    try:
        from grpo.batch import build_batch, token_logprobs
    except ImportError:
        from grpo.rollout import Completion
        from grpo.trainer import build_batch, token_logprobs

        batch = build_batch(prompts, [Completion(j // G, c, None, "length") for j, c in enumerate(comps)], pad, False)
        return token_logprobs(model, {k: v.to(dev) for k, v in batch.items()}, T)
    return token_logprobs(model, build_batch(prompts, comps, [j // G for j in range(len(comps))], pad, device=dev), T)


def _with_grads(model, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, all parameter gradients flattened in fp32) of loss_fn() -> (loss, values)."""
    model.zero_grad(set_to_none=True)
    loss, vals = loss_fn()
    loss.backward()
    grads = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in model.parameters()]
    )
    model.zero_grad(set_to_none=True)
    return vals.detach().float(), grads


# ----------------------------------------------------------------------------------------- 3. rollout
def section_attention(s: Section, ctx: dict) -> None:
    """The shared-prefix training pass's completion attention (`grpo.prefix.prefix_attention`) in isolation, at the
    model's head shape: each of `rows` completions attends to [its group's prompt | its own tokens] under an explicit
    mask, with grouped K/V heads. On CUDA no fused SDPA kernel takes a mask with grouped heads (flash: no mask;
    memory-efficient: no GQA), so SDPA runs its math kernel. Variants, forward + backward, the same inputs:
      masked_gqa         what grpo/prefix.py does: mask + enable_gqa
      masked_expand_kv   K/V heads repeated to the query heads (transformers' repeat_kv), mask, no GQA
      masked_fold_q      the g query heads of a K/V head folded into the query length (mask rows repeated), no GQA
      padded_causal      the plain padded layout's call (prompt + completion queries, is_causal, GQA: flash on CUDA):
                         what a padded batch pays, for scale (it computes P more query rows per completion)
    Rows: median ms (forward+backward), memory held after the forward (output + what the backward keeps) and the
    peak, CUDA only. Checks: the two rewrites equal masked_gqa (values and input gradients)."""
    sh, dev, dtype = ctx["shape"], ctx["device"], DTYPES[ctx["dtype"]]
    cfg, a = sh["model"], sh["attn"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, g = cfg["hidden_size"] // H, H // Hkv
    N, P, C = a["rows"], a["P"], a["C"]
    s.data.update(heads=H, kv_heads=Hkv, head_dim=D, completions=N, prompt=P, completion=C, dtype=ctx["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    q, k, v, gout = rand(N, H, C, D), rand(N, Hkv, P + C, D), rand(N, Hkv, P + C, D), rand(N, H, C, D)
    j, i = torch.arange(P + C, device=dev), torch.arange(C, device=dev)
    mask = ((j[None, :] < P) | (j[None, :] - P <= i[:, None]))[None, None].expand(N, 1, C, P + C).contiguous()
    fold_mask = mask.repeat(1, 1, g, 1)  # [N, 1, g*C, P+C]: once per forward in a real pass (all layers share it)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked_gqa(q, k, v, qp):
        return sdpa(q, k, v, attn_mask=mask, enable_gqa=g > 1)

    def masked_expand_kv(q, k, v, qp):
        return sdpa(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask)

    def masked_fold_q(q, k, v, qp):
        qf = q.view(N, Hkv, g, C, D).reshape(N, Hkv, g * C, D)
        return sdpa(qf, k, v, attn_mask=fold_mask).view(N, Hkv, g, C, D).reshape(N, H, C, D)

    qp = rand(N, H, P + C, D)  # the padded layout's queries: prompt and completion positions

    def padded_causal(q, k, v, qp):
        return sdpa(qp, k, v, is_causal=True, enable_gqa=g > 1)[:, :, P:]

    variants = {
        "masked_gqa": masked_gqa,
        "masked_expand_kv": masked_expand_kv,
        "masked_fold_q": masked_fold_q,
        "padded_causal": padded_causal,
    }
    ref = None
    for name, fn in variants.items():
        if s.left() < 5:
            s.row({"name": name, "skipped": f"time share left {s.left():.0f} s"})
            continue
        try:
            row, grads = _time_attention(fn, (q, k, v, qp), gout, dev)
        except Exception as e:  # noqa: BLE001  (one variant failing must not lose the others)
            s.row({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
            continue
        s.row({"name": name, **row})
        if name == "masked_gqa":
            ref = grads
        elif ref is not None and name != "padded_causal":
            tol = TOL[ctx["dtype"]]
            errs = {f"rel_err_{n}": _rel(x, r) for n, x, r in zip(("out", "dq", "dk", "dv"), grads, ref)}
            s.check(
                f"attention {name} == masked_gqa",
                errs["rel_err_out"] <= tol["values"] and max(list(errs.values())[1:]) <= tol["grads"],
                **errs,
            )
        free_memory()


def _time_attention(fn, inputs, gout, dev, reps: int = 5) -> tuple[dict, list]:
    """Median ms of forward + backward over `reps` after a warm-up, memory held after the forward and the peak
    (CUDA), and (output, dq, dk, dv) of the last run."""
    q, k, v, qp = (x.detach().requires_grad_() for x in inputs)
    times, held, peak = [], 0, 0
    for r in range(reps + 1):
        for x in (q, k, v, qp):
            x.grad = None
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t = time.perf_counter()
        out = fn(q, k, v, qp)
        if dev.type == "cuda":
            held = torch.cuda.memory_allocated(dev) - base
        out.backward(gout)
        _sync(dev)
        if r:
            times.append(time.perf_counter() - t)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - base
    row = {"ms": round(statistics.median(times) * 1e3, 3)}
    if dev.type == "cuda":
        row.update(held_after_forward_mib=round(held / 2**20, 1), peak_mib=round(peak / 2**20, 1))
    dq = q.grad if q.grad is not None else qp.grad[:, :, -out.shape[2] :]
    return row, [out.detach(), dq, k.grad, v.grad]


def section_rollout(s: Section, ctx: dict) -> None:
    sh, dev, dtype = ctx["shape"], ctx["device"], DTYPES[ctx["dtype"]]
    model = qwen_model(sh["model"], dev, dtype, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    kv_tok = (
        cfg.num_hidden_layers
        * 2
        * cfg.num_key_value_heads
        * (cfg.hidden_size // cfg.num_attention_heads)
        * model.dtype.itemsize
    )
    s.data.update(
        params=n_params,
        weight_bytes=n_params * model.dtype.itemsize,
        kv_bytes_per_token=kv_tok,
        dtype=ctx["dtype"],
        shape={k: sh[k] for k in ("prompts", "prompt_len", "G", "new", "hf_prompts")},
    )
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(2, cfg.vocab_size, (sh["prompts"], sh["prompt_len"]), generator=g).tolist()
    sub = prompts[: sh["hf_prompts"]]
    rows = [
        ("engine", {"max_batch": len(prompts) * sh["G"]}, prompts),
        ("engine static_decode", {"max_batch": len(prompts) * sh["G"], "static_decode": True}, prompts),
        ("engine", {"max_batch": len(sub) * sh["G"]}, sub),
        ("hf", {}, sub),
        ("hf static cache", {"cache_implementation": "static"}, sub),
    ]
    est = None
    for name, opts, ps in rows:
        label = f"{name} ({len(ps)} prompts)"
        if est is not None and s.left() < est:
            s.row({"name": label, "skipped": f"time share left {s.left():.0f} s < {est:.0f} s needed"})
            continue
        t = time.perf_counter()
        try:
            row = _time_backend(model, name, opts, ps, sh, ctx, kv_tok)
        except Exception as e:  # noqa: BLE001  (one backend failing must not lose the others)
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        free_memory()
        est = max(est or 0.0, time.perf_counter() - t)
        s.row({"name": label, **row})


def _time_backend(model, name: str, opts: dict, prompts, sh: dict, ctx: dict, kv_tok: int) -> dict:
    """Warm-up (same prompts, 4 tokens), then one timed fixed-length generation; tokens/s, floor fraction, memory."""
    from grpo.rollout import SamplingParams, make_rollout

    dev, G, N = ctx["device"], sh["G"], sh["new"]
    backend = "engine" if name.startswith("engine") else "hf"
    try:
        rollout = make_rollout(backend, model, None, **opts)
    except TypeError as e:
        if "static_decode" in opts:
            return {"not_available": f"the engine has no static_decode option ({e})"}
        raise
    gen_cfg = getattr(model, "generation_config", None)
    compile_flag = getattr(gen_cfg, "disable_compile", None)
    if gen_cfg is not None and backend == "hf":
        gen_cfg.disable_compile = True  # static cache would auto-compile on CUDA (minutes): timed compile-free
    try:
        rollout.generate(prompts, G, SamplingParams(max_new_tokens=4, min_new_tokens=4, temperature=1.0, seed=1))
        _sync(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        out = rollout.generate(prompts, G, SamplingParams(max_new_tokens=N, min_new_tokens=N, temperature=1.0, seed=0))
        _sync(dev)
        wall = time.perf_counter() - t
    finally:
        if gen_cfg is not None:
            gen_cfg.disable_compile = compile_flag
    tokens = sum(len(c.token_ids) for c in out)
    if len(out) != len(prompts) * G or tokens != len(out) * N:
        raise RuntimeError(
            f"{name}: expected {len(prompts) * G} completions of {N} tokens, got {len(out)} with {tokens} tokens"
        )
    groups, P = len(prompts), len(prompts[0])
    # bytes read per decode step k (k tokens already generated): the weights once + the KV cache, a prompt's KV once per
    # group
    weights = sum(
        p.numel() * p.element_size() for p in model.parameters()
    )  # tied embeddings once: the LM head reads them
    floor_bytes = sum(weights + groups * (P + G * k) * kv_tok for k in range(N))
    row = {
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ms_per_step": round(1e3 * wall / N, 2),
        "floor_bytes": floor_bytes,
    }
    if ctx.get("copy_gbps"):
        floor_s = floor_bytes / (ctx["copy_gbps"] * 1e9)
        row.update(floor_s=round(floor_s, 4), floor_frac=round(floor_s / wall, 4))
    if dev.type == "cuda":
        row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20)
    if backend == "hf":
        row["note"] = "auto-compile off" + (", static cache" if opts else "")
    return row


# ----------------------------------------------------------------------------------------- 4. train
def section_train(s: Section, ctx: dict) -> None:
    sh, dev = ctx["shape"], ctx["device"]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    s.data["work_dir"] = str(work)
    t = time.perf_counter()
    recipe = _write_train_assets(work, sh, dev, ctx["dtype"], ctx["threads"])
    s.data["assets_s"] = round(time.perf_counter() - t, 1)
    s.log(f"model folder, prompts and recipe written in {s.data['assets_s']} s: {recipe}")
    try:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        rc, cut = _train_in_process(recipe, s.left() - 5, ctx.get("train_set", []))
        s.data["overrides"] = ctx.get("train_set", [])
        _sync(dev)
        summary = {
            "name": "train (one process)",
            "rc": rc,
            "wall_s": round(time.perf_counter() - t, 1),
            "dtype": ctx["dtype"],
            "prompts_per_step": sh["train_prompts"],
            "G": sh["G"],
            "new_tokens": sh["new"],
            "prompt_len": sh["prompt_len"],
        }
        if dev.type == "cuda":
            summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
        metrics = work / "run" / "train" / "metrics.jsonl"
        summary.update(_step_stats(metrics))
        if cut:
            summary["note"] = "stopped by its time share (SIGTERM: checkpoint after the step, then exit)"
        if metrics.is_file():
            shutil.copy(metrics, s.report.out / "train_metrics.jsonl")
        s.row(summary)
        steps = summary.get("steps", 0)
        s.check(
            "train stage ran (exit 0, every step logged)",
            (rc == 0 and steps == sh["train_steps"]) or (cut and steps >= 1),
            rc=rc,
            steps=steps,
            of=sh["train_steps"],
        )
        _zero2(s, ctx, recipe, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_in_process(recipe: Path, seconds: float, overrides: list[str] = ()) -> tuple[int, bool]:
    """`grpo.cli.main(["train", recipe])` here; past `seconds` a SIGTERM makes the loop checkpoint and stop.

    The signal repeats every 2 s until the call returns (one sent before the loop starts, during loading, hits our
    own no-op handler and is lost); the trainer's handler only ever records a SIGTERM.
    """
    from grpo.cli import main as cli_main

    fired, done = threading.Event(), threading.Event()

    def watchdog() -> None:
        if done.wait(max(seconds, 1.0)):
            return
        fired.set()
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            done.wait(2.0)

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        rc = cli_main(["train", str(recipe), *overrides])
    finally:
        done.set()
        thread.join()
        signal.signal(signal.SIGTERM, previous)
    return rc, fired.is_set()


def _step_stats(path: Path) -> dict:
    """Per-step time split from metrics.jsonl: the first step alone (warm-up) and the median of the rest."""
    if not path.is_file():
        return {"steps": 0}
    steps = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    keys = ("time_step", "time_rollout", "time_score", "time_logprobs", "time_train", "tokens_per_s", "completion_len")
    out = {"steps": len(steps), "first_step": {k: round(steps[0].get(k, math.nan), 3) for k in keys} if steps else {}}
    rest = steps[1:] or steps
    out["median_later_steps"] = (
        {k: round(statistics.median(x.get(k, math.nan) for x in rest), 3) for k in keys} if rest else {}
    )
    return out


def _zero2(s: Section, ctx: dict, recipe: Path, work: Path) -> None:
    """ZeRO-2 through accelerate launch (one process), where deepspeed imports and the device is CUDA."""
    if ctx["zero2"] == "off" or (ctx["zero2"] == "auto" and ctx["device"].type != "cuda"):
        s.row(
            {"name": "train ZeRO-2", "skipped": "not on CUDA (CPU ZeRO runs are covered by tests/test_distributed.py)"}
        )
        return
    if importlib.util.find_spec("deepspeed") is None:
        s.row(
            {
                "name": "train ZeRO-2",
                "skipped": "deepspeed is not installed (see the docstring for the wheels to carry)",
            }
        )
        return
    if s.left() < 60:
        s.row({"name": "train ZeRO-2", "skipped": f"time share left {s.left():.0f} s"})
        return
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate_configs/zero2.yaml"),
        "--num_processes",
        "1",
        "-m",
        "grpo",
        "train",
        str(recipe),
        f"run.output_dir={work / 'run_zero2'}",
        "grpo.steps=2",
    ]
    t = time.perf_counter()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(30, int(s.left())))
    row = {
        "name": "train ZeRO-2",
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t, 1),
        **_step_stats(work / "run_zero2" / "train" / "metrics.jsonl"),
    }
    if proc.returncode:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    s.row(row)


def _write_train_assets(work: Path, sh: dict, dev: torch.device, dtype: str, threads: int) -> Path:
    """Model folder (random weights, WordLevel tokenizer over the whole vocab), prompts JSONL, recipe YAML."""
    import yaml
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    V = sh["model"]["vocab_size"]
    model = qwen_model(sh["model"], dev, DTYPES[dtype], seed=0, max_pos=sh["prompt_len"] + sh["new"] + 64)
    model.save_pretrained(work / "model")
    del model
    free_memory()
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, V)}}  # ids cover the whole vocabulary
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # its own folder: transformers 5 AutoTokenizer on a folder whose config.json says qwen2 builds Qwen2Tokenizer's
    # byte-level
    # pre-tokenizer over this vocabulary (every prompt then encodes to nothing)
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>").save_pretrained(
        work / "tokenizer"
    )
    g = torch.Generator().manual_seed(6)
    n_rows = sh["train_prompts"] * sh["train_steps"]
    ids = torch.randint(2, V, (n_rows, sh["prompt_len"]), generator=g).tolist()
    (work / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": " ".join(f"w{i}" for i in row)}) + "\n" for row in ids)
    )
    recipe = {
        "run": {"output_dir": str(work / "run"), "stages": ["train"], "seed": 0, "threads": threads or None},
        "model": {"name_or_path": str(work / "model"), "tokenizer": str(work / "tokenizer"), "dtype": dtype},
        "data": {
            "sft_train": None,
            "sft_eval": None,
            "train": str(work / "prompts.jsonl"),
            "eval": None,
            "max_prompt_length": sh["prompt_len"],
        },
        "rollout": {"backend": "engine", "max_new_tokens": sh["new"], "min_new_tokens": sh["new"], "temperature": 1.0},
        "grpo": {
            "steps": sh["train_steps"],
            "prompts_per_step": sh["train_prompts"],
            "num_generations": sh["G"],
            "micro_batch_size": sh["micro"],
            "lr": 1e-6,
            "beta": 0.04,
            "loss_type": "grpo",
        },
        "rewards": [{"name": "repetition", "unit": "char", "ngram": 3, "weight": 1.0}],
        "tracking": {"log_every": 1, "samples_every": 0},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU CI mode)")
    ap.add_argument(
        "--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder for gpu_check.json (default $OUT)"
    )
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections together (default 450)")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the rollout and train sections")
    ap.add_argument("--hf-prompts", type=int, default=None, help="prompts for the hf rows (default 16; tiny 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="GRPO steps in the train section (default 4; tiny 2)")
    ap.add_argument(
        "--train-prompts", type=int, default=None, help="prompts per GRPO step (default 16 = one engine batch of 128)"
    )
    ap.add_argument(
        "--zero2", choices=("auto", "on", "off"), default="auto", help="auto: only on CUDA with deepspeed installed"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; tiny: 1)")
    ap.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the train section (repeatable), e.g. model.fp32_lm_head=true",
    )
    ap.add_argument("--sections", default=",".join(SHARES), help="comma-separated subset of: " + ", ".join(SHARES))
    args = ap.parse_args(argv)
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False); use --device cpu --tiny",
            file=sys.stderr,
        )
        return 2
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SHARES]
    if unknown:
        print(f"error: --sections: unknown {', '.join(unknown)}; valid: {', '.join(SHARES)}", file=sys.stderr)
        return 2
    shape = dict(TINY if args.tiny else FULL)
    overrides = {"hf_prompts": args.hf_prompts, "train_steps": args.train_steps, "train_prompts": args.train_prompts}
    shape.update({k: v for k, v in overrides.items() if v})
    ctx = {
        "device": device,
        "shape": shape,
        "dtype": args.dtype,
        "zero2": args.zero2,
        "threads": threads or 0,
        "train_set": args.train_set,
    }
    meta = {
        "device": str(device),
        "mode": "tiny" if args.tiny else "full",
        "argv": sys.argv[1:],
        "versions": versions(),
        "shape": {k: v for k, v in shape.items() if k != "model"},
        "model": shape["model"],
    }
    rep = Report(Path(args.out), args.budget, meta, SHARES)
    rep.log(f"gpu_check: device {device}, {meta['mode']} shapes, budget {args.budget:.0f} s, out {rep.out}")
    plan = {
        "env": (section_env,),
        "correctness_bf16": (section_correctness, "bfloat16"),
        "correctness_fp32": (section_correctness, "float32"),
        "attention": (section_attention,),
        "rollout": (section_rollout,),
        "train": (section_train,),
    }
    for name in SHARES:
        if name in wanted:
            fn, *extra = plan[name]
            rep.run(name, fn, ctx, *extra)
    print_table(rep)
    return 1 if rep.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
