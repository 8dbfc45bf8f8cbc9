"""Multi-turn rollout throughput: the engine continuing on its KV cache vs prefilling the history every turn.

Workload (a toy tool task with tool-shaped episodes): arithmetic prompts of data/toyworld/grpo_train.jsonl
("Q:29+87="), the toy character tokenizer (data/tokenizer), a random-init Llama built from a config (`--hidden`,
`--layers`, fp32, fixed seed), `--prompts` prompts x G=`--group` samples per call, temperature 1. Every episode
has exactly `--turns` turns of `--turn-tokens` sampled tokens (no stop ids: the same token counts on every
backend); after each turn but the last a calculator environment inserts its answer as an observation,
"<t>calc 116</t>" (~10 tokens). A random-init model cannot write tool calls, so the environment answers every
turn: the benchmark measures the rollout's shape (turns, growing histories), not the model's tool use.

Backends, side by side in ONE process (they take turns call list by call list, so they share the machine's load):
  engine            grpo's `engine`, `run_episodes` continuing on its KV cache (`open_episodes`): the prompt is
                    prefilled once per group, a turn feeds only the last token and the observation
  engine_reprefill  the same engine, `kv_continuation=False`: prompt + trajectory prefilled again every turn
  hf                transformers `generate` through grpo's `hf` backend (re-prefill, the only way it can)
  engine_static     as `engine`, with static_decode=True (optional; CUDA graphs on CUDA only)
Before timing, a greedy call checks that every backend produces the same trajectories (token for token).
Reported: sampled (completion) tokens per second, and ratios against `hf` and `engine_reprefill`.

    python benchmarks/multiturn_rollout.py                  # default shape, ~2-4 minutes on 2 cores
    python benchmarks/multiturn_rollout.py --turns 6 --turn-tokens 16 --rounds 3
    python benchmarks/multiturn_rollout.py --hidden 128 --layers 2 --calls 2   # seconds
    python benchmarks/multiturn_rollout.py --device cuda --dtype bfloat16 --backends engine,engine_static,hf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("engine", "engine_reprefill", "hf", "engine_static")
OBSERVATION = "<t>calc {}</t>"


class Calculator:
    """Answers each turn but the last with the prompt's sum as an observation (the episode has `turns` turns)."""

    def __init__(self, row: dict, turns: int):
        self.answer, self.turns, self.seen = row["answer"], turns, 0

    def reset(self, row):
        return None

    def step(self, text, ids):
        self.seen += 1
        return OBSERVATION.format(self.answer) if self.seen < self.turns else None


def build(args):
    """(model, tokenizer, prompt rows) of the workload."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "data" / "tokenizer")
    rows = [json.loads(x) for x in (ROOT / "data" / "toyworld" / "grpo_train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["category"] == "math"]
    for r in rows:
        r["prompt_ids"] = tok(r["prompt"], add_special_tokens=False).input_ids
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 32,
        intermediate_size=args.hidden * 4,
        vocab_size=len(tok),
        max_position_embeddings=32 + budget(args),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(args.device, getattr(torch, args.dtype)).eval(), tok, rows


def budget(args) -> int:
    """The whole trajectory's token budget: every turn plus every observation (answers have <= 4 digits)."""
    return args.turns * args.turn_tokens + (args.turns - 1) * 16


def make_run(name: str, model, tok, args):
    """A function (rows, seed, temperature) -> completions of backend `name`."""
    from grpo.rollout import SamplingParams, make_rollout
    from grpo.rollout.multiturn import TurnLimits, run_episodes

    if name == "hf":
        rollout, kv = make_rollout("hf", model, tok), False
    else:
        opts = {"static_decode": True} if name == "engine_static" else {}
        rollout, kv = make_rollout("engine", model, tok, **opts), name != "engine_reprefill"
    limits = TurnLimits(max_turns=args.turns, max_tokens_per_turn=args.turn_tokens, max_observation_tokens=32)

    def run(rows, seed, temperature=1.0):
        params = SamplingParams(max_new_tokens=budget(args), temperature=temperature, seed=seed)
        comps, episodes = run_episodes(
            rollout,
            tok,
            rows,
            [r["prompt_ids"] for r in rows],
            args.group,
            params,
            lambda row: Calculator(row, args.turns),
            limits,
            kv_continuation=kv,
        )
        assert all(e.turns == args.turns for e in episodes)
        return comps

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="engine,engine_reprefill,hf")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per call")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=32, help="sampled tokens per turn")
    ap.add_argument("--calls", type=int, default=3, help="calls per round (different prompts)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    names = args.backends.split(",")
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(sorted(unknown))}; valid: {', '.join(BACKENDS)}")
    import torch

    torch.set_num_threads(args.threads)
    model, tok, rows = build(args)
    runs = {n: make_run(n, model, tok, args) for n in names}
    calls = [rows[i * args.prompts : (i + 1) * args.prompts] for i in range(args.calls)]
    print(
        f"model hidden {args.hidden} x {args.layers} layers ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, {args.dtype}, {args.device}) | {args.prompts} prompts x G={args.group} | {args.turns} turns x "
        f"{args.turn_tokens} tokens + obs. | {args.calls} calls x {args.rounds} rounds | threads {args.threads}",
        flush=True,
    )
    greedy = {n: [c.token_ids for c in runs[n](calls[0][:2], 0, temperature=0.0)] for n in names}  # also a warm-up
    same = all(greedy[n] == greedy[names[0]] for n in names)
    print(f"greedy trajectories identical across {', '.join(names)}: {same}", flush=True)
    sampled, trajectory, walls = dict.fromkeys(names, 0), dict.fromkeys(names, 0), {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            for i, call in enumerate(calls):
                t = time.perf_counter()
                comps = runs[n](call, 1000 * r + i)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                walls[n].append(time.perf_counter() - t)
                sampled[n] += sum(sum(c.sampled_mask) for c in comps)
                trajectory[n] += sum(len(c.token_ids) for c in comps)
    rate = {n: sampled[n] / sum(walls[n]) for n in names}
    columns = "backend, sampled tokens, trajectory tokens, wall s, median call s, sampled tok/s, vs hf, vs re-prefill"
    print("\n| " + " | ".join(columns.split(", ")) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        vs_hf = f"{rate[n] / rate['hf']:.2f}x" if "hf" in rate else "-"
        vs_re = f"{rate[n] / rate['engine_reprefill']:.2f}x" if "engine_reprefill" in rate else "-"
        median = sorted(walls[n])[len(walls[n]) // 2]
        print(
            f"| {n} | {sampled[n]} | {trajectory[n]} | {sum(walls[n]):.2f} | {median:.3f} | {rate[n]:.0f} "
            f"| {vs_hf} | {vs_re} |"
        )
    if not same:
        raise SystemExit("greedy trajectories differ between backends (see above)")


if __name__ == "__main__":
    main()
