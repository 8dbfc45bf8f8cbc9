"""Issue 21, the cases that need processes of their own: two runs into one folder, signals into a hung reward,
and a launcher's worker failing on a bad recipe. Each failed before its fix: run B overwrote run A's folder (both
exited 0), the second SIGTERM was absorbed for ever, every rank printed the error line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
    "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
HANG_GUARD = 240  # seconds: a process still running after this has hung (the bug), whatever the machine's load


def train_cmd(out, model, *extra):
    return [
        sys.executable,
        "-m",
        "grpo",
        "train",
        str(QUICKSTART),
        f"run.output_dir={out}",
        f"model.name_or_path={model}",
        "run.threads=1",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=2",
        "rollout.max_new_tokens=4",
        "rollout.backend=hf",
        "safety.enabled=false",
        *map(str, extra),
    ]


def wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {HANG_GUARD} s"
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("error: ")]


# ---------------------------------------------------------------------------------------- one run per stage folder
HOLD_LOCK = """
import sys, time
from pathlib import Path
from grpo import runtime
runtime.lock_stage(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_stage_folder_held_by_another_run_is_refused_then_taken_over_when_it_dies(
    tmp_path, tiny_model, monkeypatch, capsys, caplog
):
    import logging

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out / "train")], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(cli, "setup_logging", lambda debug=False: None)
        args = [a for a in train_cmd(out, tiny_model, "grpo.steps=1", "rewards=[{name: accuracy}]")[3:]]
        code = cli.main(args)
        err = capsys.readouterr().err
        assert code == 2 and len(error_lines(err)) == 1, err[-2000:]
        assert f"{out / 'train'} is in use by another run (pid {holder.pid} on host" in err
        assert "choose another run.output_dir" in err
        assert sorted(p.name for p in (out / "train").iterdir()) == [".lock"]  # nothing of ours was written
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; its lock is released by the OS, its file stays
        holder.wait()
    assert (out / "train" / ".lock").exists()
    with caplog.at_level(logging.INFO):
        code = cli.main(args)
    assert code == 0, capsys.readouterr().err[-2000:]
    assert f"taking over the lock of an earlier run that is gone (pid {holder.pid}" in caplog.text
    assert (out / "train" / "DONE").exists() and not (out / "train" / ".lock").exists()  # released when it finished


@pytest.mark.slow  # two CLI runs side by side (A takes ~40 steps x 0.3 s, so that B starts while it runs), ~60 s
def test_two_runs_into_one_folder_the_second_is_refused_the_first_is_intact(tmp_path, tiny_model):
    out = tmp_path / "run"
    slow = "rewards=[{name: 'rewards_for_tests:slow_sevens', delay: 0.3}]"
    a = subprocess.Popen(
        train_cmd(out, tiny_model, "grpo.steps=40", "run.seed=1", slow),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(out / "train" / "metrics.jsonl", a, "run A's first step")
        b = subprocess.run(
            train_cmd(out, tiny_model, "grpo.steps=3", "run.seed=2", slow),
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
        a_err = a.communicate(timeout=HANG_GUARD)[1]
    finally:
        if a.poll() is None:
            a.kill()
    assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr[-2000:]
    (line,) = error_lines(b.stderr)
    assert "is in use by another run" in line and f"pid {a.pid}" in line
    assert a.returncode == 0, a_err[-2000:]
    train = out / "train"
    assert "seed: 1" in (train / "config.yaml").read_text()  # run A's config, not B's
    assert [json.loads(l)["step"] for l in (train / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))
    assert (train / "DONE").exists() and (train / "final" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------- signals into a hung reward
@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_a_run_stuck_in_a_reward(tmp_path, tiny_model, second):
    out, marker = tmp_path / "run", tmp_path / "reward_called"
    hung = f"rewards=[{{name: 'hostile_rewards:never_returns', marker: '{marker}', timeout_s: null}}]"
    proc = subprocess.Popen(
        train_cmd(out, tiny_model, "grpo.steps=3", hung),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker, proc, "the reward call")
        proc.send_signal(
            signal.SIGTERM
        )  # what a scheduler sends: asks for a checkpoint after the step, which never ends
        time.sleep(1.0)
        assert proc.poll() is None  # the first one waits for the step (a checkpoint after it)
        proc.send_signal(second)
        stderr = proc.communicate(timeout=HANG_GUARD)[1]  # it used to hang here for ever
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + second, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    assert f"stopped: second {signal.Signals(second).name}: stopped at once" in stderr
    assert not list((out / "train").glob("ckpt-*"))  # nothing half-written
    assert not (out / "train" / ".lock").exists()


# ---------------------------------------------------------------------------------------- launcher
@pytest.mark.slow  # an accelerate launch of 2 processes, ~25 s
def test_a_bad_recipe_under_accelerate_launch_prints_one_line(tmp_path, tiny_model):
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate_configs" / "cpu_ddp.yaml"),
        "-m",
        "grpo",
        "train",
        str(QUICKSTART),
        f"run.output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tiny_model}",
        "safety.enabled=false",
        "rewards=[{name: accuracy}]",
        "grpo.prompts_per_step=3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]  # was one per rank
    assert "grpo.prompts_per_step=3 must be divisible by the 2 processes" in lines[0]
    # the launcher's failure summary names it too, instead of "To enable traceback see ..."
    assert "traceback : error: grpo.prompts_per_step=3" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
