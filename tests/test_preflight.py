"""Preflight (grpo/preflight.py): a bad recipe fails in seconds, before weights, process groups or folders exist.

First `preflight` / `check` in-process, then a battery of bad inputs through the real CLI (`python -m grpo ...`
in a subprocess): exit code 2, exactly one `error: ...` line naming the problem, no traceback, no output
folder. Inputs tests/test_cli.py already covers (missing recipe, YAML syntax, unknown key, wrong top-level
type, missing / empty dataset, missing SFT columns, missing model, bad override, finished stage) are not
repeated here. The CLI cases need grpo/cli.py to call `grpo.preflight.check` (see its module docstring).
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.config import load_recipe
from grpo.errors import UserError
from grpo.preflight import check, env_world_size, preflight
from helpers_common import assert_clean_failure, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


PINNED = [
    "grpo.prompts_per_step=4",
    "grpo.num_generations=8",
    "grpo.micro_batch_size=32",
    "rollout.max_new_tokens=40",
    "data.max_prompt_length=32",
    "sft.max_length=64",
    "safety.enabled=false",
    "rewards=[{name: accuracy}, {name: format, weight: 0.1}]",
]  # the quickstart values these tests count with


def recipe(out, *overrides):
    return load_recipe(QUICKSTART, [f"run.output_dir={out}", "run.threads=1", *PINNED, *overrides])


def cli(*args, env=None, timeout=180):
    """The real CLI in a subprocess, one thread, offline; `env` adds (or, with None values, removes) variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full = {
        **base,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "grpo", *map(str, args)],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------- in-process
def test_quickstart_passes_every_stage(tmp_path):
    # As shipped: its reward models are written by its own rm stage, and tiny_base's context (64 tokens) is
    # below the declared 32-token prompts + 40 new tokens, but the real prompts (<= 24 tokens) are what counts.
    r = load_recipe(QUICKSTART, [f"run.output_dir={tmp_path / 'run'}"])
    check(r, r.run.stages, 1)
    for i, stage in enumerate(r.run.stages):
        assert preflight(r, stage, 1, earlier=tuple(r.run.stages[:i])) == [], stage
    assert not (tmp_path / "run").exists()
    r = recipe(tmp_path / "run")  # the pinned variant every other test starts from
    for stage in ("sft", "rm", "train", "eval"):
        assert preflight(r, stage, 1) == [], stage


def test_check_raises_the_first_problem_and_logs_the_rest(tmp_path, caplog):
    r = recipe(tmp_path, "grpo.num_generations=1", "grpo.loss_type=ppo", "rollout.backend=fast")
    with caplog.at_level(logging.WARNING, logger="grpo.preflight"), pytest.raises(UserError) as e:
        check(r, ["train"], 1)
    msg = str(e.value)
    assert msg.startswith("grpo.num_generations=1") and msg.endswith("(+2 more, listed above)"), msg
    assert "\n" not in msg
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert "unknown loss type 'ppo'" in logged and "unknown rollout backend 'fast'" in logged


@pytest.mark.parametrize(
    "overrides, world, needle",
    [
        (["grpo.prompts_per_step=3"], 2, "must be divisible by the 2 processes"),
        (["grpo.prompts_per_step=0"], 1, "grpo.prompts_per_step=0 must be >= 1"),
        (["grpo.micro_batch_size=0"], 1, "grpo.micro_batch_size=0 must be >= 1"),
        (["tracking.log_every=0"], 1, "tracking.log_every=0 must be >= 1"),
        (["grpo.lr=0"], 1, "grpo.lr=0.0 must be > 0"),
        (["rollout.min_new_tokens=50"], 1, "rollout.min_new_tokens=50 must be in [0, rollout.max_new_tokens=40]"),
        (["rollout.top_k=-1"], 1, "rollout.top_k=-1 must be >= 0"),
        (["grpo.scale=std"], 1, "unknown advantage scale 'std'"),
        (["grpo.reward_mode=mean"], 1, "unknown reward combination mode 'mean'"),
        (["rollout.backend=vllm"], 1, "rollout.backend=vllm is not offered"),
        (["grpo.resume=/nowhere/ckpt-3"], 1, "not a checkpoint folder"),
    ],
)
def test_train_problems(tmp_path, overrides, world, needle):
    problems = preflight(recipe(tmp_path, *overrides), "train", world)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize(
    "overrides, world",
    [
        (["grpo.prompts_per_step=4", "grpo.micro_batch_size=8"], 2),
        (
            ["grpo.micro_batch_size=5", "grpo.loss_type=dapo"],
            1,
        ),  # dapo normalises by the step's token count: any split is exact
        (["grpo.micro_batch_size=64"], 1),  # one micro-batch
    ],
)
def test_good_geometry_passes(tmp_path, overrides, world):
    assert preflight(recipe(tmp_path, *overrides), "train", world) == []


def test_context_counts_the_real_prompts(tmp_path):
    assert (
        preflight(recipe(tmp_path, "rollout.max_new_tokens=40"), "train", 1) == []
    )  # 32 + 40 > 64, but prompts are short
    problems = preflight(recipe(tmp_path, "rollout.max_new_tokens=60"), "train", 1)
    assert len(problems) == 1 and "exceed the model's context of 64 tokens" in problems[0], problems
    assert "rollout.max_new_tokens=60" in problems[0]
    problems = preflight(recipe(tmp_path, "eval.max_new_tokens=60"), "eval", 1)
    assert len(problems) == 1 and "eval.max_new_tokens=60" in problems[0], problems
    problems = preflight(recipe(tmp_path, "sft.max_length=100", "sft.packing=true"), "sft", 1)
    assert len(problems) == 1 and "sft.max_length=100 exceeds the model's context of 64" in problems[0], problems
    assert preflight(recipe(tmp_path, "sft.max_length=100"), "sft", 1) == []  # no example is that long


def test_rewards_resolve_and_match_the_data(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:1+1=", "solution": "2"}])
    cases = {
        "rewards=[{name: acuracy}]": "unknown reward 'acuracy'",
        "rewards=[{name: 'not_a_module_xyz:f'}]": "cannot import module 'not_a_module_xyz'",
        "rewards=[{name: 'rewards_for_tests:missing'}]": "has no attribute 'missing'",
        "rewards=[{name: format, tgs: [a, b]}]": "unknown setting(s) tgs in its recipe entry; it accepts tags",
        "rewards=[{name: 'rewards_for_tests:no_columns'}]": "give it a **columns parameter",
        "rewards=[]": "the recipe has no rewards",
        "rewards=[{name: runs/nowhere/rm/safety, role: safety}]": "reward model folder 'runs/nowhere/rm/safety' does "
        "not exist",
        "rewards=[{name: 'rewards_for_tests:sevens', role: safety}, {name: 'rewards_for_tests:sevens', role: "
        "safety}]": "2 rewards have role: safety",
        "safety.enabled=true": "safety.enabled=true needs a reward with role: safety",
        f"data.train={data}": "rewards.0 (accuracy) reads the column(s) answer, which data.train does not have "
        "(columns: prompt, solution)",
    }
    for override, needle in cases.items():
        problems = preflight(recipe(tmp_path, override), "train", 1)
        assert any(needle in p for p in problems), (override, problems)
    # a user's reward with **columns may read settings from it: not second-guessed
    assert preflight(recipe(tmp_path, "rewards=[{name: 'rewards_for_tests:sevens', scale: 2}]"), "train", 1) == []


def test_reward_model_settings_are_checked_without_loading_it(tmp_path, tiny_model):
    p = preflight(recipe(tmp_path, f"rewards=[{{name: '{tiny_model}', role: usefulness, tmplate: chat}}]"), "train", 1)
    assert any("unknown reward-model setting(s) tmplate" in x for x in p), p
    p = preflight(recipe(tmp_path, f"rewards=[{{name: '{tiny_model}', trust_remote_code: true}}]"), "train", 1)
    assert any("trust_remote_code is not supported" in x for x in p), p
    p = preflight(recipe(tmp_path, f"rewards=[{{name: '{tiny_model}', template: weird}}]"), "train", 1)
    assert any("template 'weird'" in x for x in p), p


def test_reward_folder_written_by_an_earlier_rm_stage(tmp_path):
    out = tmp_path / "run"
    r = recipe(out, f"rewards=[{{name: '{out}/rm/usefulness', role: usefulness}}]")
    assert any("does not exist" in p for p in preflight(r, "train", 1))
    assert preflight(r, "train", 1, earlier=("rm",)) == []
    check(r, ["rm", "train"], 1)
    with pytest.raises(UserError, match="does not exist"):
        check(r, ["train", "rm"], 1)


def test_model_and_output_problems(tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "file").write_text("x")
    p = preflight(recipe(tmp_path / "run", f"model.name_or_path={tmp_path / 'empty_model'}"), "sft", 1)
    assert any("has no config.json" in x for x in p), p
    p = preflight(recipe(tmp_path / "run", f"model.name_or_path={tmp_path / 'nope'}"), "train", 1)
    assert any("does not exist" in x for x in p), p
    # a later pipeline stage starts from the earlier stage's output, not model.name_or_path
    assert not any(
        "does not exist" in x
        for x in preflight(
            recipe(tmp_path / "run", f"model.name_or_path={tmp_path / 'nope'}"), "train", 1, earlier=("sft",)
        )
    )
    p = preflight(recipe(tmp_path / "file" / "run"), "sft", 1)
    assert p == [
        f"run.output_dir={tmp_path / 'file' / 'run'}: '{tmp_path / 'file'}' is a file, not a folder; choose another "
        "run.output_dir"
    ]
    p = preflight(recipe("/sys/grpo-preflight-test"), "sft", 1)
    assert len(p) == 1 and p[0].startswith("cannot write to /sys"), p


def test_unknown_stage_and_finished_stage(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"unknown stage\(s\) 'trian'; valid: sft, rm, .*train, .*eval"):
        check(recipe(out), ["sft", "trian"], 1)
    (out / "train").mkdir(parents=True)
    (out / "train" / "DONE").write_text("ok\n")
    with pytest.raises(UserError, match="already holds a finished 'train' run"):
        check(recipe(out), ["sft", "train"], 1)  # found before sft runs for minutes
    check(recipe(out, "grpo.resume=true"), ["train"], 1)  # resuming into it is fine


def test_disk_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    r = recipe(tmp_path / "run")
    weights = (ROOT / "data" / "tiny_base" / "model.safetensors").stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 3 * weights))
    assert preflight(r, "sft", 1) == []  # the final model fits
    p = preflight(r, "train", 1)  # a checkpoint with Adam moments and the final model do not (~4x the fp32 weights)
    assert len(p) == 1 and "free but train need about" in p[0], p
    with pytest.raises(UserError, match="free but sft, train, eval need about"):
        check(r, ["sft", "train", "eval"], 1)


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not a positive integer"):
        env_world_size()


# ---------------------------------------------------------------------------------------- the real CLI
def _case(name: str, tmp_path: Path):
    """(command, overrides, env, needles, output_dir) of one bad input."""
    command, extra, env, out = "train", [], {}, tmp_path / "run"
    if name == "prompts_not_divisible":
        extra, env, needles = (
            ["grpo.prompts_per_step=3"],
            {"WORLD_SIZE": "2"},
            ["prompts_per_step=3 must be divisible by the 2 processes"],
        )
    elif name == "one_generation":
        extra, needles = ["grpo.num_generations=1"], ["at least 2 completions per prompt"]
    elif name == "zero_temperature":
        extra, needles = ["rollout.temperature=0"], ["rollout.temperature=0.0", "temperature > 0"]
    elif name == "longer_than_context":
        extra, needles = (
            ["rollout.max_new_tokens=200"],
            ["exceed the model's context of 128 tokens", "rollout.max_new_tokens=200"],
        )
    elif name == "unknown_reward":
        extra, needles = ["rewards=[{name: accuracyy}]"], ["rewards.0", "unknown reward 'accuracyy'", "valid: accuracy"]
    elif name == "module_not_importable":
        extra, needles = ["rewards=[{name: 'my_rewardz.math:score'}]"], ["cannot import module 'my_rewardz.math'"]
    elif name == "attribute_missing":
        extra, needles = ["rewards=[{name: 'rewards_for_tests:sevenz'}]"], ["has no attribute 'sevenz'"]
    elif name == "reward_setting_not_accepted":
        extra, needles = (
            ["rewards=[{name: accuracy, tolerence: 0.1}]"],
            ["rewards.0 (accuracy)", "unknown setting(s) tolerence", "tolerance"],
        )
    elif name == "reward_without_columns":
        extra, needles = ["rewards=[{name: 'rewards_for_tests:no_columns'}]"], ["no_columns", "**columns"]
    elif name == "reward_column_missing":
        data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Q:1+2=", "solution": "3", "category": "math"}])
        extra, needles = [f"data.train={data}"], ["(accuracy) reads the column(s) answer", "solution"]
    elif name == "no_prompt_column":
        data = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q:1+2=", "answer": "3"}])
        extra, needles = [f"data.train={data}"], ["data.train", "no 'prompt' field", "question"]
    elif name == "unknown_loss_type":
        extra, needles = ["grpo.loss_type=ppo"], ["grpo.loss_type", "unknown loss type 'ppo'", "dapo"]
    elif name == "unknown_rollout_backend":
        extra, needles = ["rollout.backend=turbo"], ["rollout.backend", "unknown rollout backend 'turbo'", "engine"]
    elif name == "zero_micro_batch":
        extra, needles = ["grpo.micro_batch_size=0"], ["grpo.micro_batch_size=0 must be >= 1"]
    elif name == "bad_top_p":
        extra, needles = ["rollout.top_p=0"], ["rollout.top_p=0.0 must be in (0, 1]"]
    elif name == "output_under_a_file":
        (tmp_path / "notes.txt").write_text("x")
        out, needles = tmp_path / "notes.txt" / "run", ["is a file, not a folder"]
    elif name == "output_not_writable":
        out, needles = Path("/sys/grpo-preflight-test"), ["cannot write to /sys"]
    elif name == "unknown_stage":
        command, extra, needles = "pipeline", ["run.stages=[sft,trian]"], ["run.stages", "unknown stage(s) 'trian'"]
    elif name == "safety_without_cost_reward":
        extra, needles = ["safety.enabled=true"], ["safety.enabled=true needs a reward with role: safety"]
    elif name == "nested_wrong_type":
        extra, needles = ["model.lora.r=big"], ["'model.lora.r' must be an integer"]
    elif name == "missing_reward_model":
        extra, needles = (
            ["rewards=[{name: runs/none/rm/usefulness, role: usefulness}]"],
            ["reward model folder", "grpo rm"],
        )
    elif name == "sft_packing_too_long":
        command, extra, needles = (
            "sft",
            ["sft.packing=true", "sft.max_length=256"],
            ["sft.max_length=256 exceeds the model's context of 128"],
        )
    elif name == "bad_world_size":
        env, needles = {"WORLD_SIZE": "two"}, ["WORLD_SIZE='two'"]
    else:
        raise ValueError(name)
    return command, extra, env, needles, out


CLI_CASES = [
    "prompts_not_divisible",
    "one_generation",
    "zero_temperature",
    "longer_than_context",
    "unknown_reward",
    "module_not_importable",
    "attribute_missing",
    "reward_setting_not_accepted",
    "reward_without_columns",
    "reward_column_missing",
    "no_prompt_column",
    "unknown_loss_type",
    "unknown_rollout_backend",
    "zero_micro_batch",
    "bad_top_p",
    "output_under_a_file",
    "output_not_writable",
    "unknown_stage",
    "safety_without_cost_reward",
    "nested_wrong_type",
    "missing_reward_model",
    "sft_packing_too_long",
    "bad_world_size",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_input(tmp_path, tiny_model, name):
    command, extra, env, needles, out = _case(name, tmp_path)
    proc = cli(
        command,
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        "run.threads=1",
        *PINNED,
        "grpo.steps=1",
        "sft.steps=1",
        "rollout.max_new_tokens=4",
        *extra,
        env=env,
    )
    assert_clean_failure(proc, *needles)
    assert not out.exists(), "a failed run must not create its output folder"


def test_cli_pipeline_stops_before_the_first_stage(tmp_path, tiny_model):
    """A problem in a later stage (here: train's folder holds a finished run) is found before sft trains."""
    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    (out / "train" / "DONE").write_text("ok\n")
    proc = cli(
        "pipeline",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        *PINNED,
        "run.stages=[sft,train]",
        "sft.steps=1",
        "grpo.steps=1",
        "rollout.max_new_tokens=4",
    )
    assert_clean_failure(proc, "already holds a finished 'train' run")
    assert sorted(p.name for p in out.iterdir()) == ["train"]


def test_cli_reports_how_many_more(tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = cli(
        "train",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        *PINNED,
        "grpo.num_generations=1",
        "grpo.loss_type=ppo",
    )
    assert_clean_failure(proc, "grpo.num_generations=1", "(+1 more, listed above)")
    assert "unknown loss type 'ppo'" in proc.stderr
    assert not out.exists()
