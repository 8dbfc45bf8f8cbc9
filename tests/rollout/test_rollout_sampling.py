"""Vectorised sampling: HF-equivalent filters, stop suppression, draw frequencies, logprobs."""

from __future__ import annotations

import torch
from rollout_models import single_thread  # noqa: F401  (autouse fixture)
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from grpo.rollout.base import SamplingParams
from grpo.rollout.sampling import sample_next, suppress_stops, top_k_filter, top_p_filter

NO_STOPS = torch.zeros(0, dtype=torch.long)


def test_filters_equal_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for k in (1, 5, 49):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))
    assert top_k_filter(logits, 0) is logits and top_p_filter(logits, 1.0) is logits


def test_suppress_stops_only_in_rows_too_short():
    logits = torch.zeros(3, 5)
    out = suppress_stops(logits, torch.tensor([1, 4]), torch.tensor([True, False, True]))
    assert torch.isinf(out[[0, 2]][:, [1, 4]]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(out[:, [0, 2, 3]]).all()


def test_greedy_takes_argmax_with_raw_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tok, lp = sample_next(
        logits, SamplingParams(max_new_tokens=1, temperature=0.0), None, torch.tensor([0]), torch.tensor([False, True])
    )
    assert tok.tolist() == [1, 1]  # row 1: the stop id 0 is suppressed, then the first of the tied maxima
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])


def test_draw_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]]).repeat(40000, 1)
    params = SamplingParams(max_new_tokens=1, temperature=0.5)
    tok, lp = sample_next(
        logits, params, torch.Generator().manual_seed(0), NO_STOPS, torch.zeros(40000, dtype=torch.bool)
    )
    probs = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(tok, minlength=4).float() / 40000
    assert (freq - probs).abs().max() < 0.01
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)


def test_filtered_tokens_are_never_drawn():
    torch.manual_seed(1)
    logits = torch.randn(2000, 30)
    params = SamplingParams(max_new_tokens=1, top_k=3, top_p=0.8)
    tok, lp = sample_next(
        logits, params, torch.Generator().manual_seed(0), NO_STOPS, torch.zeros(2000, dtype=torch.bool)
    )
    allowed = torch.isfinite(top_p_filter(top_k_filter(logits, 3), 0.8))
    assert allowed.gather(1, tok[:, None]).all()
    assert torch.isfinite(lp).all() and (lp <= 0).all()
