"""One AdamW step at the Qwen vocabulary: `optim: adamw` (torch's default kernel) vs `adamw_fused`, side by side.

The parameters are an untied embedding and output layer of `--vocab` x `--hidden` (the two largest tensors of a
152k-vocabulary model; 2 x 77.8M parameters at hidden 512) plus `--layers` square matrices, each with a
gradient, built through `grpo.runtime.build_optimizer` as sft / rm / grpo build it. Each kernel runs in its own
process (ru_maxrss is per process): the first step (it allocates Adam's two moments) and then `--steps` more;
reported: the peak RSS the step adds above parameters + gradients, Adam's moments (2 x the parameters), what
the step holds beyond them (its temporaries), and the median step time. On CPU torch's default is a
per-parameter loop whose step makes temporaries twice the size of the largest parameter; on CUDA it is `foreach`,
whose temporaries are the size of a whole parameter group (all the matrices); the fused kernel makes none.

    python benchmarks/optimizer_step.py                      # vocab 151,936, hidden 512
    python benchmarks/optimizer_step.py --hidden 896 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(a) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from grpo.runtime import build_optimizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(a.vocab, a.hidden)) for _ in range(2)]
        + [torch.nn.Parameter(torch.randn(a.hidden, a.hidden)) for _ in range(a.layers)]
    )
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = build_optimizer(model, lr=1e-5, weight_decay=0.0, optim=a.child)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(1 + a.steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = sum(p.numel() for p in params)
    moments = 2 * n * 4 / 2**20
    return {
        "params_mb": n * 4 / 2**20,
        "step_peak_mb": peak - before,
        "moments_mb": moments,
        "temporaries_mb": peak - before - moments,
        "step_s": statistics.median(times[1:]) if a.steps else times[0],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8, help="extra hidden x hidden matrices")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["adamw", "adamw_fused"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    rows = {}
    for optim in ("adamw", "adamw_fused"):
        cmd = [sys.executable, __file__, "--child", optim, *(argv if argv is not None else sys.argv[1:])]
        rows[optim] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(
        f"AdamW step: 2 x {a.vocab} x {a.hidden} + {a.layers} x {a.hidden}^2 fp32 parameters "
        f"({rows['adamw']['params_mb']:.0f} MB), {a.threads} threads, median of {a.steps} steps after the first"
    )
    print("  optim         step peak MB   moments MB   temporaries MB   step s")
    for optim, r in rows.items():
        print(
            f"  {optim:<12}  {r['step_peak_mb']:>12.0f}   {r['moments_mb']:>10.0f}   {r['temporaries_mb']:>14.0f}"
            f"   {r['step_s']:>6.2f}"
        )
    f, d = rows["adamw_fused"], rows["adamw"]
    peak, step = f["step_peak_mb"] / d["step_peak_mb"], f["step_s"] / d["step_s"]
    print(f"  fused / default: step peak {peak:.2f}x, step time {step:.2f}x")


if __name__ == "__main__":
    main()
