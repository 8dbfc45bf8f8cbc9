"""benchmarks/gpu_check.py, the prepared GPU check (issue 17), kept from rotting: its CPU tiny mode runs every
section in an environment shaped like the GPU image (deepspeed, datasets, wandb, trl made unimportable),
and its checks can fail. Also: local JSONL loads without `datasets`, as `datasets` would load it."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, TOYWORLD

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
GPU_IMAGE_MISSING = ("deepspeed", "datasets", "wandb", "trl")

# A sitecustomize that makes these packages look not installed: find_spec gives None (availability probes
# such as transformers' is_deepspeed_available() say False) and `import x` raises ModuleNotFoundError.
BLOCKER = textwrap.dedent(f"""
    import sys
    BLOCKED = {set(GPU_IMAGE_MISSING)!r}

    class _Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
""")


def gpu_image_env(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_tiny_mode_runs_every_section_without_the_packages_the_gpu_image_lacks(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        cwd=tmp_path,
        env=gpu_image_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, tail
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "correctness_bf16", "correctness_fp32", "attention", "rollout", "train"], tail
    # the blocker really applied: the script saw the GPU image's missing packages as missing
    assert set(GPU_IMAGE_MISSING) <= set(sections["env"]["missing_optional"])
    for name, s in sections.items():
        assert s["status"] == "ok", (name, s.get("error"), s.get("traceback"))
        assert all(c["passed"] for c in s["checks"]), (name, [c for c in s["checks"] if not c["passed"]])
    paths = [
        "engine logprobs vs fresh forward",
        "shared-prefix logprobs vs reference",
        "plain forward logprobs vs reference",
    ]
    if hasattr(importlib.import_module("grpo.logprobs"), "chunked_logprobs"):
        paths.append("chunked LM head logprobs vs reference")
    for dtype in ("bf16", "fp32"):
        names = [c["name"] for c in sections[f"correctness_{dtype}"]["checks"]]
        assert "greedy engine == hf (tiny_base)" in names
        for model in ("tiny_base", "qwen2_tiny"):
            for what in paths:
                assert f"{what} ({model})" in names
    assert sections["env"]["rows"][0]["bf16_matmul_tflops"] > 0 and sections["env"]["rows"][0]["copy_gbps"] > 0
    attention = {r["name"]: r for r in sections["attention"]["rows"]}
    assert set(attention) == {"masked_gqa", "masked_expand_kv", "masked_fold_q", "padded_causal"}
    assert all(r["ms"] > 0 for r in attention.values()), attention
    assert {c["name"] for c in sections["attention"]["checks"]} == {
        "attention masked_expand_kv == masked_gqa",
        "attention masked_fold_q == masked_gqa",
    }
    rows = {r["name"]: r for r in sections["rollout"]["rows"]}
    for name in ("engine (4 prompts)", "engine (2 prompts)", "hf (2 prompts)", "hf static cache (2 prompts)"):
        assert rows[name]["completion_tokens"] == int(name.split("(")[1].split()[0]) * 4 * 8  # prompts x G x new tokens
        assert rows[name]["tokens_per_s"] > 0 and 0 < rows[name]["floor_frac"]
    train = sections["train"]["rows"][0]
    assert train["rc"] == 0 and train["steps"] == 2
    assert {"time_rollout", "time_score", "time_logprobs", "time_train"} <= set(train["median_later_steps"])
    assert (out / "train_metrics.jsonl").is_file()
    assert "RESULT: OK" in proc.stdout.splitlines()[-1]  # the table comes last


def test_a_failing_check_fails_the_run_and_says_so(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setitem(gpu_check.TOL, "float32", {"values": 0.0, "grads": 0.0})  # no computation is that exact
    rc = gpu_check.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--sections",
            "correctness_fp32",
            "--out",
            str(tmp_path),
            "--threads",
            str(torch.get_num_threads()),
        ]
    )  # leaves this process's thread count as it was
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert lines[-1].startswith("RESULT: FAIL") and "shared-prefix logprobs vs reference" in lines[-1]
    checks = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["correctness_fp32"]["checks"]
    greedy = [c for c in checks if c["name"].startswith("greedy")]
    assert greedy and greedy[0]["passed"]  # exact token equality does not depend on the tolerance


def test_jsonl_loads_without_datasets_as_datasets_loads_it(tmp_path, monkeypatch):
    from grpo.data import load_rows
    from grpo.errors import UserError

    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "extra": [1, 2]}\n')
    files = [str(TOYWORLD / "grpo_train.jsonl"), str(ragged)]
    with_datasets = [load_rows(f, "data.train") for f in files]
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert [load_rows(f, "data.train") for f in files] == with_datasets
    assert with_datasets[1] == [
        {"prompt": "a", "answer": "1", "extra": None},
        {"prompt": "b", "answer": None, "extra": [1, 2]},
    ]
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    for spec, needs in ((str(parquet), "pip install datasets"), ("openai/gsm8k:train", "pip install datasets")):
        with pytest.raises(UserError, match=needs):
            load_rows(spec, "data.train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl line 2 is not JSON"):
        load_rows(str(bad), "data.train")
