"""Tests for grpo.losses: hand-computed per-token losses, aggregations, clipping, GSPO, KL."""

import math

import pytest
import torch

from grpo.losses import AGGREGATIONS, IMPORTANCE_LEVELS, kl_k3, policy_loss

# B=2, T=3; first sequence has one padding token.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0])


def _on_policy_logp():
    return torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], requires_grad=True)


# ------------------------------------------------------------------------- aggregations
# On-policy (old_logp=None): r == 1, per-token loss l = -A: seq0 -> -1 (2 tokens), seq1 -> 2 (3 tokens)


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, 0.5),  # mean(-1, 2)
        ("bnpo", {}, 0.8),  # (-1*2 + 2*3) / 5
        ("dr_grpo", {"max_completion_length": 4}, 0.5),  # 4 / (2 * 4)
        ("dapo", {}, 0.8),  # num_tokens defaults to sum(mask) = 5
        ("dapo", {"num_tokens": 10}, 0.4),  # 4 / 10
        ("dapo", {"num_tokens": torch.tensor(8.0)}, 0.5),
    ],
)
def test_aggregations(loss_type, kwargs, expected):
    loss, metrics = policy_loss(_on_policy_logp(), None, ADV, MASK, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_frac"] == 0.0
    assert "kl" not in metrics and "entropy" not in metrics


def test_on_policy_gradient_grpo():
    logp = _on_policy_logp()
    loss, _ = policy_loss(logp, None, ADV, MASK, loss_type="grpo")
    loss.backward()
    # dl/dlogp = -A per token; grpo weights 1/(len_i * B): seq0 -1/4, seq1 +2/6; padding 0
    expected = torch.tensor([[-0.25, -0.25, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(logp.grad, expected)


def test_registries_list_valid_names():
    assert AGGREGATIONS.names() == ["bnpo", "dapo", "dr_grpo", "grpo"]
    assert IMPORTANCE_LEVELS.names() == ["sequence", "token"]
    with pytest.raises(KeyError, match="unknown loss type 'ppo'; valid: bnpo, dapo, dr_grpo, grpo"):
        policy_loss(_on_policy_logp(), None, ADV, MASK, loss_type="ppo")
    with pytest.raises(KeyError, match="unknown importance level 'seq'; valid: sequence, token"):
        policy_loss(_on_policy_logp(), None, ADV, MASK, importance_level="seq")


def test_dr_grpo_needs_max_completion_length():
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        policy_loss(_on_policy_logp(), None, ADV, MASK, loss_type="dr_grpo")


def test_shape_errors():
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        policy_loss(_on_policy_logp(), None, ADV[:, None], MASK)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(_on_policy_logp(), torch.zeros(2, 2), ADV, MASK)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(_on_policy_logp(), None, ADV, MASK, beta=0.1)


# ------------------------------------------------------------------------- clipping

# old_logp = 0, so logp is the log-ratio. seq0: A=+1, r=[1.5, 1.0]; seq1: A=-1, r=[0.5, 1.1]
CLIP_LOGP = [[math.log(1.5), 0.0], [math.log(0.5), math.log(1.1)]]
CLIP_ADV = torch.tensor([1.0, -1.0])


def test_clip_low_and_high():
    logp = torch.tensor(CLIP_LOGP, requires_grad=True)
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    loss, m = policy_loss(logp, old, CLIP_ADV, mask, loss_type="bnpo")
    # per token: -min(1.5, 1.2) = -1.2 (high clip); -1; -min(-.5, -.8) = .8 (low clip); -min(-1.1,-1.1) = 1.1
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 0.8 + 1.1) / 4)
    assert m["clip_frac_high"] == pytest.approx(0.25)
    assert m["clip_frac_low"] == pytest.approx(0.25)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 1.1) / 4)
    loss.backward()
    # clipped tokens get no gradient; others d(-r*A)/dlogp = -r*A, divided by 4 tokens
    expected = torch.tensor([[0.0, -0.25], [0.0, 1.1 / 4]])
    torch.testing.assert_close(logp.grad, expected)


def test_clip_higher_dapo_range():
    logp = torch.tensor(CLIP_LOGP)
    loss, m = policy_loss(logp, torch.zeros(2, 2), CLIP_ADV, torch.ones(2, 2), loss_type="bnpo", epsilon_high=0.28)
    # only the first token changes: -min(1.5, 1.28) = -1.28
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 0.8 + 1.1) / 4)
    assert m["clip_frac_high"] == pytest.approx(0.25)


def test_ratio_outside_range_with_wrong_sign_is_not_clipped():
    # r = 1.5 with A < 0: min(-1.5, -1.2) = -1.5 -> unclipped, loss 1.5, no clip counted
    loss, m = policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(1.5)
    assert m["clip_frac"] == 0.0


# ------------------------------------------------------------------------- GSPO


def test_sequence_level_ratio_gspo():
    # masked log-ratios .2 and .4 (padding 5.0 ignored) -> s = exp(.3) = 1.349859
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 0.4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0]), mask, importance_level="sequence", epsilon_high=1.0)
    assert loss.item() == pytest.approx(-1.349859, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.349859, abs=1e-6)
    loss.backward()
    # stop-gradient form: d s_t / d logp_t = s; grpo mean over 2 tokens -> -s/2 each
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.674929, -0.674929, 0.0]]), atol=1e-6, rtol=0)


def test_sequence_level_ratio_is_clipped_as_a_whole():
    logp = torch.tensor([[0.2, 0.4, 5.0]], requires_grad=True)
    loss, m = policy_loss(
        logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), importance_level="sequence"
    )
    assert loss.item() == pytest.approx(-1.2)
    assert m["clip_frac_high"] == pytest.approx(1.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.zeros(1, 3))


def test_token_level_differs_from_sequence_level():
    logp = torch.tensor([[0.2, 0.4, 5.0]])
    loss, _ = policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), epsilon_high=1.0)
    # -(exp(.2) + exp(.4)) / 2 = -(1.221403 + 1.491825) / 2
    assert loss.item() == pytest.approx(-1.356614, abs=1e-6)


# ------------------------------------------------------------------------- KL


def test_kl_k3_values():
    logp = torch.tensor([-1.0, -2.0, -1.0])
    ref = torch.tensor([-1.0, -1.5, -1.5])
    # deltas 0, .5, -.5: 0; e^.5 - 1.5 = .148721; e^-.5 - .5 = .106531
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.0, 0.148721, 0.106531]), atol=1e-6, rtol=0)


def test_kl_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(100, generator=g) * 5
    ref = -torch.rand(100, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros(100))


def test_kl_penalty_in_loss_and_metric():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5]])
    loss, m = policy_loss(logp, None, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=ref, loss_type="bnpo")
    # A = 0, so loss = beta * mean(k3) = .1 * (0 + .148721) / 2
    assert loss.item() == pytest.approx(0.0074361, abs=1e-6)
    assert m["kl"] == pytest.approx(0.0743606, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): 0 and 1 - e^.5 = -.648721; times beta / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.0324361]]), atol=1e-6, rtol=0)


def test_kl_metric_without_penalty():
    loss, m = policy_loss(
        torch.tensor([[-1.0, -2.0]]), None, torch.tensor([1.0]), torch.ones(1, 2), ref_logp=torch.tensor([[-1.0, -1.5]])
    )
    assert loss.item() == pytest.approx(-1.0)  # beta = 0: KL not in the loss
    assert m["kl"] == pytest.approx(0.0743606, abs=1e-6)


# ------------------------------------------------------------------------- gradients, padding, entropy


def test_gradient_only_through_logp():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0, -2.5]], requires_grad=True)
    adv = torch.tensor([0.7], requires_grad=True)
    ent = torch.tensor([[1.0, 1.0, 1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 3), beta=0.04, ref_logp=ref, entropy=ent)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None and adv.grad is None and ent.grad is None


def test_padding_values_are_ignored():
    # garbage in padded positions must not produce inf/nan nor change the loss
    logp = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1e9]])
    ref = torch.tensor([[-1.0, 1e9]])
    mask = torch.tensor([[1, 0]])
    loss, m = policy_loss(logp, old, torch.tensor([2.0]), mask, beta=0.1, ref_logp=ref, loss_type="dapo")
    assert loss.item() == pytest.approx(-2.0)
    assert m["kl"] == 0.0 and m["ratio_mean"] == 1.0
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0.0


def test_entropy_metric():
    ent = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 5.0]])
    _, m = policy_loss(_on_policy_logp(), None, ADV, MASK, entropy=ent)
    assert m["entropy"] == pytest.approx(3.0)  # (1+2+3+4+5)/5, padding ignored
    assert all(isinstance(v, float) for v in m.values())


def test_empty_mask_gives_zero_loss():
    loss, m = policy_loss(_on_policy_logp(), None, ADV, torch.zeros(2, 3), loss_type="bnpo")
    assert loss.item() == 0.0 and m["ratio_mean"] == 0.0
