"""What LoRA saves in a real GRPO run (issue #6): the optimizer holds state for the adapter only, no
reference copy of the weights exists, the saved file is the adapter. benchmarks/lora_memory.py
measures the resulting peak memory; RSS is too noisy to assert on here."""

import gc
import sys

import torch

import grpo.runtime
import grpo.train_state
import grpo.trainer
from conftest import ROOT
from grpo.config import load_recipe
from grpo.tracking import Tracker

sys.path.insert(0, str(ROOT / "tests"))


def parameter_storages() -> dict[int, torch.nn.Parameter]:
    """Every parameter of every live nn.Module, by storage address (tied weights once)."""
    gc.collect()
    return {
        p.untyped_storage().data_ptr(): p
        for m in gc.get_objects()
        if issubclass(type(m), torch.nn.Module)
        for p in m.parameters(recurse=False)
    }


def observed_run(tmp_path, model, monkeypatch, *overrides) -> dict:
    """One GRPO step through run_grpo, recording its optimizer, its reference and the parameter
    bytes that exist during the step beyond those alive before the run."""
    seen = {}
    before = parameter_storages()  # kept alive, so no new tensor can reuse their addresses
    build_optimizer, make_reference, log = grpo.runtime.build_optimizer, grpo.train_state.make_reference, Tracker.log

    def capture_optimizer(*args, **kwargs):
        seen["optimizer"] = build_optimizer(*args, **kwargs)
        return seen["optimizer"]

    def capture_reference(policy, *args, **kwargs):
        seen["policy"], seen["reference"] = policy, make_reference(policy, *args, **kwargs)
        return seen["reference"]

    def log_and_measure(self, step, metrics):
        seen["new_param_bytes"] = sum(
            p.untyped_storage().nbytes() for ptr, p in parameter_storages().items() if ptr not in before
        )
        return log(self, step, metrics)

    monkeypatch.setattr(grpo.runtime, "build_optimizer", capture_optimizer)
    monkeypatch.setattr(grpo.train_state, "make_reference", capture_reference)
    monkeypatch.setattr(Tracker, "log", log_and_measure)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "safety.enabled=false",
            "grpo.steps=1",
            "grpo.prompts_per_step=2",
            "grpo.num_generations=4",
            "rollout.max_new_tokens=6",
            "grpo.beta=0.1",
            "grpo.lr=1e-2",
            "rewards=[{name: 'rewards_for_tests:sevens'}]",
            *overrides,
        ],
    )
    seen["final"] = grpo.trainer.run_grpo(recipe)
    return seen


def storage_bytes(params) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}.values())


def adam_moment_bytes(optimizer) -> int:
    return sum(s[k].nbytes for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_lora_optimizer_holds_state_for_the_adapter_only_and_no_reference_copy_exists(
    tmp_path, tiny_model, monkeypatch
):
    run = observed_run(
        tmp_path, tiny_model, monkeypatch, "model.lora.enabled=true", "model.lora.r=2", "model.lora.dropout=0"
    )
    policy, optimizer = run["policy"], run["optimizer"]
    adapter = {id(p): p for n, p in policy.named_parameters() if "lora_" in n}
    assert adapter and {id(p) for p in policy.parameters() if p.requires_grad} == set(adapter)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == set(adapter)
    assert optimizer.state and {id(p) for p in optimizer.state} <= set(adapter)
    trainable = sum(p.numel() for p in adapter.values())
    total = sum(p.numel() for p in policy.parameters())
    assert adam_moment_bytes(optimizer) == 2 * 4 * trainable < 2 * 4 * total / 4  # fp32 exp_avg + exp_avg_sq
    # the reference is the adapter-disabled policy: nothing beyond the policy's own weights was allocated
    assert run["reference"] is None
    assert run["new_param_bytes"] == storage_bytes(policy.parameters())
    saved = run["final"] / "adapter_model.safetensors"
    assert not (run["final"] / "model.safetensors").exists()
    assert 4 * trainable <= saved.stat().st_size < 4 * trainable + 16_384  # the adapter tensors + a header


def test_full_fine_tune_holds_state_for_every_weight_and_a_reference_copy(tmp_path, tiny_model, monkeypatch):
    """The other side of the comparison: shows the measurements above would catch a copy."""
    run = observed_run(tmp_path, tiny_model, monkeypatch)
    policy, optimizer = run["policy"], run["optimizer"]
    total = sum(p.numel() for p in policy.parameters())
    assert adam_moment_bytes(optimizer) == 2 * 4 * total
    assert run["reference"] is not None
    assert run["new_param_bytes"] == 2 * storage_bytes(policy.parameters())
    assert (run["final"] / "model.safetensors").exists()
