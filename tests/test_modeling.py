"""Model loading: local folders, dtype, LoRA through peft, the reference policy."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from grpo.config import LoraConfig, ModelConfig
from grpo.errors import UserError
from grpo.modeling import (
    count_parameters,
    is_peft,
    load_model,
    load_tokenizer,
    make_reference,
    reference_context,
    save_model,
)


def test_load_plain_model_and_tokenizer(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model))
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert model.dtype == torch.float32
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    # the folder's weights, unchanged (trust_remote_code: tests/test_security.py checks it is passed as False)
    saved = load_file(tiny_model / "model.safetensors")
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], w) for name, w in saved.items())


def test_bfloat16_dtype(tiny_model):
    model = load_model(ModelConfig(name_or_path=str(tiny_model), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_lora_trains_only_the_adapter_and_reference_is_the_base(tiny_model):
    cfg = ModelConfig(name_or_path=str(tiny_model), lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model = load_model(cfg)
    assert is_peft(model)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert make_reference(model, beta=0.1) is None  # no second copy under LoRA
    ids = torch.tensor([[5, 6, 7, 8]])
    base = load_model(dataclasses.replace(cfg, lora=LoraConfig()))
    with torch.no_grad():
        # make the adapter non-trivial, then the adapter-disabled model must equal the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
        with reference_context(model, None):
            ref_logits = model(ids).logits
        adapted = model(ids).logits
        base_logits = base(ids).logits
    torch.testing.assert_close(ref_logits, base_logits)
    assert (adapted - base_logits).abs().max() > 1e-3


def test_reference_is_frozen_copy_without_lora(tiny_model):
    model = load_model(ModelConfig(name_or_path=str(tiny_model)))
    assert make_reference(model, beta=0.0) is None
    ref = make_reference(model, beta=0.04)
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ref.parameters()))


IDS = torch.tensor([[5, 6, 7, 8, 9]])
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def trained_adapter(model, seed: int):
    """Stand in for training: a fresh adapter is a no-op (lora_B = 0), so give every lora_B random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_lora_adapter_save_and_merge(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path=str(tiny_model), lora=LORA)
    model = trained_adapter(load_model(cfg), seed=0)
    tok = load_tokenizer(cfg)
    adapted, base = logits(model), logits(load_model(ModelConfig(name_or_path=str(tiny_model))))
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the model
    save_model(model, tok, tmp_path / "out", merge=True)
    assert (tmp_path / "out" / "adapter_config.json").exists() and not (tmp_path / "out" / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reloaded = load_model(
        dataclasses.replace(cfg, lora=LoraConfig()), str(tmp_path / "out")
    )  # adapter folder -> merged
    for m in (merged, reloaded):  # base + adapter, not the base alone
        torch.testing.assert_close(logits(m), adapted, atol=1e-5, rtol=1e-5)


def test_reference_is_the_adapter_folder_the_stage_starts_from(tiny_model, tmp_path):
    """A stage that starts from an adapter folder (SFT with LoRA) merges it and trains a fresh adapter: the
    GRPO reference (adapter disabled) is the SFT model, not the original base. Resuming that run from its
    checkpoint keeps training the checkpoint's adapter, and the reference is still the SFT model."""
    cfg = ModelConfig(name_or_path=str(tiny_model), lora=LORA)
    tok = load_tokenizer(cfg)
    base = logits(load_model(ModelConfig(name_or_path=str(tiny_model))))
    sft = trained_adapter(load_model(cfg), seed=1)
    sft_logits = logits(sft)
    save_model(sft, tok, tmp_path / "sft")

    grpo = load_model(cfg, str(tmp_path / "sft"))
    assert is_peft(grpo) and make_reference(grpo, beta=0.1) is None
    assert all(float(p.abs().max()) == 0 for n, p in grpo.named_parameters() if "lora_B" in n)  # a fresh adapter
    assert grpo.peft_config["default"].base_model_name_or_path == str((tmp_path / "sft").resolve())
    trained_adapter(grpo, seed=2)
    with reference_context(grpo, None):
        ref = logits(grpo)
    torch.testing.assert_close(ref, sft_logits, atol=1e-5, rtol=1e-5)
    assert (ref - base).abs().max() > 1e-2  # the SFT model, not the base
    grpo_logits = logits(grpo)
    assert (grpo_logits - sft_logits).abs().max() > 1e-2
    save_model(grpo, tok, tmp_path / "ckpt")

    resumed = load_model(cfg, str(tmp_path / "ckpt"), continue_adapter=True)
    trained = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    torch.testing.assert_close(
        logits(resumed), grpo_logits, atol=1e-5, rtol=1e-5
    )  # the checkpoint's adapter, still trainable
    with reference_context(resumed, None):
        torch.testing.assert_close(logits(resumed), sft_logits, atol=1e-5, rtol=1e-5)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(ModelConfig(name_or_path="./nope/also/not"))
