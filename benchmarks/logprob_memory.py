"""Peak memory of the log-prob forward + backward: full [tokens x vocab] logits vs the chunked LM head (issue #14).

    python benchmarks/logprob_memory.py                      # Qwen vocabulary 151936, hidden 512, 2 layers, 16 x 256
    python benchmarks/logprob_memory.py --new-tokens 128 256 512 --json out.json
    python benchmarks/logprob_memory.py --step --new-tokens 128 256 512 1024 --micro-batch-tokens 2048   # whole GRPO
    steps

One forward + backward of the policy's completion log-probs on the plain layout (16 rows of
``[prompt | completion]``, random tokens, random-init Qwen2-shaped model in fp32, untied lm_head
unless --tied), loss = sum of the log-probs, as the training step runs it:

  full     today's path: the model's ``[rows, C + 1, V]`` logits (``logits_to_keep``), then
           `grpo.logprobs.selective_log_softmax` (one row's log-sum-exp at a time).
  chunked  `grpo.logprobs.forward_logprobs`: the output layer, fp32 log-sum-exp and gather run
           ``--chunk-size`` tokens at a time (default: 2^24 logits per chunk) and are recomputed
           in the backward; no ``[tokens, V]`` tensor.

Each (variant, length) runs in its own subprocess (this parent imports no torch), so each peak RSS
(ru_maxrss) is its own. Reported: RSS after building the model and inputs ("base"), peak RSS at the
end, their difference ("logprob part": activations, logits and gradients of the step), the wall time
(noisy on a shared machine: not a claim), and a checksum (sum of log-probs, gradient norm) that the
variants must share. Ratios are chunked / full, measured side by side in one run.

With --step: whole GRPO steps of the real trainer instead (benchmarks/vs_trl.py's `ours` runner,
`grpo.trainer.run_grpo`: engine rollout, reference pass with beta 0.04, shared-prefix policy
forward/backward, AdamW step), Llama-shaped, --prompts x --G completions of exactly C tokens, at a
fixed token budget per micro-batch (`grpo.micro_batch_tokens` = --micro-batch-tokens), one
subprocess per length. Reported per length, the largest over the steps after the first (whose update
allocates AdamW's state), with the kernel's high-water mark reset before each measured call
(vs_trl.PhasePeaks): the micro-batches of a step and their largest packed size; the RSS between
steps; the growth over the RSS at its start of each reference forward, of each micro-batch's policy
forward+backward (the "logprob part", with the gradients the step's first backward allocates), and
of the AdamW step; and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "chunked")


def child(a) -> None:
    import resource

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    sys.path.insert(0, str(ROOT))
    from grpo.logprobs import forward_logprobs, selective_log_softmax

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=a.tied,
    )
    model = AutoModelForCausalLM.from_config(cfg).train()
    C = a.length
    ids = torch.randint(0, a.vocab, (a.rows, a.prompt_len + C), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    targets = ids[:, -C:]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if a.child == "full":
        logits = model(**inputs, use_cache=False, logits_to_keep=C + 1).logits[:, :-1]
        logp = selective_log_softmax(logits, targets, temperature=a.temperature)
        del logits
    else:
        logp = forward_logprobs(model, inputs, targets, temperature=a.temperature, chunk_size=a.chunk_size)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    print(
        json.dumps(
            dict(
                variant=a.child,
                length=C,
                base=base,
                peak=peak,
                seconds=seconds,
                logp_sum=float(logp.detach().double().sum()),
                grad_norm=float(grad_norm),
            )
        )
    )


def run(variant: str, length: int, a) -> dict:
    args = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--length",
        str(length),
        "--vocab",
        str(a.vocab),
        "--hidden",
        str(a.hidden),
        "--ffn",
        str(a.ffn),
        "--layers",
        str(a.layers),
        "--heads",
        str(a.heads),
        "--rows",
        str(a.rows),
        "--prompt-len",
        str(a.prompt_len),
        "--threads",
        str(a.threads),
        "--temperature",
        str(a.temperature),
        *(["--tied"] if a.tied else []),
        *(["--chunk-size", str(a.chunk_size)] if a.chunk_size else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{variant} (C={length}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], a) -> str:
    gb = 1 << 30
    lines = [
        f"log-prob forward+backward, Qwen2-shaped fp32: vocab {a.vocab}, hidden {a.hidden}, ffn {a.ffn}, {a.layers} "
        "layers, "
        f"{'tied' if a.tied else 'untied'} head; {a.rows} rows x ({a.prompt_len} prompt + C completion) tokens, "
        f"{a.threads} threads",
        f"{'C':>5} {'variant':>8} {'base GB':>8} {'peak GB':>8} {'logprob part GB':>16} {'s':>6} {'logp sum':>14} "
        f"{'grad norm':>12}",
    ]
    by = {(r["variant"], r["length"]): r for r in results}
    for length in a.new_tokens:
        for v in a.variants:
            r = by[v, length]
            lines.append(
                f"{length:>5} {v:>8} {r['base'] / gb:>8.2f} {r['peak'] / gb:>8.2f} "
                f"{(r['peak'] - r['base']) / gb:>16.2f} "
                f"{r['seconds']:>6.1f} {r['logp_sum']:>14.3f} {r['grad_norm']:>12.5f}"
            )
        if len(a.variants) < 2:
            continue
        f, c = by["full", length], by["chunked", length]
        lines.append(
            f"{length:>5} chunked/full: peak {c['peak'] / f['peak']:.2f}x, logprob part "
            f"{(c['peak'] - c['base']) / max(1, f['peak'] - f['base']):.2f}x, time {c['seconds'] / f['seconds']:.2f}x"
        )
    return "\n".join(lines)


def step_sweep(a) -> list[dict]:
    """--step: one `vs_trl` ours run per completion length, each in its own subprocess (assets built in another)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vs_trl

    out = []
    for length in a.new_tokens:
        va = vs_trl.parse(
            [
                "--vocab",
                str(a.vocab),
                "--hidden",
                str(a.hidden),
                "--ffn",
                str(a.ffn),
                "--layers",
                str(a.layers),
                "--heads",
                str(a.heads),
                "--prompts",
                str(a.prompts),
                "--G",
                str(a.G),
                "--prompt-len",
                str(a.prompt_len),
                "--new-tokens",
                str(length),
                "--micro-batch-tokens",
                str(a.micro_batch_tokens),
                "--threads",
                str(a.threads),
                "--warmup",
                "1",
                "--steps",
                str(a.steps),
                "--loss-types",
                "grpo",
                "--runners",
                "ours",
            ]
        )
        with tempfile.TemporaryDirectory(prefix="grpo_logprob_step_") as tmp:
            vs_trl.spawn("assets", "grpo", Path(tmp), va)
            r = vs_trl.spawn("ours", "grpo", Path(tmp), va)
        r |= {"length": length, "summary": vs_trl.summarize(r, 1), "phase_peaks": vs_trl.phase_peaks(r, 1)}
        print(
            f"C={length}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['summary']['step']:.1f} s/step ({r['wall_s']:.0f} s)",
            flush=True,
        )
        out.append(r)
        print(step_report(out, a).splitlines()[-1], flush=True)
        if a.json:  # after every length: a later one may not fit
            Path(a.json).write_text(json.dumps({"args": vars(a), "results": out}, indent=1))
    return out


def growth(result: dict, warmup: int = 1) -> dict[str, float]:
    """Largest RSS growth (MB) over the steps after `warmup`: "ref": a reference forward over the RSS at its start;
    "fwd+bwd": a micro-batch's policy forward and backward over the RSS at the forward's start (the step's first
    backward also allocates the gradients); "adamw": the optimizer step over the RSS at its start."""
    out = {"ref": 0.0, "fwd+bwd": 0.0, "adamw": 0.0}
    updates, forward = 0, None
    for c in result.get("phases", []):
        if c["name"] == "forward":
            forward = c
        if updates >= warmup:
            if c["name"] == "ref_forward":
                out["ref"] = max(out["ref"], c["peak_mb"] - c["rss_mb"])
            elif c["name"] == "backward" and forward is not None:
                out["fwd+bwd"] = max(out["fwd+bwd"], max(forward["peak_mb"], c["peak_mb"]) - forward["rss_mb"])
            elif c["name"] == "optimizer":
                out["adamw"] = max(out["adamw"], c["peak_mb"] - c["rss_mb"])
        updates += c["name"] == "update"
    return out


def step_report(results: list[dict], a) -> str:
    lines = [
        f"GRPO steps (grpo.trainer.run_grpo), Llama-shaped fp32: vocab {a.vocab}, hidden {a.hidden}, ffn {a.ffn}, "
        f"{a.layers} layers; {a.prompts} prompts x G={a.G}, {a.prompt_len} prompt + C completion tokens, beta 0.04, "
        f"grpo.micro_batch_tokens={a.micro_batch_tokens}, {a.threads} threads; RSS MB, largest over {a.steps} step(s) "
        "after 1 warm-up: between steps (at the rollout's start), growth of a reference forward, of a micro-batch's "
        "policy forward+backward, of the AdamW step; the process's peak",
        f"{'C':>5} {'micro-batches':>13} {'max tokens':>10} {'between steps':>13} {'ref fwd +':>9} {'fwd+bwd +':>9} "
        f"{'AdamW +':>7} {'step peak':>9} {'s/step':>7}",
    ]
    for r in results:
        sizes, g = r["micro_tokens"][-1], growth(r)
        lines.append(
            f"{r['length']:>5} {len(sizes):>13} {max(sizes):>10} {r['phase_peaks']['rollout'][0]:>13.0f} "
            f"{g['ref']:>9.0f} {g['fwd+bwd']:>9.0f} {g['adamw']:>7.0f} {r['peak_rss_mb']:>9.0f} "
            f"{r['summary']['step']:>7.1f}"
        )
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rows", type=int, default=16, help="completions per micro-batch")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[256], help="completion lengths C")
    p.add_argument("--tied", action="store_true", help="tie lm_head to the input embeddings (default: untied)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: grpo.logprobs' choice)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--step", action="store_true", help="whole GRPO steps of the trainer at a token budget (see above)")
    p.add_argument("--prompts", type=int, default=2, help="--step: prompts per step")
    p.add_argument("--G", type=int, default=8, help="--step: completions per prompt")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="--step: grpo.micro_batch_tokens")
    p.add_argument("--steps", type=int, default=1, help="--step: measured steps after 1 warm-up step")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    if a.step:
        results = step_sweep(a)
        print(step_report(results, a))
    else:
        results = [run(v, length, a) for length in a.new_tokens for v in a.variants]
        print(report(results, a))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), results=results), indent=1))


if __name__ == "__main__":
    main()
