"""Stopping a GRPO run by signal (README: "SIGTERM/SIGINT save a checkpoint after the current step and exit
(code 143/130); checkpoints are written atomically").

- SIGINT through the real CLI: exit 130, one `stopped:` line, the checkpoint of the step it arrived in.
- A second signal (SIGINT or SIGTERM) while that checkpoint is being written: whether it stops the process at once
  or is absorbed, the checkpoint is complete or ignored (`ckpt-N.tmp`), a resume picks a complete one and the
  resumed run logs every step once.
- SIGTERM on one process of a 2-process run stops every process after the same step: tests/test_distributed.py.
- SIGTERM through the CLI, then resume to the end: tests/test_faults.py.
The signals come from a reward (`rewards_for_tests:signal_self`) sending one to its own process mid-step.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from grpo import checkpoint
from grpo.config import load_recipe
from grpo.errors import Interrupted
from grpo.trainer import run_grpo
from helpers_common import read_jsonl as history

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def args(out: Path, model: Path, stop_at: int, key: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"model.name_or_path={model}",
        "run.threads=1",
        "grpo.steps=5",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "rollout.max_new_tokens=4",
        "rollout.backend=hf",
        "grpo.lr=1e-2",
        "safety.enabled=false",
        "grpo.save_every=1",
        "grpo.keep_last=5",
        f"rewards=[{{name: 'rewards_for_tests:sevens'}}, "
        f"{{name: 'rewards_for_tests:signal_self', weight: 0.0, key: '{key}', at_call: {stop_at}}}]",
    ]


def test_sigint_through_the_cli_exits_130_with_a_checkpoint(tmp_path, tiny_model):
    out = tmp_path / "run"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "grpo", "train", str(QUICKSTART), *args(out, tiny_model, 2, "cli")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("stopped:")]
    assert stopped == [
        f"stopped: signal received; checkpoint saved at {out / 'train'}/ckpt-2; continue with grpo.resume=true"
    ]
    assert "Traceback" not in proc.stderr and "received SIGINT" in proc.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out / "train")] == ["ckpt-1", "ckpt-2"]
    assert checkpoint.load_state(out / "train" / "ckpt-2")["step"] == 2
    assert [x["step"] for x in history(out / "train" / "metrics.jsonl")] == [1, 2]
    assert not (out / "train" / "final").exists() and not (out / "train" / "DONE").exists()


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_second_signal_while_the_checkpoint_is_written(tmp_path, tiny_model, monkeypatch, second):
    """Whether a second signal stops the process at once or is absorbed, the checkpoint being written is either
    complete or ignored, a resume picks a complete one, and the resumed run logs every step once."""
    out, train = tmp_path / "run", tmp_path / "run" / "train"
    recipe = load_recipe(QUICKSTART, args(out, tiny_model, 3, str(tmp_path)))
    real_save = torch.save

    def save_with_a_second_signal(obj, path, *a, **kw):
        if Path(path).parent.name in ("ckpt-3.tmp", "ckpt-3"):  # the stop's checkpoint, its weights already written
            os.kill(os.getpid(), getattr(signal, second))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save_with_a_second_signal)
    try:
        run_grpo(recipe)
    except Interrupted as e:  # absorbed: the checkpoint completed, the run stopped as after one signal
        assert "checkpoint saved at" in str(e) and "ckpt-3" in str(e)
        stopped_at = 3
    except BaseException as e:  # stopped at once (KeyboardInterrupt, or grpo's forced stop): the write was cut short
        assert type(e).__name__ in ("KeyboardInterrupt", "ForcedStop"), repr(e)
        assert not (train / "ckpt-3").exists()  # its .tmp is left behind or cleaned up, never renamed
        stopped_at = 2
    else:
        pytest.fail("the run did not stop")
    monkeypatch.undo()
    kept = [f"ckpt-{n}" for n in range(1, stopped_at + 1)]
    assert [p.name for p in checkpoint.list_checkpoints(train)] == kept  # never the unfinished one
    latest = checkpoint.find_resume(train, True)
    assert latest == train / kept[-1] and checkpoint.load_state(latest)["step"] == stopped_at
    final = run_grpo(load_recipe(QUICKSTART, [*args(out, tiny_model, 3, str(tmp_path)), "grpo.resume=true"]))
    assert [x["step"] for x in history(train / "metrics.jsonl")] == [1, 2, 3, 4, 5]  # every step once
    assert not (train / "ckpt-3.tmp").exists() and (final / "model.safetensors").is_file() and (train / "DONE").exists()


def test_a_signal_after_the_stop_checkpoint_is_noted_not_acted_on(caplog):
    """Under a launcher the rank that stops first exits, and the launcher SIGTERMs the others while they finish the
    same stop (its checkpoint already saved): that signal must neither read as a new stop request nor cut the
    wind-down short. Before the stop, the same signal is a request; a second one stops at once."""
    from grpo.errors import ForcedStop
    from grpo.runtime import StopRequest

    with StopRequest() as stop:
        stop.winding_down = True
        with caplog.at_level("INFO", logger="grpo.runtime"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.requested and "SIGTERM while stopping: the checkpoint is saved" in caplog.text
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == signal.SIGTERM
        with pytest.raises(ForcedStop):
            os.kill(os.getpid(), signal.SIGTERM)
