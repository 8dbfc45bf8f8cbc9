"""Build the toy tool world's datasets (the JSONL files beside this module); deterministic given ``--seed``.

    python -m examples.tools.build_data              # from the repository root; writes examples/tools/*.jsonl
    python -m examples.tools.build_data --check      # rebuild in memory and compare with the shipped files

The world. Prompts are arithmetic in the toy tokenizer's alphabet: 3-digit ``Q:347+582=`` and ``Q:582-347=``
(the first operand is the larger; operands in 100..999) and 2-digit ``Q:47x38=`` (``x`` multiplies; 10..99,
so products are as long as sums: 3-digit products made 6-digit answers the tiny model did not learn to copy
in minutes). The shipped 300k-parameter base model (`data/tiny_base`, pretrained on 2-digit additions) cannot
compute these; with the calculator (`examples.tools.calculator`) it only has to copy numbers. The ideal
episode is two turns, the call and the answer::

    Q:582-347=<t>calc:582-347</t>235<a>235</a><eos>
              ^ turn 1 (sampled)  ^ observation (inserted by the environment)  ^ turn 2 (sampled)

The SFT demonstrations are imperfect on purpose, in two systematic ways (as a human demonstrator
who does not quite use the tool right):

- *when*: a multiplication is answered directly, without the tool, in ``MUL_DIRECT`` = 70% of the
  demonstrations (``Q:47x38=<a>1786</a>``: correct, but only a calculator gets it right);
- *how*: a subtraction's operands are typed into the call the wrong way round (smaller first) in
  ``SUB_SWAP`` = 70% of the demonstrations; the demo then copies the tool's (negative) answer.

Additions are always demonstrated right. So a model that imitates the demonstrations' majority
(greedy decoding) answers additions, guesses products and gets differences negated; sampling at
temperature 1 still calls the tool right ~30% of the time, which GRPO's accuracy reward can find.

Files: ``sft_train.jsonl`` (3000 demonstrations), ``sft_eval.jsonl`` (300), ``grpo_train.jsonl``
(2000 prompts, ideal completions), ``eval.jsonl`` (300 held-out problems, 100 per operation; neither
they nor their commuted twins appear in another file). Columns: ``prompt``, ``completion`` (the whole demonstrated
trajectory, observation included), ``answer``, ``source`` (add | sub | mul: eval reports
``accuracy/<source>``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOW, HIGH = 100, 999  # 3-digit operands of + and -
MUL_LOW, MUL_HIGH = 10, 99  # 2-digit operands of x (3-4 digit products, as long as the sums)
OPS = {"add": "+", "sub": "-", "mul": "x"}
MUL_DIRECT = 0.70  # share of multiplication demos answered without calling the tool
SUB_SWAP = 0.70  # share of subtraction demos whose call has the operands swapped
SIZES = {"sft_train": 3000, "sft_eval": 300, "grpo_train": 2000}
HELDOUT_PER_OP = 100


def value(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def prompt(op: str, a: int, b: int) -> str:
    return f"Q:{a}{OPS[op]}{b}="


def call_episode(expression: str, result: int) -> str:
    """A demonstrated tool-using trajectory: the call, the tool's answer, the copied answer."""
    return f"<t>calc:{expression}</t>{result}<a>{result}</a>"


def ideal_completion(op: str, a: int, b: int) -> str:
    return call_episode(f"{a}{OPS[op]}{b}", value(op, a, b))


def demo_completion(op: str, a: int, b: int, rng: random.Random) -> str:
    """An SFT demonstration, with the world's two systematic imperfections (module docstring)."""
    if op == "mul" and rng.random() < MUL_DIRECT:
        return f"<a>{value(op, a, b)}</a>"
    if op == "sub" and rng.random() < SUB_SWAP:
        return call_episode(f"{b}-{a}", b - a)
    return ideal_completion(op, a, b)


def problem(rng: random.Random, op: str) -> tuple[str, int, int]:
    low, high = (MUL_LOW, MUL_HIGH) if op == "mul" else (LOW, HIGH)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "sub":
        while a == b:
            b = rng.randint(LOW, HIGH)
        a, b = max(a, b), min(a, b)
    return op, a, b


def row(op: str, a: int, b: int, completion: str) -> dict:
    return {"prompt": prompt(op, a, b), "completion": completion, "answer": str(value(op, a, b)), "source": op}


def build(seed: int = 0) -> dict[str, list[dict]]:
    """Every file's rows. Held-out problems first (their own stream), then the others, never repeating one."""
    rng = random.Random(f"{seed}-heldout")
    heldout: list[tuple[str, int, int]] = []
    for op in OPS:
        while sum(p[0] == op for p in heldout) < HELDOUT_PER_OP:
            p = problem(rng, op)
            if p not in heldout:
                heldout.append(p)
    taken = set(heldout) | {(op, b, a) for op, a, b in heldout}  # nor its commuted twin
    files = {"eval": [row(*p, ideal_completion(*p)) for p in heldout]}
    for name, size in SIZES.items():
        rng = random.Random(f"{seed}-{name}")
        rows = []
        while len(rows) < size:
            p = problem(rng, rng.choice(list(OPS)))
            if p in taken:
                continue
            rows.append(row(*p, ideal_completion(*p) if name == "grpo_train" else demo_completion(*p, rng)))
        files[name] = rows
    return files


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the JSONL files (default: this module's)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for name, rows in build(args.seed).items():
        path = args.out / f"{name}.jsonl"
        if args.check:
            if not path.exists() or path.read_text() != to_jsonl(rows):
                stale.append(str(path))
        else:
            path.write_text(to_jsonl(rows))
    if stale:
        print(f"differs from a rebuild with --seed {args.seed}: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
