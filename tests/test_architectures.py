"""The tiny recipe's stages (SFT -> GRPO -> eval) on other decoder families: Qwen2 and DeepSeek-V3 (MoE)."""

import json
import sys

import pytest

from conftest import ROOT, make_tiny_model
from grpo.config import load_recipe
from grpo.pipeline import run_pipeline

sys.path.insert(0, str(ROOT / "tests"))  # rewards_for_tests


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_pipeline_stages_run_on(arch, lora, tmp_path):
    model = make_tiny_model(tmp_path / arch, arch)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "run.stages=[sft,train,eval]",
            "sft.steps=2",
            "sft.batch_size=4",
            "data.sft_eval=null",
            "grpo.steps=2",
            "grpo.prompts_per_step=2",
            "grpo.num_generations=4",
            "grpo.beta=0.1",
            "rollout.max_new_tokens=6",
            "eval.limit=8",
            "safety.enabled=false",
            "rewards=[{name: accuracy}, {name: format, weight: 0.1}, {name: 'rewards_for_tests:sevens'}]",
            "grpo.lr=1e-2",
            f"model.lora.enabled={str(lora).lower()}",
            "model.lora.r=4",
            "model.lora.dropout=0",
        ],
    )  # peft wraps MoE expert parameters only without dropout
    run_pipeline(recipe)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]
    assert set(results) == {"base", "sft", "grpo"} and all(m["n"] == 8 for m in results.values())
    metrics = [json.loads(l) for l in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[0]["grad_norm"] > 0 and metrics[1]["kl"] > 0  # a random model's sevens vary: GRPO moved the policy
    final = tmp_path / "run" / "train" / "final"
    assert (final / ("adapter_model.safetensors" if lora else "model.safetensors")).exists()
    if lora:
        sft_adapter_is_merged_under_grpo(model, tmp_path / "run")


def sft_adapter_is_merged_under_grpo(base_path, run):
    """The SFT stage saved a trained adapter; GRPO started from that folder with it merged (its reference, the
    adapter disabled, is the SFT model), and trained a new adapter recorded on top of it: loading sft/final gives
    base + SFT adapter (not the base), loading train/final gives that plus the GRPO adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grpo.config import ModelConfig
    from grpo.modeling import load_model

    sft, train = run / "sft" / "final", run / "train" / "final"
    assert json.loads((train / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft.resolve())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_path)(ids).logits
        sft_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), sft)(ids).logits
        sft_merged = load_model(ModelConfig(name_or_path=str(sft)), str(sft), for_training=False)(ids).logits
        grpo_model = load_model(ModelConfig(name_or_path=str(train)), str(train), for_training=False)(ids).logits
    assert (sft_peft - base).abs().max() > 1e-5  # SFT trained its adapter
    torch.testing.assert_close(sft_merged, sft_peft, atol=1e-5, rtol=1e-5)  # merged, not ignored
    assert (grpo_model - sft_merged).abs().max() > 1e-6  # GRPO's adapter applies on top of the merged SFT model
