"""Peak memory of the log-prob forward + backward: full [tokens x vocab] logits vs the chunked LM head (issue #14).

    python benchmarks/logprob_memory.py                      # Qwen vocabulary 151936, hidden 512, 2 layers, 16 x 256
    python benchmarks/logprob_memory.py --new-tokens 128 256 512 --json out.json

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
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=4096,
                      tie_word_embeddings=a.tied)
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
    print(json.dumps(dict(variant=a.child, length=C, base=base, peak=peak, seconds=seconds,
                          logp_sum=float(logp.detach().double().sum()), grad_norm=float(grad_norm))))


def run(variant: str, length: int, a) -> dict:
    args = [sys.executable, __file__, "--child", variant, "--length", str(length), "--vocab", str(a.vocab),
            "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--layers", str(a.layers), "--heads", str(a.heads),
            "--rows", str(a.rows), "--prompt-len", str(a.prompt_len), "--threads", str(a.threads),
            "--temperature", str(a.temperature), *(["--tied"] if a.tied else []),
            *(["--chunk-size", str(a.chunk_size)] if a.chunk_size else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{variant} (C={length}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], a) -> str:
    gb = 1 << 30
    lines = [f"log-prob forward+backward, Qwen2-shaped fp32: vocab {a.vocab}, hidden {a.hidden}, ffn {a.ffn}, {a.layers} layers, "
             f"{'tied' if a.tied else 'untied'} head; {a.rows} rows x ({a.prompt_len} prompt + C completion) tokens, "
             f"{a.threads} threads",
             f"{'C':>5} {'variant':>8} {'base GB':>8} {'peak GB':>8} {'logprob part GB':>16} {'s':>6} {'logp sum':>14} {'grad norm':>12}"]
    by = {(r["variant"], r["length"]): r for r in results}
    for length in a.new_tokens:
        for v in a.variants:
            r = by[v, length]
            lines.append(f"{length:>5} {v:>8} {r['base'] / gb:>8.2f} {r['peak'] / gb:>8.2f} {(r['peak'] - r['base']) / gb:>16.2f} "
                         f"{r['seconds']:>6.1f} {r['logp_sum']:>14.3f} {r['grad_norm']:>12.5f}")
        if len(a.variants) < 2:
            continue
        f, c = by["full", length], by["chunked", length]
        lines.append(f"{length:>5} chunked/full: peak {c['peak'] / f['peak']:.2f}x, logprob part "
                     f"{(c['peak'] - c['base']) / max(1, f['peak'] - f['base']):.2f}x, time {c['seconds'] / f['seconds']:.2f}x")
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
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    results = [run(v, length, a) for length in a.new_tokens for v in a.variants]
    print(report(results, a))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), results=results), indent=1))


if __name__ == "__main__":
    main()
