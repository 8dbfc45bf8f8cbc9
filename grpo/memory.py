"""The memory budget of a GRPO run, logged before step 1 so a user sees it before waiting for an OOM.

Per process, in bytes:
- ``policy``: the policy's parameters this process holds (a ZeRO-3 / FSDP shard counts its part);
- ``gradients``: one gradient per trainable parameter (its dtype);
- ``optimizer``: AdamW's two moments per trainable parameter (the parameter's dtype, as torch keeps them);
- ``reference``: the frozen reference policy (0 without one: beta = 0, or LoRA, whose reference is the
  adapter-disabled policy);
- ``rollout_kv``: the engine's KV storage for one generation call, sized as it allocates it
  (`grpo.rollout.kv_cache.SharedPrefixKV`): ``slots x prompt + slots x G x new tokens`` positions x layers
  x 2 (K and V) x KV heads x head dim, slots = max_batch // G;
- ``activations``: an ESTIMATE of one micro-batch's forward+backward: tokens x hidden x layers x bytes x
  ``ACTIVATION_FACTOR`` (the tensors a decoder layer keeps for its backward; about 2 with gradient
  checkpointing, which keeps only each layer's input), plus the chunked output layer's fp32 logits
  buffers (``3 x chunk x vocab x 4``, `grpo.logprobs`). Tokens: ``grpo.micro_batch_tokens``, else
  ``micro_batch_size x (max_prompt_length + max_new_tokens)`` (the padded worst case).
The first four are counted from the live modules; the last two follow from the shapes.
"""

from __future__ import annotations

import torch

ACTIVATION_FACTOR = (
    18  # values kept per hidden unit per token per layer without checkpointing (attention + MLP inputs/outputs)
)
CHECKPOINTED_FACTOR = 2


def _bytes(params, *, local: bool = True) -> int:
    total = 0
    for p in params:
        n = p.numel() if local else getattr(p, "ds_numel", p.numel())
        total += n * p.element_size()
    return total


def memory_budget(policy, ref, recipe) -> dict[str, int]:
    """The budget above for `policy` (unwrapped) and `ref` under `recipe`, in bytes."""
    from grpo.logprobs import default_chunk_size

    g, r = recipe.grpo, recipe.rollout
    params = list(policy.parameters())
    trainable = [p for p in params if p.requires_grad]
    cfg = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
    dtype_bytes = params[0].element_size() if params else 4
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    G = g.num_generations
    slots = max(1, r.max_batch // G)
    prompt = recipe.data.max_prompt_length
    kv = layers * 2 * kv_heads * head_dim * dtype_bytes * (slots * prompt + slots * G * r.max_new_tokens)
    tokens = g.micro_batch_tokens or g.micro_batch_size * (prompt + r.max_new_tokens)
    factor = CHECKPOINTED_FACTOR if recipe.model.gradient_checkpointing else ACTIVATION_FACTOR
    vocab = getattr(cfg, "vocab_size", 0) or 0
    logits = 3 * min(default_chunk_size(vocab), tokens) * vocab * 4
    return {
        "policy": _bytes(params),
        "gradients": _bytes(trainable),
        "optimizer": 2 * _bytes(trainable),
        "reference": _bytes(ref.parameters()) if ref is not None else 0,
        "rollout_kv": kv,
        "activations": tokens * hidden * layers * dtype_bytes * factor + logits,
    }


def format_budget(budget: dict[str, int], device: torch.device) -> str:
    """One line: each part and the total, and the device's capacity where it is known."""

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"

    parts = ", ".join(f"{k} {gib(v)}" for k, v in budget.items())
    line = f"memory per process (before step 1): {parts}; total ~{gib(sum(budget.values()))}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        line += f" of {gib(total)} on {torch.cuda.get_device_name(device)} ({gib(free)} free now)"
    return line + " (activations estimated; grpo/memory.py)"
