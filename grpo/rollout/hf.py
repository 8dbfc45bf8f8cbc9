"""Backend ``hf``: transformers' `generate`, the baseline every other backend is checked against.

Ragged prompts are left-padded into one batch; `num_return_sequences=n` expands each prompt into
its group (so the prompt is prefilled n times: that is the cost the ``engine`` backend removes).
Greedy decoding generates each prompt once and copies it n times (generate refuses
num_return_sequences > 1 without sampling, and the n greedy completions are identical anyway).
Logprobs come from `output_scores` (the processed scores the sampler drew from) or, for greedy,
`output_logits` (raw logits), one [rows, vocab] tensor per step kept until the end of the call.

Options (``make_rollout("hf", model, tok, **opts)``):
  pad_token_id: pad id for left padding (default: tokenizer's pad/eos, then model.config's, then 0).
  num_return_sequences: True (default) expands inside `generate`; False repeats each prompt n times.
  cache_implementation: passed to `generate` (e.g. "static"); None = transformers' default.
  batch_size: prompts per `generate` call (None = all at once).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from grpo.rollout.base import (
    BACKENDS,
    Completion,
    Rollout,
    SamplingParams,
    check_prompts,
    eval_mode,
    first_stop,
    unwrap_model,
)

log = logging.getLogger(__name__)


def resolve_pad_id(model: nn.Module, tokenizer=None, pad_token_id: int | None = None) -> int:
    """First of: explicit id, tokenizer pad/eos, model config pad/eos, generation-config pad, 0."""
    candidates = [pad_token_id]
    if tokenizer is not None:
        candidates += [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    cfg, gen_cfg = getattr(model, "config", None), getattr(model, "generation_config", None)
    candidates += [
        getattr(cfg, "pad_token_id", None),
        getattr(gen_cfg, "pad_token_id", None),
        getattr(cfg, "eos_token_id", None),
    ]
    for c in candidates:
        if isinstance(c, (list, tuple)):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return 0


@BACKENDS.register("hf")
class HFRollout(Rollout):
    """transformers `generate` behind the Rollout interface (see module docstring for options)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        pad_token_id: int | None = None,
        num_return_sequences: bool = True,
        cache_implementation: str | None = None,
        batch_size: int | None = None,
    ):
        self.model = model
        self.pad_token_id = resolve_pad_id(unwrap_model(model), tokenizer, pad_token_id)
        self.num_return_sequences = num_return_sequences
        self.cache_implementation = cache_implementation
        self.batch_size = batch_size

    def sync_weights(self, model: nn.Module) -> None:
        self.model = model  # generate runs on the live model: nothing to copy

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        hf = unwrap_model(self.model)
        prompts = check_prompts(prompts, n, getattr(hf.config, "vocab_size", None))
        step = self.batch_size or max(len(prompts), 1)
        out: list[Completion] = []
        device = next(hf.parameters()).device
        with (
            torch.no_grad(),  # not inference_mode: see grpo.rollout.engine (ZeRO-3 gathered parameters)
            eval_mode(hf),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompts), step):
                chunk = self._generate_chunk(hf, prompts[start : start + step], n, params, device)
                out += [Completion(c.prompt_index + start, c.token_ids, c.logprobs, c.finish_reason) for c in chunk]
        return out

    def _generate_chunk(
        self, hf: nn.Module, prompts: list[list[int]], n: int, params: SamplingParams, device: torch.device
    ) -> list[Completion]:
        """One `generate` call over left-padded prompts; returns len(prompts) * n completions."""
        if params.greedy and n > 1:  # generate refuses num_return_sequences > 1 greedily; samples are equal
            once = self._generate_chunk(hf, prompts, 1, params, device)
            return [
                Completion(c.prompt_index, list(c.token_ids), list(c.logprobs), c.finish_reason)
                for c in once
                for _ in range(n)
            ]
        if not self.num_return_sequences:
            prompts = [p for p in prompts for _ in range(n)]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        stop = list(params.stop_token_ids)
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            num_return_sequences=n if self.num_return_sequences else 1,
            eos_token_id=stop,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_scores=not params.greedy,
            output_logits=params.greedy,
        )
        if stop and params.min_new_tokens:
            kwargs["min_new_tokens"] = params.min_new_tokens
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
        res = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        gen = res.sequences[:, width:]
        steps = res.logits if params.greedy else res.scores
        logprobs = (
            torch.stack(
                [
                    torch.log_softmax(s.float(), dim=-1).gather(1, gen[:, t : t + 1]).squeeze(1)
                    for t, s in enumerate(steps)
                ],
                dim=1,
            )
            if steps
            else gen.new_zeros(gen.shape, dtype=torch.float)
        )
        return _to_completions(gen.tolist(), logprobs.tolist(), n, set(stop))


def _to_completions(rows: list[list[int]], logprobs: list[list[float]], n: int, stop: set[int]) -> list[Completion]:
    """Cuts each generated row after its first stop id (kept) and drops the padding after it."""
    out = []
    for r, (toks, lps) in enumerate(zip(rows, logprobs)):
        end = first_stop(toks, stop)
        if end is None:
            out.append(Completion(r // n, toks, lps, "length"))
        else:
            out.append(Completion(r // n, toks[: end + 1], lps[: end + 1], "stop"))
    return out
