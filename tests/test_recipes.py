"""Every shipped recipe loads; the GPU recipes pass a dry run against their process count (offline, no weights)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GPU_RECIPES = ["gsm8k_qwen.yaml", "r1_distill_math.yaml", "hub_reward_models.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_names_its_command(path):
    load_recipe(path)
    assert "python -m grpo" in path.read_text() or "accelerate launch" in path.read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_are_valid(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP") and cfg["num_processes"] >= 2
    assert "accelerate launch --config_file recipes/accelerate_configs/" + path.name in path.read_text()


def dry_run(recipe: str, n: int):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "grpo", "train", str(ROOT / "recipes" / recipe), "--dry-run", "--num-processes", str(n)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_dry_run_against_8_processes(recipe):
    ok = dry_run(recipe, 8)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "dry run OK for 8 process(es)" in ok.stdout and "weights not loaded" in ok.stdout
    bad = dry_run(recipe, 3)  # 3 processes cannot split the prompts evenly
    assert (
        bad.returncode == 2 and "must be divisible by the 3 processes" in bad.stderr and "Traceback" not in bad.stderr
    )
