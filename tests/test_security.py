"""Security: nothing from a model folder, a recipe or a checkpoint runs as code; no secret is written down.

- `model.trust_remote_code` is False by default and passed as False to transformers, so a model folder's
  custom code (auto_map) never runs.
- Recipes are read with yaml.safe_load: python tags fail as invalid YAML (tests/test_config.py, in-process;
  here through the real CLI, with a payload that would leave a marker file).
- Checkpoint `state.pt` is read with torch.load(weights_only=True): a pickled object that would run code is refused.
- A wandb key in the environment and a secret reward setting never reach the run folder or the logs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo import checkpoint
from grpo.config import ModelConfig, load_recipe
from grpo.errors import UserError
from helpers_common import assert_clean_failure

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def cli(*args, env=None, timeout=300):
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


# ---------------------------------------------------------------------------------------- remote code
class _Recorder:
    """Stands in for a transformers Auto class: records from_pretrained's kwargs, then delegates."""

    def __init__(self, real, calls):
        self.real, self.calls = real, calls

    def from_pretrained(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.real.from_pretrained(*args, **kwargs)


def test_trust_remote_code_is_off_and_passed_as_false(tiny_model, monkeypatch):
    import transformers

    from grpo.modeling import load_model, load_tokenizer

    assert ModelConfig().trust_remote_code is False
    assert load_recipe(QUICKSTART).model.trust_remote_code is False
    calls = []
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", _Recorder(transformers.AutoModelForCausalLM, calls))
    monkeypatch.setattr(transformers, "AutoTokenizer", _Recorder(transformers.AutoTokenizer, calls))
    cfg = ModelConfig(name_or_path=str(tiny_model))
    load_tokenizer(cfg)
    load_model(cfg)
    assert len(calls) == 2 and all(c.get("trust_remote_code", "missing") is False for c in calls), calls


def _model_with_custom_code(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of `src` whose config and tokenizer point at code that would leave `marker` if it ever ran."""
    shutil.copytree(src, dst)
    (dst / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
    )
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(
        model_type="evil_llama",
        architectures=["EvilModel"],
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    )
    (dst / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((dst / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return dst


def test_custom_code_in_a_model_folder_never_runs(tmp_path, tiny_model):
    from grpo.modeling import load_model

    marker = tmp_path / "remote_code_ran"
    model = _model_with_custom_code(tiny_model, tmp_path / "evil_model", marker)
    with pytest.raises(UserError):
        load_model(ModelConfig(name_or_path=str(model)))
    out = tmp_path / "run"
    proc = cli(
        "train",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={model}",
        "run.threads=1",
        "grpo.steps=1",
        "rollout.max_new_tokens=4",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
        "safety.enabled=false",
    )
    assert_clean_failure(proc, "custom code")  # past the recipe checks: transformers refused to run the folder's code
    assert not marker.exists(), "code from the model folder ran"
    assert not out.exists()


def test_reward_models_refuse_trust_remote_code(tmp_path, tiny_model):
    from grpo.config import RewardSpec
    from rewards.models import RewardModelScorer

    with pytest.raises(UserError, match="trust_remote_code is not supported"):
        RewardModelScorer.from_spec(RewardSpec(name=str(tiny_model), kwargs={"trust_remote_code": True}))


# ---------------------------------------------------------------------------------------- recipes
def test_yaml_python_tags_never_run_through_the_cli(tmp_path):
    # in-process: tests/test_config.py::test_bad_recipes_fail_with_one_clear_line (the !!python/object/apply case)
    marker = tmp_path / "yaml_code_ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        f"run:\n  seed: !!python/object/apply:os.system ['touch {marker}']\n  output_dir: {tmp_path / 'run'}\n"
    )
    proc = cli("sft", recipe)
    assert_clean_failure(proc, "invalid YAML", "evil.yaml")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this runs a shell command (what a malicious state.pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poisoned_checkpoint(folder: Path, marker: Path, model: Path | None = None) -> Path:
    folder.mkdir(parents=True)
    if model is not None:
        for f in model.iterdir():
            shutil.copy(f, folder / f.name)
    torch.save({"step": 1, "optimizer": _Payload(marker)}, folder / "state.pt")
    return folder


def test_state_pt_is_loaded_with_weights_only(tmp_path):
    marker = tmp_path / "pickle_code_ran"
    ckpt = _poisoned_checkpoint(tmp_path / "train" / "ckpt-1", marker)
    assert checkpoint.find_resume(tmp_path / "train", True) == ckpt
    with pytest.raises(UserError) as e:  # torch's UnpicklingError, as one line naming the checkpoint and what to do
        checkpoint.load_state(ckpt)
    assert str(e.value).startswith(
        f"checkpoint {ckpt}: state.pt cannot be loaded safely"
    ) and "grpo.resume=PATH" in str(e.value)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert not marker.exists(), "unpickling state.pt ran code"
    torch.load(ckpt / "state.pt", weights_only=False)  # the payload is live: only weights_only stops it
    assert marker.exists()


def test_resume_from_a_poisoned_checkpoint_fails_cleanly(tmp_path, tiny_model):
    marker = tmp_path / "pickle_code_ran"
    out = tmp_path / "run"
    _poisoned_checkpoint(out / "train" / "ckpt-1", marker, tiny_model)
    proc = cli(
        "train",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        "run.threads=1",
        "grpo.steps=2",
        "rollout.max_new_tokens=4",
        "grpo.resume=true",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
        "safety.enabled=false",
    )
    assert_clean_failure(proc, "ckpt-1", "state.pt cannot be loaded safely")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- secrets
def _files_holding(folder: Path, secrets: list[str]) -> list[str]:
    hits = []
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            hits += [f"{f.relative_to(folder)}: {s}" for s in secrets if s.encode() in data]
    return hits


@pytest.mark.slow  # sft + train with wandb (offline) and tensorboard through the CLI: ~40 s each here
@pytest.mark.parametrize("style", ["flow", "dotted"])
def test_no_secret_reaches_the_run_folder_or_the_logs(tmp_path, tiny_model, style):
    wandb_key, reward_key = "secret-xyz-wandb-0123456789abcdef01234567", "secret-abc-judge-42"
    out = tmp_path / "run"
    if style == "flow":  # the whole reward entry as one override
        rewards = [f"rewards=[{{name: 'rewards_for_tests:keyed_sevens', api_key: {reward_key}}}]"]
    else:
        rewards = ["rewards=[{name: 'rewards_for_tests:keyed_sevens'}]", f"rewards.0.api_key={reward_key}"]
    proc = cli(
        "pipeline",
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        "run.threads=1",
        "run.stages=[sft,train]",
        "sft.steps=2",
        "sft.batch_size=4",
        "grpo.steps=2",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "rollout.max_new_tokens=4",
        "rollout.backend=hf",
        *rewards,
        "safety.enabled=false",
        "tracking.report_to=[wandb,tensorboard]",
        "tracking.wandb_mode=offline",
        "tracking.samples_every=1",
        env={"WANDB_API_KEY": wandb_key, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "train" / "DONE").exists() and (out / "train" / "samples.jsonl").exists()
    assert any((out / "train").rglob("*.wandb")), "wandb wrote no offline run"
    assert "<redacted>" in (out / "train" / "config.yaml").read_text()
    secrets = [wandb_key, reward_key]
    assert _files_holding(out, secrets) == []
    assert not any(s in proc.stdout + proc.stderr for s in secrets)
