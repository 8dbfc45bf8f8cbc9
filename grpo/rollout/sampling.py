"""Vectorised next-token sampling over a batch of rows, with the logprob of what was drawn.

Pure functions of tensors. The processing order follows transformers' `generate` so that the `hf`
and `engine` backends sample from the same distribution: stop-id suppression for rows shorter than
`min_new_tokens`, then temperature, top-k, top-p (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`).
"""

from __future__ import annotations

import torch

from grpo.rollout.base import SamplingParams


def suppress_stops(logits: torch.Tensor, stop_ids: torch.Tensor, too_short: torch.Tensor) -> torch.Tensor:
    """Sets stop-id logits to -inf in rows that may not stop yet.

    Args:
      logits: [R, V] float.
      stop_ids: [S] long, the stop token ids (may be empty).
      too_short: [R] bool, True where the row has fewer than `min_new_tokens` tokens.
    Returns: [R, V], a new tensor if anything was suppressed, else `logits` itself.
    """
    if stop_ids.numel() == 0 or not bool(too_short.any()):
        return logits
    logits = logits.clone()
    rows = too_short.nonzero().squeeze(1)
    logits[rows.unsqueeze(1), stop_ids.unsqueeze(0)] = float("-inf")
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k largest logits per row (ties with the k-th kept, as in HF); others -> -inf. [R, V] -> [R, V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020), HF's rule: drop the smallest tokens whose cumulative
    probability is <= 1 - p, always keeping the most likely one. [R, V] -> [R, V]."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    stop_ids: torch.Tensor,
    too_short: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row and returns its logprob under the distribution drawn from.

    Args:
      logits: [R, V] raw next-token logits (any float dtype; computed in fp32).
      params: temperature (0 = greedy), top_k, top_p.
      generator: torch.Generator for reproducible draws (on logits.device).
      stop_ids: [S] long stop token ids; too_short: [R] bool, rows still under min_new_tokens.
    Returns:
      tokens [R] long; logprobs [R] float32. Greedy: argmax after stop suppression, logprob from the
      log-softmax of the raw logits. Sampling: logprob from the processed, renormalised distribution.
    """
    logits = logits.float()
    if params.greedy:
        tokens = suppress_stops(logits, stop_ids, too_short).argmax(dim=-1)
        chosen = logits.gather(1, tokens[:, None]).squeeze(1)
        return tokens, chosen - torch.logsumexp(logits, dim=-1)
    x = logits / params.temperature if params.temperature != 1.0 else logits
    x = suppress_stops(x, stop_ids, too_short)
    x = top_p_filter(top_k_filter(x, params.top_k), params.top_p)
    u = torch.rand(x.shape[0], 1, generator=generator, device=x.device)
    return inverse_cdf_draw(x, u)


def inverse_cdf_draw(x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row of the distribution softmax(x) from uniforms u [R, 1] in [0, 1).

    Inverse-CDF draw on unnormalised probabilities: one exp pass, one cumsum (torch.multinomial and
    the exponential race both cost ~20x more on CPU at vocab 32k). Returns tokens [R] long and their
    logprobs [R] float32 under softmax(x). No host sync: the same code runs in a CUDA graph.
    """
    m = x.amax(dim=-1, keepdim=True)
    e = (x - m).exp_()
    cdf = e.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = u * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never a zero-mass token
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1)
    logprobs = (x.gather(1, tokens[:, None]) - m - e.sum(dim=-1, keepdim=True).log()).squeeze(1)
    return tokens, logprobs


def sample_static(
    logits: torch.Tensor,
    params: SamplingParams,
    u: torch.Tensor | None,
    stop_ids: torch.Tensor,
    too_short: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_next` without host syncs or data-dependent shapes (for the engine's static decode step).

    Same distribution, processing order and logprobs as `sample_next`; differences: the uniforms `u`
    [R, 1] are drawn by the caller (outside a captured graph), and stop ids are suppressed with a
    vocabulary mask whenever `params.min_new_tokens > 0` instead of only in rows that need it.
    """
    logits = logits.float()
    suppress = stop_ids.numel() > 0 and params.min_new_tokens > 0
    if suppress:
        stop_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, stop_ids, True)
        blocked = too_short[:, None] & stop_mask
    if params.greedy:
        x = logits.masked_fill(blocked, float("-inf")) if suppress else logits
        tokens = x.argmax(dim=-1)
        chosen = logits.gather(1, tokens[:, None]).squeeze(1)
        return tokens, chosen - torch.logsumexp(logits, dim=-1)
    x = logits / params.temperature if params.temperature != 1.0 else logits
    if suppress:
        x = x.masked_fill(blocked, float("-inf"))
    x = top_p_filter(top_k_filter(x, params.top_k), params.top_p)
    return inverse_cdf_draw(x, u)
