"""Shared fixtures: tiny models built from configs (no network), the shipped toy data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TOKENIZER = ROOT / "data" / "tokenizer"
TINY_BASE = ROOT / "data" / "tiny_base"
TOYWORLD = ROOT / "data" / "toyworld"


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell for a CLI subprocess: no launcher variables, the repository importable,
    one thread, offline; `extra` on top."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH")},
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **extra,
    }


def fresh_layout(root: Path) -> Path:
    """`root` laid out as a fresh checkout: the shipped folders (data, recipes, examples) linked, no runs/."""
    for name in ("data", "recipes", "examples"):
        (root / name).symlink_to(ROOT / name)
    return root


def run_in_fresh_layout(root: Path, commands: list[list[str]]) -> None:
    """Run `commands` as a user would in a fresh checkout (`fresh_layout`, `fresh_env`); each must exit 0 without a
    traceback."""
    import subprocess

    fresh_layout(root)
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=root, env=fresh_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{cmd}\n{proc.stderr[-3000:]}"


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, hidden: int = 32) -> Path:
    """Save a random-init tiny causal LM (of `arch`) with the toy tokenizer into `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, LlamaConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "deepseek_v3":
        cfg = DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            moe_intermediate_size=hidden,
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
            v_head_dim=8,
        )
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The shipped pretrained tiny base (data/tiny_base)."""
    if not (TINY_BASE / "config.json").exists():
        pytest.fail("data/tiny_base is missing: rebuild it with `python data/build_toyworld.py`")
    return TINY_BASE
