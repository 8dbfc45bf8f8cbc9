"""Rollout throughput on the GRPO-shaped workload of DESIGN.md ("Performance targets") and on the quickstart's.

Workloads (`--workload`):
  design      random-init Llama-shaped model (hidden 512, 8 layers, 8 heads, FFN 1408, vocab 32000,
              untied: 58.5M params, fp32), 16 prompts x 256 random prompt tokens, G=8 samples each,
              128 new tokens (fixed length: min_new_tokens = max_new_tokens, no stop ids), temperature 1,
              one call, on `--threads` CPU threads (default 2).
  quick       the same at a small size (hidden 256, 4 layers, vocab 8000, 4 prompts x 64, G=4, 32 new).
  quickstart  the quickstart's rollouts: data/tiny_base (~300k params), GRPO prompts of
              data/toyworld/grpo_train.jsonl, 8 prompts x G=8 per call, up to 40 new tokens (eos stops),
              temperature 1, as in recipes/quickstart.yaml; 25 calls (one per GRPO step), 1 thread.

Backends, each in its own subprocess (so each gets its own peak RSS), same model and prompts:
  hf               transformers `generate`, num_return_sequences=G (dynamic cache), via grpo's `hf` backend
  hf_static        the same with cache_implementation="static"
  hf_cb            transformers continuous batching, `model.generate_batch` (num_return_sequences=G)
  engine           grpo's `engine` backend (shared-prefix KV, continuous batching), eager decode step
  engine_static    the same with static_decode=True (static-shape step; CUDA graphs on CUDA only)
  engine_compiled  static_decode=True, compile_decode=True (the static step under torch.compile)
All of them return per-token logprobs except hf_cb (its logprobs option is left off). The `hf*`
backends warm up with a short call; the `engine*` ones with the workload's first call, whose wall
time is reported ("first call s": compilation and lazy initialisation included) and excluded from
the tokens/s; "compile s" is that first call minus a steady call of the same shapes.

Also measures the machine's fp32 matmul rate (2048^3 matmuls) and reports each backend's useful
FLOP/s (the minimal work of the job: prefill each prompt once, decode G*(N-1) tokens, LM head only
where a token is sampled, attention at its causal length) as a fraction of it.

    python benchmarks/rollout.py                  # the DESIGN.md workload (several minutes)
    python benchmarks/rollout.py --quick          # a small config, a few seconds per backend
    python benchmarks/rollout.py --backends engine,hf --threads 1
    python benchmarks/rollout.py --workload quickstart --backends engine,engine_static,engine_compiled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(hidden=512, layers=8, heads=8, ffn=1408, vocab=32000, prompts=16, prompt_len=256, group=8, new=128)
QUICK = dict(hidden=256, layers=4, heads=4, ffn=704, vocab=8000, prompts=4, prompt_len=64, group=4, new=32)
QUICKSTART = dict(model="data/tiny_base", data="data/toyworld/grpo_train.jsonl", prompts=8, group=8, new=40, calls=25)
WORKLOADS = {"design": FULL, "quick": QUICK, "quickstart": QUICKSTART}
BACKENDS = ("hf", "hf_static", "hf_cb", "engine", "engine_static", "engine_compiled")
ENGINE_OPTS = {
    "engine": {},
    "engine_static": {"static_decode": True},
    "engine_compiled": {"static_decode": True, "compile_decode": True},
}


def build_workload(shape: dict):
    """(model, list of calls (each a list of prompts), SamplingParams factory, stop ids) of a workload."""
    if "model" not in shape:
        model, prompts = build(shape)
        return model, [prompts], lambda seed: fixed_length(shape["new"], seed)
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.rollout import SamplingParams

    tok = AutoTokenizer.from_pretrained(ROOT / shape["model"])
    model = AutoModelForCausalLM.from_pretrained(ROOT / shape["model"]).float().eval()
    rows = [json.loads(line) for line in (ROOT / shape["data"]).read_text().splitlines()]
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    P = shape["prompts"]
    calls = [prompts[i * P : (i + 1) * P] for i in range(shape["calls"])]
    return (
        model,
        calls,
        lambda seed: SamplingParams(
            max_new_tokens=shape["new"], temperature=1.0, seed=seed, stop_token_ids=(tok.eos_token_id,)
        ),
    )


def fixed_length(new: int, seed: int):
    from grpo.rollout import SamplingParams

    return SamplingParams(max_new_tokens=new, min_new_tokens=new, temperature=1.0, seed=seed)


def build(shape: dict):
    """The benchmark model (fixed seed) and prompts (lists of ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        intermediate_size=shape["ffn"],
        vocab_size=shape["vocab"],
        max_position_embeddings=shape["prompt_len"] + shape["new"] + 64,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, shape["vocab"], (shape["prompts"], shape["prompt_len"]), generator=g).tolist()
    return model, prompts


def useful_flops(shape: dict, n_layer_params: int) -> float:
    """FLOPs of the minimal computation (see module docstring); 2 per multiply-add."""
    P, L, G, N, d, V = (
        shape["prompts"],
        shape["prompt_len"],
        shape["group"],
        shape["new"],
        shape["hidden"],
        shape["vocab"],
    )
    prefill_tokens, decode_tokens = P * L, P * G * (N - 1)
    linear = 2 * n_layer_params * (prefill_tokens + decode_tokens) + 2 * d * V * (P + decode_tokens)
    attn_prefill = shape["layers"] * P * 2 * L * L * d  # QK^T and PV at causal (half) length
    attn_decode = shape["layers"] * P * G * sum(4 * (L + k) * d for k in range(1, N))
    return float(linear + attn_prefill + attn_decode)


def matmul_rate(threads: int, size: int = 2048, repeats: int = 8) -> float:
    """Best-of fp32 GFLOP/s of size^3 matmuls on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(names: list[str], shape: dict, threads: int, rounds: int = 1) -> list[dict]:
    """Builds the model, warms each backend up, times the workload's calls `rounds` times, the backends
    taking turns call list by call list (so they share the machine's load); returns one dict each.

    `hf*` warm up with a 2-token call of one prompt; `engine*` with the first call itself (same shapes,
    so compilation / lazy initialisation happens there), timed as `first_s`. Peak RSS only for one backend.
    """
    import torch

    torch.set_num_threads(threads)
    model, calls, params = build_workload(shape)
    first, walls, tokens = {}, {n: [] for n in names}, dict.fromkeys(names, 0)
    generate = {n: make_generate(n, model, shape["group"]) for n in names}
    for name in names:
        t = time.perf_counter()
        if name in ENGINE_OPTS:
            generate[name](calls[0], params(0))
        else:
            generate[name](calls[0][:1], fixed_length(2, 0))
        first[name] = time.perf_counter() - t if name in ENGINE_OPTS else None
    before = rss_mb()
    for _ in range(rounds):
        for name in names:
            for i, prompts in enumerate(calls):
                t = time.perf_counter()
                tokens[name] += generate[name](prompts, params(i))
                walls[name].append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if len(names) == 1 else None
    flops = (
        useful_flops(shape, sum(p.numel() for p in model.model.layers.parameters())) if "model" not in shape else None
    )
    out = []
    for name in names:
        wall, median = sum(walls[name]), sorted(walls[name])[len(walls[name]) // 2]
        out.append(
            dict(
                backend=name,
                tokens=tokens[name],
                wall=wall,
                tok_s=tokens[name] / wall,
                calls=len(walls[name]),
                median_call_s=median,
                peak_rss_mb=peak,
                gen_mem_mb=None if peak is None else max(peak - before, 0.0),
                flops=None if flops is None else flops * rounds,
                first_s=first[name],
                compile_s=None if first[name] is None else max(first[name] - median, 0.0),
            )
        )
    return out


def make_generate(name: str, model, G: int):
    """A function (prompts, SamplingParams) -> number of completion tokens, for backend `name`."""
    from grpo.rollout import make_rollout

    if name in ("hf", "hf_static") or name in ENGINE_OPTS:
        if name in ENGINE_OPTS:
            rollout = make_rollout("engine", model, None, max_batch=128, **ENGINE_OPTS[name])
        else:
            rollout = make_rollout(
                "hf", model, None, **({"cache_implementation": "static"} if name == "hf_static" else {})
            )

        def generate(prompts, params):
            out = rollout.generate(prompts, G, params)
            assert len(out) == len(prompts) * G and all(
                params.min_new_tokens <= len(c.token_ids) <= params.max_new_tokens for c in out
            )
            return sum(len(c.token_ids) for c in out)

        return generate
    if name == "hf_cb":
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        def generate(prompts, params):
            new = params.max_new_tokens
            cfg = GenerationConfig(
                max_new_tokens=new,
                min_new_tokens=params.min_new_tokens,
                do_sample=True,
                temperature=params.temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=G,
                eos_token_id=list(params.stop_token_ids),
                pad_token_id=0,
            )
            blocks = (len(prompts) * G * (len(prompts[0]) + new)) // 64 + 8
            cb = ContinuousBatchingConfig(page_size=64, num_blocks=blocks, max_batch_tokens=4096, seed=0)
            res = model.generate_batch(prompts, generation_config=cfg, continuous_batching_config=cb)  # own thread
            assert len(res) == len(prompts) * G
            return sum(len(r.generated_tokens) for r in res.values())

        return generate
    raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKENDS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="design")
    ap.add_argument("--quick", action="store_true", help="= --workload quick (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2; 1 for the quickstart workload)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="run the backends in ONE process, taking turns (fairer on a shared machine; no per-backend RSS)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="times each backend runs the workload's calls")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workload = "quick" if args.quick else args.workload
    shape = WORKLOADS[workload]
    threads = args.threads or (1 if workload == "quickstart" else 2)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker.split(","), shape, threads, args.rounds)), flush=True)
        return
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(sorted(unknown))}; valid: {', '.join(BACKENDS)}")
    rate = matmul_rate(threads)
    print(f"workload {workload}: {shape} | threads {threads} | fp32 matmul {rate:.1f} GFLOP/s (2048^3)", flush=True)
    results = []
    groups = [args.backends] if args.interleave else args.backends.split(",")
    for group in groups:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            group,
            "--threads",
            str(threads),
            "--workload",
            workload,
            "--rounds",
            str(args.rounds),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{group}: FAILED ({proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
            continue
        results += json.loads(lines[-1][7:])
        for r in results[-len(group.split(",")) :]:
            print(f"  {r['backend']}: {r['tok_s']:.1f} tok/s in {r['wall']:.1f} s", flush=True)
    print_table(results, rate)


def print_table(results: list[dict], rate: float) -> None:
    base = {r["backend"]: r["tok_s"] for r in results}
    ref = base.get("hf")
    best_stock = max((v for k, v in base.items() if k.startswith("hf")), default=None)
    print(
        "\n| backend | completion tok/s | wall s | peak RSS MB | gen. memory MB | vs hf | vs engine | first call s "
        "| compile s | useful GFLOP/s | of matmul peak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def opt(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        gflops = None if r["flops"] is None else r["flops"] / r["wall"] / 1e9
        vs = f"{r['tok_s'] / ref:.2f}x" if ref else "-"
        vs_engine = f"{r['tok_s'] / base['engine']:.2f}x" if "engine" in base else "-"
        print(
            f"| {r['backend']} | {r['tok_s']:.1f} | {r['wall']:.1f} | {opt(r['peak_rss_mb'], '.0f')} | "
            f"{opt(r['gen_mem_mb'], '.0f')} | {vs} "
            f"| {vs_engine} | {opt(r['first_s'], '.1f')} | {opt(r['compile_s'], '.1f')} | {opt(gflops, '.1f')} "
            f"| {opt(None if gflops is None else gflops / rate, '.0%')} |"
        )
    if "engine" in base and best_stock:
        print(f"\nengine vs best stock variant: {base['engine'] / best_stock:.2f}x")


if __name__ == "__main__":
    main()
