"""Tests for grpo.logprobs."""

import math

import pytest
import torch

from grpo.logprobs import entropy_from_logits, selective_log_softmax


def test_selective_log_softmax_hand_value():
    # p = [.25, .75]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    out = selective_log_softmax(logits, torch.tensor([[1]]))
    assert out.item() == pytest.approx(math.log(0.75))
    # temperature 2: logits [0, ln3/2] -> p1 = sqrt3 / (1 + sqrt3)
    out_t = selective_log_softmax(logits, torch.tensor([[1]]), temperature=2.0)
    assert out_t.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))))


def test_selective_log_softmax_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    out = selective_log_softmax(logits, ids)
    torch.testing.assert_close(out, ref)
    (g1,) = torch.autograd.grad(out.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g1, g2)


def test_selective_log_softmax_bf16_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 7, (2, 4), generator=g)
    out = selective_log_softmax(logits, ids)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out, ref)


def test_selective_log_softmax_shape_error():
    with pytest.raises(ValueError, match="logits"):
        selective_log_softmax(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -float("inf"), -float("inf")]]])
    ent = entropy_from_logits(logits, chunk_size=1)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), math.log(2.0)]]))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, generator=g)
    p = torch.softmax(x, -1)
    torch.testing.assert_close(entropy_from_logits(x, chunk_size=5), -(p * p.log()).sum(-1))


def test_chunked_logprobs_hand_value_and_gradient():
    # identity head, logits [0, ln 3] -> p = [.25, .75]; target 1: log .75, d/dlogits = onehot - p = [-.25, .25]
    from grpo.logprobs import chunked_logprobs

    head = torch.nn.Identity()
    hidden = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    logp = chunked_logprobs(hidden, head, torch.tensor([1]), chunk_size=1)
    assert logp.item() == pytest.approx(math.log(0.75))
    (grad,) = torch.autograd.grad(logp.sum(), hidden)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.25]]))
