"""The rollout contract: token ids in, completions (token ids + logprobs) out.

A rollout backend knows nothing about text, chat templates or rewards (STYLE.md #6): it takes
prompts as lists of token ids and returns, for each prompt, `n` completions as token ids with the
log-probability of every sampled token under the distribution it was actually drawn from.

Conventions shared by every backend:
- Output order: `len(prompts) * n` completions, grouped by prompt in order
  (completion `i * n + j` is sample `j` of prompt `i`), matching `grpo.advantages`' grouping.
- `token_ids` INCLUDE the stop token when `finish_reason == "stop"` (it is the last id);
  with `"length"` the completion has exactly `max_new_tokens` ids. The trainer masks after the stop.
- `temperature == 0` is greedy decoding (top-k / top-p are then ignored).
- `logprobs[t]` is `log p(token_t)` under the sampling distribution actually used: the logits
  divided by the temperature, with stop ids suppressed while fewer than `min_new_tokens` tokens
  exist, then top-k and top-p filtering (HF's order), renormalised. For greedy decoding it is the
  log-softmax of the raw logits. With top_k=0, top_p=1 and no min_new_tokens suppression, this
  is exactly `log_softmax(logits / temperature)` of a plain forward pass.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from grpo.registry import Registry

FINISH_REASONS = ("stop", "length")

# name -> factory(model, tokenizer, **opts) -> Rollout; see grpo.rollout.make_rollout.
BACKENDS: Registry = Registry("rollout backend")


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Runs the block with `model.config._attn_implementation = name` (an `AttentionInterface` entry: the engine's
    KV-cache attention, the shared-prefix training attention), restoring the previous one afterwards."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def sampling_problems(p, prefix: str = "") -> list[str]:
    """What is out of range in sampling settings `p` (anything with SamplingParams' fields), one line each;
    `prefix` names where they come from (the recipe's ``rollout.``). The one copy of these rules."""
    problems = []
    if p.max_new_tokens < 1:
        problems.append(f"{prefix}max_new_tokens={p.max_new_tokens} must be >= 1")
    if p.temperature < 0:
        problems.append(f"{prefix}temperature={p.temperature} must be >= 0 (0 = greedy)")
    if not 0 < p.top_p <= 1:
        problems.append(f"{prefix}top_p={p.top_p} must be in (0, 1] (1 = off)")
    if p.top_k < 0:
        problems.append(f"{prefix}top_k={p.top_k} must be >= 0 (0 = off)")
    if not 0 <= p.min_new_tokens <= max(p.max_new_tokens, 0):
        problems.append(
            f"{prefix}min_new_tokens={p.min_new_tokens} must be in [0, {prefix}max_new_tokens={p.max_new_tokens}]"
        )
    return problems


@dataclass
class SamplingParams:
    """How to sample. `seed=None` draws from torch's global RNG (not reproducible)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids if t is not None)
        problems = sampling_problems(self)
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation of prompt `prompt_index` (see the module docstring for conventions)."""

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"
    # multi-turn trajectories (grpo.rollout.multiturn): 1 where token_ids[t] was sampled, 0 where it was inserted
    # (an observation: no loss, no KL; its logprob is 0.0); None = every token was sampled
    sampled_mask: list[int] | None = None


class Rollout(ABC):
    """A generation backend. Build one with `grpo.rollout.make_rollout(name, model, tokenizer, **opts)`."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        """Samples `n` completions per prompt; returns `len(prompts) * n` completions grouped by prompt."""

    def sync_weights(self, model: nn.Module) -> None:
        """Called after each optimizer step. Backends that share the model's parameters do nothing."""


# ----------------------------------------------------------------------------- shared helpers
def check_prompts(prompts: Sequence[Sequence[int]], n: int, vocab_size: int | None = None) -> list[list[int]]:
    """Validates prompts (non-empty lists of ints in the vocabulary) and n >= 1; returns plain lists."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one completion per prompt")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size}): {min(p)}..{max(p)}")
        out.append(p)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / torch.compile / peft wrappers (peft's LoRA layers stay in it)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft PeftModel
            model = model.get_base_model()
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode (no dropout) and restores each one's train flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (None: a seed drawn from torch's global RNG)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def first_stop(tokens: Sequence[int], stop_ids: set[int], start: int = 0) -> int | None:
    """Index of the first token in `tokens[start:]` that is a stop id, or None."""
    for i in range(start, len(tokens)):
        if tokens[i] in stop_ids:
            return i
    return None
