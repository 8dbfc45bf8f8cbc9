"""The memory budget of a GRPO run, logged before step 1 so a user sees it before waiting for an OOM.

Per process, in bytes:
- ``policy``: the policy's parameters this process holds (a ZeRO-3 / FSDP shard counts its part);
- ``gradients``: one gradient per trainable parameter (its dtype);
- ``optimizer``: AdamW's two moments per trainable parameter (the parameter's dtype, as torch keeps them);
- ``optimizer_step``: the temporaries one AdamW step allocates (`optimizer_step_bytes`): 0 with ``adamw_fused``;
  with torch's default kernel, on CUDA (``foreach``) a whole parameter group's size at once (the matrices), twice
  the largest trainable parameter elsewhere (a loop over parameters);
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
The first four are counted from the live modules; the last three follow from the shapes and the optimizer's kernel.
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


def optimizer_step_bytes(trainable, optim: str) -> int:
    """Bytes of temporaries one AdamW step holds at its peak, for the `optim` kernel (`grpo.runtime.build_optimizer`)
    on the parameters' device; measured exactly on CPU, `foreach` forced for CUDA's default (tests/test_optimizer.py).
    Under DeepSpeed the optimizer steps flat partitions, so the default kernel's loop there is one partition wide."""
    if optim == "adamw_fused" or not trainable:
        return 0
    sizes = [p.numel() * p.element_size() for p in trainable]
    if trainable[0].device.type != "cuda":
        return 2 * max(sizes)
    # foreach runs one parameter group at a time: matrices (decayed) and vectors (biases, norms), as build_optimizer
    groups = [sum(n for n, p in zip(sizes, trainable) if (p.ndim >= 2) == matrices) for matrices in (True, False)]
    return max(groups)


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
        "optimizer_step": optimizer_step_bytes(trainable, g.optim),
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
