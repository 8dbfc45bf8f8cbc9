"""Build the LoRA domain example's data (examples/domain/): 2-digit subtraction, taught to a base that only adds.

    python examples/domain/make_data.py            # rewrites the *.jsonl files beside this script
    python examples/domain/make_data.py --check    # exit 1 if the shipped files differ from what it makes

Shaped like real domain tuning: a few hundred demonstrations written by someone who makes a SYSTEMATIC
mistake, many more prompts with a checkable answer and no demonstration, and a held-out set.

- Task: `Q:52-38=` -> `<t>12-8=4,5-3-1=1</t><a>14</a>` (units step; tens step with `-1` when the units
  borrowed; the answer). The base model (data/tiny_base) has only seen addition (`<t>7+8=15,4+3+1=8</t>`).
- Demonstrations (`train.jsonl`, SFT): `--forget` of the demos that need a borrow forget it in the tens
  step (`5-3=2`, answer 24 instead of 14), as a demo writer with a habit would; the rest are right. SFT
  learns the format and the digit facts, and copies the habit.
- GRPO prompts (`prompts.jsonl`): prompt + `answer` only; the exact-answer reward fixes the habit.
- Held-out (`eval.jsonl`): correct completions (for reference and SFT eval loss), never seen in training.
- Every file also in chat form (`*_chat.jsonl`, `{"messages": [...], "answer"}`): the same rows rendered by
  data/tiny_base's chat template (user content after `Q:`), token for token the same as the plain form.

Disjoint problem sets (a >= b, both 10..99, shuffled with a fixed seed); deterministic output.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("train", "prompts", "eval")  # SFT demos, GRPO prompts, held-out; each also as <name>_chat.jsonl


def solve(a: int, b: int, forget_borrow: bool = False) -> tuple[str, str]:
    """(completion, its answer) for a - b; `forget_borrow`: the demo writer's habit (tens step without -1)."""
    au, at, bu, bt = a % 10, a // 10, b % 10, b // 10
    if au >= bu:
        units, borrow = f"{au}-{bu}={au - bu}", 0
    else:
        units, borrow = f"1{au}-{bu}={10 + au - bu}", 1
    if borrow and not forget_borrow:
        tens = f"{at}-{bt}-1={at - bt - 1}"
    else:
        tens = f"{at}-{bt}={at - bt}"
    value = int(tens.rsplit("=", 1)[1]) * 10 + int(units.rsplit("=", 1)[1])
    return f"<t>{units},{tens}</t><a>{value}</a>", str(value)


def needs_borrow(a: int, b: int) -> bool:
    return a % 10 < b % 10


def rows(problems, forget: float, rng: random.Random, with_completion: bool) -> list[dict]:
    out = []
    for a, b in problems:
        answer = str(a - b)
        row = {"prompt": f"Q:{a}-{b}="}
        if with_completion:
            row["completion"] = solve(a, b, forget_borrow=needs_borrow(a, b) and rng.random() < forget)[0]
        row["answer"] = answer
        out.append(row)
    return out


def chat(row: dict) -> dict:
    messages = [{"role": "user", "content": row["prompt"].removeprefix("Q:")}]
    if "completion" in row:
        messages.append({"role": "assistant", "content": row["completion"]})
    return {"messages": messages, "answer": row["answer"]}


def build(seed: int, n_sft: int, n_prompts: int, n_eval: int, forget: float) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    problems = [(a, b) for a in range(10, 100) for b in range(10, a + 1)]
    rng.shuffle(problems)
    held, sft, prompts = (
        problems[:n_eval],
        problems[n_eval : n_eval + n_sft],
        problems[n_eval + n_sft : n_eval + n_sft + n_prompts],
    )
    files = {
        "train": rows(sft, forget, rng, with_completion=True),
        "prompts": rows(prompts, 0.0, rng, with_completion=False),
        "eval": rows(held, 0.0, rng, with_completion=True),
    }
    files.update({f"{name}_chat": [chat(r) for r in rs] for name, rs in list(files.items())})
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft", type=int, default=300, help="demonstrations (train.jsonl)")
    ap.add_argument("--prompts", type=int, default=1000, help="GRPO prompts (prompts.jsonl)")
    ap.add_argument("--eval", type=int, default=200, help="held-out problems (eval.jsonl)")
    ap.add_argument("--forget", type=float, default=0.7, help="share of borrow demos that forget the borrow")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = ap.parse_args(argv)
    files = build(args.seed, args.sft, args.prompts, args.eval, args.forget)
    stale = []
    for name, rs in files.items():
        text = "".join(json.dumps(r) + "\n" for r in rs)
        path = args.out / f"{name}.jsonl"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run `python {Path(__file__).as_posix()}`", file=sys.stderr)
        return 1
    demos = files["train"]
    borrow = [r for r in demos if needs_borrow(*map(int, r["prompt"][2:-1].split("-")))]
    wrong = sum(solve(*map(int, r["prompt"][2:-1].split("-")))[0] != r["completion"] for r in demos)
    print(
        f"{len(demos)} demos ({len(borrow)} need a borrow, {wrong} of those forget it), "
        f"{len(files['prompts'])} GRPO prompts, {len(files['eval'])} held-out"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
