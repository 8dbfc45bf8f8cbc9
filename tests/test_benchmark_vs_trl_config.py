"""The ours-vs-TRL benchmarks compare like with like: `benchmarks/vs_trl.py`'s `trl_config` and `our_recipe`
(also used by benchmarks/time_to_accuracy.py) set the same algorithm and optimizer on both sides, and our
recipe is a valid one. A setting changed on one side only fails here instead of skewing a published ratio."""

import math
import os
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from grpo.config import load_recipe
from grpo.runtime import build_optimizer

sys.path.insert(0, str(ROOT / "benchmarks"))

if not os.environ.get("CI"):
    pytest.importorskip("trl")
import vs_trl  # noqa: E402

SETTINGS = {
    "prompts": 3,
    "G": 4,
    "new_tokens": 40,
    "lr": 2e-5,
    "beta": 0.04,
    "loss_type": "dapo",
    "steps": 7,
    "seed": 5,
}


@pytest.mark.parametrize("min_new_tokens,optim,checkpointing", [(0, "adamw", False), (40, "adamw_fused", True)])
def test_trl_config_and_our_recipe_agree(tmp_path, min_new_tokens, optim, checkpointing):
    both = dict(min_new_tokens=min_new_tokens, optim=optim, gradient_checkpointing=checkpointing, **SETTINGS)
    trl = vs_trl.trl_config(tmp_path / "trl", **both)
    path = tmp_path / "recipe.yaml"
    rewards = [{"name": "accuracy", "weight": 1.0}]
    recipe = vs_trl.our_recipe(
        tmp_path / "ours", ROOT / "data" / "tiny_base", ROOT / "data" / "toyworld" / "grpo_train.jsonl", rewards,
        threads=1, max_prompt_length=24, **both,
    )  # fmt: skip
    path.write_text(yaml.safe_dump(recipe))
    ours = load_recipe(path)  # a valid recipe: unknown or mistyped keys would raise
    g, r = ours.grpo, ours.rollout

    # the step: prompts x G completions, all in one micro-batch, one pass, the same number of steps
    assert (g.prompts_per_step, g.num_generations) == (3, 4)
    assert trl.num_generations == g.num_generations
    assert trl.per_device_train_batch_size == g.prompts_per_step * g.num_generations == g.micro_batch_size
    assert trl.gradient_accumulation_steps == 1 and trl.steps_per_generation in (None, 1)
    assert trl.num_iterations == g.num_iterations == 1
    assert trl.max_steps == g.steps == 7 and trl.seed == ours.run.seed == 5
    # sampling
    assert trl.max_completion_length == r.max_new_tokens == 40
    assert (trl.generation_kwargs or {}).get("min_new_tokens", 0) == r.min_new_tokens == min_new_tokens
    assert (trl.temperature, trl.top_p, trl.top_k) == (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, 0)
    assert trl.repetition_penalty == 1.0 and trl.min_p is None
    # the loss and the advantages
    assert trl.loss_type == g.loss_type == "dapo"
    assert trl.beta == g.beta == 0.04 and trl.use_bias_correction_kl is False  # DeepSeekMath's plain k3 KL
    assert trl.epsilon == g.epsilon_low and (trl.epsilon_high or trl.epsilon) == g.epsilon_high
    assert trl.importance_sampling_level == g.importance_level == "token"
    assert trl.scale_rewards == g.scale == "group" and trl.mask_truncated_completions == g.mask_truncated_completions
    # the optimizer: AdamW, constant lr, no warmup, no weight decay, the same clip, betas and eps
    assert trl.learning_rate == g.lr == 2e-5 and g.optim == optim
    assert trl.optim == {"adamw": "adamw_torch", "adamw_fused": "adamw_torch_fused"}[optim]
    assert trl.lr_scheduler_type == g.lr_scheduler == "constant"
    assert trl.warmup_steps == g.warmup_steps == 0 and trl.weight_decay == g.weight_decay == 0.0
    assert trl.max_grad_norm == g.max_grad_norm == 1.0
    (group,) = build_optimizer(torch.nn.Linear(2, 2, bias=False), g.lr, g.weight_decay, g.optim).param_groups
    assert group["fused"] == (True if optim == "adamw_fused" else None)
    assert tuple(group["betas"]) == (trl.adam_beta1, trl.adam_beta2) and math.isclose(group["eps"], trl.adam_epsilon)
    # activations recomputed in the backward on both sides or on neither (TRL 1.16's own default is on)
    assert trl.gradient_checkpointing == ours.model.gradient_checkpointing == checkpointing
    # precision and placement
    assert ours.model.dtype == "float32" and not trl.bf16 and not trl.fp16 and trl.use_cpu
    assert trl.model_init_kwargs["dtype"] == torch.float32
