"""Generation backends behind one interface (DESIGN.md, "Rollout").

    from grpo.rollout import make_rollout, SamplingParams
    rollout = make_rollout("engine", model, tokenizer)          # or "hf"
    completions = rollout.generate(prompt_ids, n=8, params=SamplingParams(max_new_tokens=128))
    # len(completions) == len(prompt_ids) * 8, grouped by prompt; see grpo.rollout.base for conventions
    rollout.sync_weights(model)                                  # after each optimizer step

Backends: ``engine`` (default for GRPO: shared-prefix KV, continuous batching, on the live model),
``hf`` (transformers `generate`, the baseline). No vLLM backend: see the README's "Rollout at scale".
"""

from __future__ import annotations

from torch import nn

from grpo.rollout import engine, hf  # noqa: F401  (registers the backends)
from grpo.rollout.base import BACKENDS, Completion, Rollout, SamplingParams

__all__ = ["BACKENDS", "Completion", "Rollout", "SamplingParams", "make_rollout"]


def make_rollout(backend: str, model: nn.Module, tokenizer=None, **opts) -> Rollout:
    """Builds the named backend on `model` (an HF causal LM, optionally peft- or DDP-wrapped).

    `opts` are the backend's options (see each backend's module docstring); an unknown backend name
    raises listing the valid ones.
    """
    return BACKENDS.get(backend)(model, tokenizer, **opts)
