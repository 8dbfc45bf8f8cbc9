"""Two CPU processes through `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2.

Each run asserts world size 2, identical parameters on both ranks (the trainer all-gathers a
checksum and refuses to finish otherwise), and per-step metrics equal to a single-process run of
the same global batch. `rollout.seed_per_prompt=true` makes the samples independent of the
process count, so the runs see the same completions.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

ARGS = ["grpo.steps=3", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8", "grpo.lr=1e-2",
        "grpo.beta=0.1", "rollout.max_new_tokens=8", "rollout.seed_per_prompt=true", "rollout.backend=hf", "run.threads=1",
        "rewards=[{name: 'rewards_for_tests:sevens'}]", "safety.enabled=false", "tracking.log_every=1"]


def launch(out: Path, model: Path, config: str | None, *extra) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    recipe = [str(ROOT / "recipes" / "quickstart.yaml"), f"run.output_dir={out}", f"model.name_or_path={model}", *ARGS, *extra]
    if config is None:
        cmd = [sys.executable, "-m", "grpo", "train", *recipe]
    else:
        if config == "cpu_ddp.yaml":  # DDP on CPU needs it; DeepSpeed must NOT have it (it would silently fall back to DDP)
            env["ACCELERATE_USE_CPU"] = "true"
        else:
            env.pop("ACCELERATE_USE_CPU", None)
        # fsdp.yaml's bf16 mixed precision is for GPUs; fp32 here, to compare with one process
        precision = ["--mixed_precision", "no"] if config == "fsdp.yaml" else []
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate_configs" / config),
               "--num_processes", "2", *precision, "-m", "grpo", "train", *recipe]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "train" / "run_info.json").read_text())
    metrics = [json.loads(l) for l in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return info, metrics


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model):
    return launch(tmp_path_factory.mktemp("single"), tiny_model, None)


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp.yaml"])
def test_two_processes_match_one(tmp_path, tiny_model, single, config):
    info1, m1 = single
    info2, m2 = launch(tmp_path, tiny_model, config)
    assert info1["world_size"] == 1 and info2["world_size"] == 2
    assert info2["zero_stage"] == {"cpu_ddp.yaml": 0, "zero2.yaml": 2, "zero3.yaml": 3, "fsdp.yaml": 0}[config]
    assert info2["distributed_type"] == {"cpu_ddp.yaml": "MULTI_CPU", "fsdp.yaml": "FSDP"}.get(config, "DEEPSPEED")
    a, b = info2["param_checksums"]
    assert a == pytest.approx(b, rel=1e-9)  # both ranks hold the same parameters
    assert a == pytest.approx(info1["param_checksums"][0], rel=1e-4)  # and the same as one process
    assert len(m1) == len(m2) == 3
    # the frozen reference (beta > 0): a full copy per rank, except under ZeRO-3, where it is sharded like the policy
    assert info1["reference_local_params"] == info1["params_total"]
    if config == "zero3.yaml":
        assert 0 < info2["reference_local_params"] < info2["params_total"] * 0.75
    else:
        assert info2["reference_local_params"] == info2["params_total"]
    if config == "fsdp.yaml":  # the policy is sharded (each rank holds about half)
        assert 0 < info2["policy_local_params"] < info2["params_total"] * 0.75
    for x, y in zip(m1, m2):
        for key in ("sevens", "completion_len", "loss", "zero_std_frac", "kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-5), (config, x["step"], key)


@pytest.mark.parametrize("config,use_cpu,expect", [
    ("zero2.yaml", True, "asks for DeepSpeed but accelerate set up MULTI_CPU (ACCELERATE_USE_CPU=true overrides it: unset it)"),
    ("fsdp_v1.yaml", False, "asks for FSDP version 1; grpo runs FSDP2: set fsdp_version: 2"),
])
def test_launch_that_accelerate_would_quietly_change_is_refused(tmp_path, tiny_model, config, use_cpu, expect):
    if config == "fsdp_v1.yaml":
        text = (ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1")
        (tmp_path / config).write_text(text)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    config_file = tmp_path / config if config == "fsdp_v1.yaml" else ROOT / "recipes" / "accelerate_configs" / config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes", "2",
           "--mixed_precision", "no", "-m", "grpo", "train", str(ROOT / "recipes" / "quickstart.yaml"), f"run.output_dir={tmp_path / 'run'}",
           f"model.name_or_path={tiny_model}", *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors and all(expect in l for l in errors), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "train").exists()  # nothing was trained or written


@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml", "fsdp.yaml"])
def test_sharded_resume_continues_exactly(tmp_path, tiny_model, config):
    """The sharded optimizer state is checkpointed: steps after a resume match the uninterrupted run."""
    info_full, full = launch(tmp_path / "full", tiny_model, config, "grpo.steps=4", "grpo.save_every=2", "grpo.keep_last=2")
    ckpt = tmp_path / "full" / "train" / "ckpt-2"
    if config != "fsdp.yaml":  # DeepSpeed: one shard per rank in its own format; FSDP: gathered whole into state.pt
        assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if "optim_states" in p.name) == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    info, resumed = launch(tmp_path / "resumed", tiny_model, config, "grpo.steps=4", f"grpo.resume={ckpt}")
    assert [m["step"] for m in resumed] == [m["step"] for m in full[2:]]
    for x, y in zip(full[2:], resumed):
        for key in ("sevens", "completion_len", "loss", "kl", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (config, x["step"], key)
    assert info["param_checksums"][0] == pytest.approx(info_full["param_checksums"][0], rel=1e-7)
    if config == "zero2.yaml":  # one process, no DeepSpeed: weights and counters restored, Adam restarts (logged)
        _, other = launch(tmp_path / "one", tiny_model, None, "grpo.steps=4", f"grpo.resume={ckpt}")
        assert [m["step"] for m in other] == [m["step"] for m in full[2:]]
    if config == "fsdp.yaml":  # the FSDP checkpoint's optimizer state is whole: one process continues exactly too
        _, other = launch(tmp_path / "one", tiny_model, None, "grpo.steps=4", f"grpo.resume={ckpt}")
        for x, y in zip(full[2:], other):
            for key in ("sevens", "loss", "kl", "grad_norm"):
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), ("fsdp -> 1 process", x["step"], key)


def test_whole_pipeline_under_zero3_and_fsdp(tmp_path):
    """`accelerate launch -m grpo pipeline`: every stage (SFT, reward models, both GRPO runs, eval) runs with
    its weights sharded, saves whole models, and ZeRO-3 and FSDP give the same held-out results."""
    results = {}
    for config in ("zero3.yaml", "fsdp.yaml"):
        out = tmp_path / config.split(".")[0]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
        env.pop("ACCELERATE_USE_CPU", None)
        precision = ["--mixed_precision", "no"] if config == "fsdp.yaml" else []
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate_configs" / config),
               "--num_processes", "2", *precision, "-m", "grpo", "pipeline", str(ROOT / "recipes" / "quickstart.yaml"),
               f"run.output_dir={out}", "sft.steps=6", "rm.steps=6", "grpo.steps=3", "grpo.beta=0.04", "run.threads=1", "eval.limit=40"]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads((out / "train" / "run_info.json").read_text())["world_size"] == 2
        rm = json.loads((out / "rm" / "results.json").read_text())
        results[config] = (json.loads((out / "eval" / "results.json").read_text())["results"],
                           {k: v["after"] for k, v in rm.items()})
    (eval3, rm3), (evalf, rmf) = results["zero3.yaml"], results["fsdp.yaml"]
    assert rm3.keys() == {"usefulness", "safety"} and rm3["usefulness"]["pair_accuracy"] > 0.6  # it learned, and saved
    for kind in rm3:
        assert rm3[kind] == pytest.approx(rmf[kind], rel=1e-4), kind
    assert list(eval3) == list(evalf) == ["base", "sft", "grpo_unconstrained", "grpo"]
    for label in eval3:
        assert eval3[label]["accuracy"] == pytest.approx(evalf[label]["accuracy"]), label
