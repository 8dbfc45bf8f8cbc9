"""Recording and printing for benchmarks/gpu_check.py: results per section, JSON after every change, the final table."""

from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path

import torch


class Report:
    """All results; rewritten to OUT/gpu_check.json after every change of section."""

    def __init__(self, out: Path, budget: float, meta: dict, shares: dict[str, float]):
        self.out, self.t0, self.budget, self.shares = out, time.perf_counter(), budget, shares
        self.data = {"meta": meta, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "gpu_check.json")

    def run(self, name: str, fn, *args) -> None:
        """Runs one section with its own time share; an exception is recorded, never raised."""
        spent = sum(s.get("seconds", 0) for s in self.data["sections"].values())
        share = self.shares[name] * self.budget + max(
            0.0, sum(self.shares[k] * self.budget for k in self.data["sections"]) - spent
        )
        sec = Section(self, name, deadline=time.perf_counter() + share)
        self.data["sections"][name] = sec.data
        self.log(f"== {name} (time share {share:.0f} s)")
        if self.elapsed() > self.budget:
            sec.data.update(
                status="skipped", error=f"the whole --budget ({self.budget:.0f} s) was spent before it started"
            )
        else:
            try:
                fn(sec, *args)
                sec.data["status"] = "ok"
            except Exception as e:  # noqa: BLE001  (isolation is the point: record and go on)
                sec.data.update(
                    status="error",
                    error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                    traceback=traceback.format_exc()[-3000:],
                )
                self.log(f"{name}: ERROR {sec.data['error']}")
        sec.data["seconds"] = round(time.perf_counter() - sec.start, 1)
        free_memory()
        self.save()

    def failures(self) -> list[str]:
        bad = []
        for name, s in self.data["sections"].items():
            if s.get("status") == "error":
                bad.append(f"{name}: {s['error']}")
            bad += [f"{name}: {c['name']}" for c in s.get("checks", []) if not c["passed"]]
            bad += [f"{name}: {r['name']}: {r['error']}" for r in s.get("rows", []) if r.get("error")]
        return bad


class Section:
    """One section's record: checks (pass/fail lines), rows (measurements), free-form values."""

    def __init__(self, report: Report, name: str, deadline: float):
        self.report, self.name, self.deadline, self.start = report, name, deadline, time.perf_counter()
        self.data: dict = {"status": "running", "checks": [], "rows": []}

    def log(self, msg: str) -> None:
        self.report.log(f"{self.name}: {msg}")

    def left(self) -> float:
        return min(self.deadline - time.perf_counter(), self.report.budget - self.report.elapsed())

    def check(self, name: str, passed: bool, **numbers) -> None:
        self.data["checks"].append({"name": name, "passed": bool(passed), **numbers})
        self.log(f"{'PASS' if passed else 'FAIL'} {name} {fmt(numbers)}")
        self.report.save()

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.log(f"row {fmt(row)}")
        self.report.save()


def fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items() if k != "name")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(rep: Report) -> None:
    """The short summary printed last (the device tool keeps only the end of the output)."""
    secs, meta = rep.data["sections"], rep.data["meta"]
    env = secs.get("env", {})
    v, gpu = meta["versions"], env.get("gpu") or {}
    lines = [
        "",
        "=" * 100,
        f"gpu_check | {meta['device']} {gpu.get('name', '')} {gpu.get('memory_gib', '')} GiB | torch "
        f"{v.get('torch')} cuda {v.get('cuda')} | transformers {v.get('transformers')} | accelerate "
        f"{v.get('accelerate')} | "
        f"peft {v.get('peft')} | missing: {', '.join(env.get('missing_optional', [])) or '-'} | {meta['mode']}",
    ]
    for name, s in secs.items():
        lines.append(
            f"-- {name}: {s.get('status')} in {s.get('seconds', 0)} s" + (f" | {s['error']}" if s.get("error") else "")
        )
        for c in s.get("checks", []):
            nums = {k: c[k] for k in c if k not in ("name", "passed", "first_difference", "tokens", "completions")}
            lines.append(f"   {'PASS' if c['passed'] else 'FAIL'}  {c['name']:<48} {fmt(nums)}")
        for r in s.get("rows", []):
            lines.append("   " + _row_line(r))
    bad = rep.failures()
    lines.append(
        f"RESULT: {'FAIL' if bad else 'OK'} | {len(bad)} failure(s){': ' + '; '.join(bad)[:600] if bad else ''} | "
        f"total {rep.elapsed():.0f} s | JSON {rep.out / 'gpu_check.json'}"
    )
    print("\n".join(lines), flush=True)


def _row_line(r: dict) -> str:
    if "tokens_per_s" in r:
        frac = f"{r['floor_frac']:.1%} of bw floor" if "floor_frac" in r else "floor n/a"
        mem = f" | +{r['peak_extra_mib']} MiB" if "peak_extra_mib" in r else ""
        return f"{r['name']:<36} {r['tokens_per_s']:>10.1f} tok/s | {r['ms_per_step']:>7.2f} ms/step | {frac}{mem}" + (
            f" | {r['note']}" if r.get("note") else ""
        )
    if "median_later_steps" in r:
        m = r["median_later_steps"]
        mem = f" | peak {r['peak_cuda_mib']} MiB" if "peak_cuda_mib" in r else ""
        return (
            f"{r['name']:<36} rc {r['rc']} | {r['steps']} steps in {r['wall_s']} s | median step {m.get('time_step')} "
            "s = "
            f"rollout {m.get('time_rollout')} + score {m.get('time_score')} + logprobs {m.get('time_logprobs')} + "
            "train "
            f"{m.get('time_train')} | {m.get('tokens_per_s')} rollout tok/s{mem} | first step "
            f"{r['first_step'].get('time_step')} s"
        )
    return f"{r.get('name', '?'):<36} " + fmt({k: x for k, x in r.items() if k != "name"})
