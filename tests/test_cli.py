"""The real CLI on bad input: non-zero exit, one clear line, no traceback, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_common import assert_clean_failure, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def grpo(*args, cwd=ROOT, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "grpo", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def out(tmp_path):
    return tmp_path / "run"


def test_no_command_prints_help():
    proc = grpo()
    assert proc.returncode == 2 and "sft" in proc.stdout


@pytest.mark.parametrize(
    "case",
    [
        "missing_recipe",
        "yaml_syntax",
        "unknown_key",
        "wrong_type",
        "missing_dataset",
        "no_prompt_field",
        "empty_dataset",
        "missing_model",
        "bad_override",
    ],
)
def test_sft_bad_input(tmp_path, out, case):
    recipe = ROOT / "recipes" / "quickstart.yaml"
    extra = [f"run.output_dir={out}"]
    needles = []
    if case == "missing_recipe":
        recipe, needles = tmp_path / "nope.yaml", ["recipe file not found"]
    elif case == "yaml_syntax":
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("sft: {steps: 3\n")
        needles = ["invalid YAML", "bad.yaml"]
    elif case == "unknown_key":
        extra.append("sft.stepz=3")
        needles = ["unknown key 'sft.stepz'", "valid keys in sft"]
    elif case == "wrong_type":
        extra.append("sft.steps=many")
        needles = ["'sft.steps' must be an integer"]
    elif case == "missing_dataset":
        extra.append(f"data.sft_train={tmp_path / 'nothere.jsonl'}")
        needles = ["data.sft_train", "does not exist"]
    elif case == "no_prompt_field":
        extra.append(f"data.sft_train={write_jsonl(tmp_path / 'd.jsonl', [{'question': 'a', 'response': 'b'}])}")
        needles = ["no 'prompt' / 'completion' field", "question"]
    elif case == "empty_dataset":
        (tmp_path / "empty.jsonl").write_text("")
        extra.append(f"data.sft_train={tmp_path / 'empty.jsonl'}")
        needles = ["data.sft_train", "empty"]
    elif case == "missing_model":
        extra.append(f"model.name_or_path={tmp_path / 'no_model'}")
        needles = ["does not exist"]
    elif case == "bad_override":
        extra.append("sft.steps")
        needles = ["key.sub=value"]
    proc = grpo("sft", recipe, *extra)
    assert_clean_failure(proc, *needles)
    assert not out.exists(), "a failed run must not create its output folder"


def test_debug_flag_shows_traceback(tmp_path):
    proc = grpo("sft", ROOT / "recipes" / "quickstart.yaml", "sft.stepz=1", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_finished_stage_is_not_overwritten(tmp_path, out):
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "DONE").write_text("ok\n")
    proc = grpo("sft", ROOT / "recipes" / "quickstart.yaml", f"run.output_dir={out}")
    assert_clean_failure(proc, "already holds a finished 'sft' run", "run.overwrite=true")
    assert sorted(p.name for p in (out / "sft").iterdir()) == ["DONE"]
