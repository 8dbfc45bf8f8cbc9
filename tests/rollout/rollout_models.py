"""Tiny random-init decoders (fp32, fixed seeds) for the rollout tests, built from configs (no files).

Imported by the tests as `rollout_models` (pytest puts this folder on sys.path); deliberately not a
conftest.py, which would shadow `tests/conftest.py` for `from conftest import ...`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 64
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "deepseek_v3")


def tiny_config(arch: str, **overrides):
    """A 2-layer config of `arch` with GQA (DeepSeek: MLA with v_head_dim != qk_head_dim, 4 routed experts)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **overrides,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": 4096, **common})  # the window is passed to the attention
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
        )
    raise ValueError(arch)


def tiny_model(arch: str, lora: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """fp32 eval-mode model; with `lora`, a peft LoRA on all linear layers with B != 0 (it changes outputs)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).float()
    with torch.no_grad():  # HF inits MoE experts / router to zeros-ish: give them weight so routing matters
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)
    model.eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        # peft wraps MoE expert parameters too (ParamWrapper), which refuses dropout
        dropout = 0.0 if arch == "deepseek_v3" else 0.1
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
        model = get_peft_model(model, cfg)
        model.eval()
    return model


# ragged prompt lengths, token ids in [2, VOCAB) (0 = pad, 1 = eos)
PROMPTS = [[5, 9, 13, 2, 40, 33, 7], [17, 3], [60, 61, 8, 30, 22, 11, 9, 4, 50, 12, 27], [44]]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine 2 OpenMP threads
    run ~20x slower than 1 when another process holds a core; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
