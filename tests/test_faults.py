"""Faults: nothing is lost when a run is stopped, killed mid-checkpoint, or its loss goes NaN.

- SIGTERM during `grpo train` (the real CLI): exit 143, a complete `ckpt-N`, and `grpo.resume=true` finishes the run.
- SIGKILL while a checkpoint is being written: the previous checkpoint stays the one `find_resume` picks, and loads.
- A reward returning NaN stops the run naming the reward and the sample: tests/test_trainer.py
  (`test_bad_reward_stops_the_run_naming_it`, `test_bad_reward_skipped_when_asked`), not repeated here.
- A non-finite loss / gradient norm: the optimizer step is skipped (parameters and Adam state untouched) and the
  run stops with one clear line after `grpo.trainer.MAX_NONFINITE` such steps in a row.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import grpo.trainer
from grpo import checkpoint
from grpo.config import load_recipe
from grpo.errors import UserError
from grpo.trainer import run_grpo

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
    "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def steps_logged(path: Path) -> list[int]:
    return [json.loads(l)["step"] for l in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------- SIGTERM, then resume
@pytest.mark.slow  # two CLI runs, ~50 s on a busy 2-core machine
def test_sigterm_leaves_a_checkpoint_that_resumes_to_the_end(tmp_path, tiny_model):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "grpo",
        "train",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        "run.threads=1",
        "grpo.steps=12",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "rollout.max_new_tokens=4",
        "rollout.backend=hf",
        "grpo.lr=1e-2",
        "tracking.log_every=1",
        "safety.enabled=false",
        "rewards=[{name: 'rewards_for_tests:slow_sevens', delay: 0.3}]",
    ]
    metrics = out / "train" / "metrics.jsonl"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(list(map(str, args)), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 240
            while not steps_logged(metrics):  # the first step is done: the loop (and its signal handler) runs
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no step within 240 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 128 + signal.SIGTERM, (rc, stderr[-3000:])
    assert "Traceback" not in stderr and "stopped:" in stderr and "grpo.resume=true" in stderr, stderr[-3000:]
    ckpts = checkpoint.list_checkpoints(out / "train")
    assert len(ckpts) == 1, ckpts
    n = int(ckpts[0].name.split("-")[1])
    assert 1 <= n < 12 and checkpoint.load_state(ckpts[0])["step"] == n
    assert steps_logged(metrics) == list(range(1, n + 1))
    assert not (out / "train" / "final").exists() and not (out / "train" / "DONE").exists()

    proc = subprocess.run(
        list(map(str, args + ["grpo.resume=true"])), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpts[0]} at step {n}" in proc.stderr
    assert steps_logged(metrics) == list(range(1, 13))  # every step once: none lost, none repeated
    assert (out / "train" / "final" / "model.safetensors").exists() and (out / "train" / "DONE").exists()


# ---------------------------------------------------------------------------------------- SIGKILL mid-checkpoint
KILL_DURING_SAVE = r"""
import os, signal, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from grpo import checkpoint

model_dir, out, victim = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model(torch.tensor([[2, 3, 4, 5]])).logits.sum().backward()
opt.step()
checkpoint.save_checkpoint(out, 2, model, tok, {"step": 2, "optimizer": opt.state_dict()}, keep_last=2)

def half_then_die(real, name):
    def write(*args, **kwargs):
        real(*args, **kwargs)
        for f in Path(out, "ckpt-4.tmp").glob(name):  # half of the file is on disk when the process dies
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return write

if victim == "weights":
    model.save_pretrained = half_then_die(model.save_pretrained, "*.safetensors")
elif victim == "tokenizer":
    tok.save_pretrained = half_then_die(tok.save_pretrained, "tokenizer*.json")
else:
    torch.save = half_then_die(torch.save, "state.pt")
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
checkpoint.save_checkpoint(out, 4, model, tok, {"step": 4, "optimizer": opt.state_dict()}, keep_last=2)
raise SystemExit("not killed")
"""


@pytest.mark.parametrize("victim", ["weights", "tokenizer", "state"])
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_model, victim):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "train"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(tiny_model), str(out), victim],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "ckpt-4.tmp").is_dir()  # it died half-way through writing ckpt-4
    assert checkpoint.list_checkpoints(out) == [out / "ckpt-2"]
    assert checkpoint.find_resume(out, True) == out / "ckpt-2"
    state = checkpoint.load_state(out / "ckpt-2")
    assert state["step"] == 2 and state["optimizer"]["state"]
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt-2")
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        deltas = [float((a - b).abs().max()) for a, b in zip(model.parameters(), original.parameters())]
    assert (
        0 < max(deltas) < 0.5
    )  # the step-2 weights: one AdamW step of 1e-2 away from the start, not the +1.0 of step 4
    # the next save cleans up after the crash
    checkpoint.save_checkpoint(out, 4, model, _tokenizer(tiny_model), {"step": 4}, keep_last=2)
    assert checkpoint.list_checkpoints(out) == [out / "ckpt-2", out / "ckpt-4"]
    assert not (out / "ckpt-4.tmp").exists()


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------- non-finite loss
def _recipe(out, model, *extra):
    return load_recipe(
        QUICKSTART,
        [
            f"run.output_dir={out}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "rollout.backend=hf",
            "grpo.prompts_per_step=4",
            "grpo.num_generations=4",
            "rollout.max_new_tokens=6",
            "grpo.lr=1e-2",
            "rewards=[{name: 'rewards_for_tests:sevens'}]",
            "safety.enabled=false",
            "tracking.log_every=1",
            *extra,
        ],
    )


def _nan_loss_on(monkeypatch, calls: set[int]):
    """Make grpo.trainer's policy_loss return NaN on the given (1-based) calls; one call = one optimizer step here."""
    real, count = grpo.trainer.policy_loss, [0]

    def policy_loss(*args, **kwargs):
        count[0] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if count[0] in calls else loss), metrics

    monkeypatch.setattr(grpo.trainer, "policy_loss", policy_loss)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, tiny_model, monkeypatch):
    limit = getattr(grpo.trainer, "MAX_NONFINITE", 3)
    _nan_loss_on(monkeypatch, set(range(2, 100)))
    with pytest.raises(UserError, match=f"non-finite loss or gradient in {limit} optimizer steps in a row") as e:
        run_grpo(_recipe(tmp_path, tiny_model, "grpo.steps=10", "grpo.save_every=1", "grpo.keep_last=0"))
    assert "\n" not in str(e.value) and "grpo.lr" in str(e.value)
    out = tmp_path / "train"
    ckpts = checkpoint.list_checkpoints(out)
    assert [p.name for p in ckpts] == [
        f"ckpt-{i}" for i in range(1, limit + 1)
    ]  # steps 1..limit saved, then it stopped
    start = load_file(tiny_model / "model.safetensors")
    first = load_file(ckpts[0] / "model.safetensors")
    assert any(not torch.equal(start[k], first[k]) for k in start)  # step 1 (finite) trained
    for later in ckpts[1:]:  # the skipped steps changed nothing: weights and Adam moments as after step 1
        weights = load_file(later / "model.safetensors")
        assert all(torch.equal(first[k], weights[k]) for k in first), later
        a, b = checkpoint.load_state(ckpts[0])["optimizer"], checkpoint.load_state(later)["optimizer"]
        for i in a["state"]:
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(torch.as_tensor(a["state"][i][key]), torch.as_tensor(b["state"][i][key])), (
                    later,
                    i,
                    key,
                )


def test_an_isolated_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, tiny_model, monkeypatch, caplog):
    _nan_loss_on(monkeypatch, {2})
    with caplog.at_level(logging.WARNING, logger="grpo.trainer"):
        final = run_grpo(_recipe(tmp_path, tiny_model, "grpo.steps=4"))
    assert (final / "model.safetensors").exists()
    rows = [json.loads(l) for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] is None and all(rows[i]["loss"] is not None for i in (0, 2, 3))
    assert "skipping the optimizer update: non-finite step 2" in caplog.text
