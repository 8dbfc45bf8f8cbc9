"""Tests for grpo.advantages: hand-computed numbers on tiny groups (G = 2..4)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.advantages import (
    COMBINE_MODES,
    CONSTRAINT_SCHEMES,
    SCALES,
    combine_rewards,
    constrained_advantages,
    cost_signal,
    group_advantages,
    reward_and_cost_advantages,
    zero_std_fraction,
)
from grpo.multipliers import LagrangeMultiplier, load_multipliers, multipliers_state_dict

# ------------------------------------------------------------------------- group_advantages


def test_group_scale_group_of_four():
    # mean 0.25; deviations .75,-.25,-.25,-.25; var = .75/3 = .25; std = .5
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = group_advantages(r, 4, scale="group", eps=0.0)
    torch.testing.assert_close(a, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_group_scale_default_eps_and_constant_group():
    # second group is constant -> advantage 0 (std 0)
    r = torch.tensor([1.0, 3.0, 2.0, 2.0])
    a = group_advantages(r, 2)
    # group 1: mean 2, unbiased std sqrt(2); eps 1e-4
    expected = 1.0 / (math.sqrt(2.0) + 1e-4)
    torch.testing.assert_close(a, torch.tensor([-expected, expected, 0.0, 0.0]))


def test_group_vs_batch_vs_none():
    r = torch.tensor([0.0, 1.0, 2.0, 5.0])
    # group: each group of two distinct values -> +-1/sqrt(2)
    g = group_advantages(r, 2, scale="group", eps=0.0)
    torch.testing.assert_close(g, torch.tensor([-0.70711, 0.70711, -0.70711, 0.70711]), atol=1e-5, rtol=0)
    # batch: centred by group mean [-.5, .5, -1.5, 1.5], divided by std([0,1,2,5]) = sqrt(14/3) = 2.16025
    b = group_advantages(r, 2, scale="batch", eps=0.0)
    torch.testing.assert_close(b, torch.tensor([-0.23146, 0.23146, -0.69437, 0.69437]), atol=1e-5, rtol=0)
    # none (Dr. GRPO): centred only
    n = group_advantages(r, 2, scale="none")
    torch.testing.assert_close(n, torch.tensor([-0.5, 0.5, -1.5, 1.5]))


def test_eps_zero_constant_group_is_zero_not_nan():
    a = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), 2, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([0.0, 0.0, -0.70711, 0.70711]), atol=1e-5, rtol=0)


def test_group_of_one_gives_zero():
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))


def test_bad_group_size_and_scale():
    with pytest.raises(ValueError, match=r"not a multiple of group_size \(4\)"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(KeyError, match="unknown advantage scale 'std'; valid: batch, group, none"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    assert SCALES.names() == ["batch", "group", "none"]


@settings(max_examples=60, deadline=None)
@given(
    group_size=st.integers(1, 4),
    n_groups=st.integers(1, 5),
    scale=st.sampled_from(["group", "batch", "none"]),
    data=st.data(),
)
def test_property_zero_group_mean(group_size, n_groups, scale, data):
    values = data.draw(
        st.lists(
            st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
            min_size=group_size * n_groups,
            max_size=group_size * n_groups,
        )
    )
    r = torch.tensor(values, dtype=torch.float64)
    a = group_advantages(r, group_size, scale=scale)
    assert torch.isfinite(a).all()
    means = a.view(n_groups, group_size).mean(dim=-1)
    assert torch.allclose(means, torch.zeros_like(means), atol=1e-6 * (1 + r.abs().max().item()))


def test_zero_std_fraction():
    # groups (1,1) equal, (0,1) not, (2,2) equal
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2) == pytest.approx(2 / 3)
    assert zero_std_fraction(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4) == 0.0


# ------------------------------------------------------------------------- combine_rewards


def test_combine_sum():
    R = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    # weighted totals [1, .5, 1.5, 0] -> each group of two distinct values -> +-1/sqrt(2)
    a = combine_rewards(R, [1.0, 0.5], 2, mode="sum", eps=0.0)
    torch.testing.assert_close(a, torch.tensor([0.70711, -0.70711, 0.70711, -0.70711]), atol=1e-5, rtol=0)


def test_combine_sum_nan_counts_as_zero():
    R = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    # totals [1, 1] -> equal -> 0
    torch.testing.assert_close(combine_rewards(R, [1.0, 1.0], 2, mode="sum"), torch.zeros(2))


def test_normalize_then_sum_with_nan():
    nan = float("nan")
    R = torch.tensor([[1.0, nan], [0.0, 1.0], [1.0, 3.0], [1.0, 5.0]])
    # col0: group1 [1,0] -> [.70711, -.70711]; group2 [1,1] -> [0, 0]
    # col1: group1 has one valid entry (1) -> its advantage 0, the NaN contributes 0;
    #       group2 [3,5] -> [-.70711, .70711]
    # weights [1, 2]: sum [.70711, -.70711, -1.41421, 1.41421]; mean 0,
    # batch std sqrt((.5+.5+2+2)/3) = 1.29099 -> [.54772, -.54772, -1.09545, 1.09545]
    a = combine_rewards(R, torch.tensor([1.0, 2.0]), 2, mode="normalize_then_sum")
    torch.testing.assert_close(a, torch.tensor([0.54772, -0.54772, -1.09545, 1.09545]), atol=1e-3, rtol=0)
    assert not torch.isnan(a).any()


def test_combine_errors():
    with pytest.raises(KeyError, match="unknown reward combination mode 'avg'; valid: normalize_then_sum, sum"):
        combine_rewards(torch.zeros(2, 1), [1.0], 2, mode="avg")
    with pytest.raises(ValueError, match="2 reward weights for 1 reward columns"):
        combine_rewards(torch.zeros(2, 1), [1.0, 2.0], 2)
    with pytest.raises(ValueError, match="inf"):
        combine_rewards(torch.tensor([[float("inf")], [0.0]]), [1.0], 2)
    with pytest.raises(KeyError, match="unknown advantage scale"):
        combine_rewards(torch.zeros(2, 1), [1.0], 2, scale="nope")
    assert COMBINE_MODES.names() == ["normalize_then_sum", "sum"]


# ------------------------------------------------------------------------- safety Lagrangian


def test_constrained_advantages():
    a_u = torch.tensor([1.0, -1.0])
    a_c = torch.tensor([0.5, 2.0])
    # (1 - 3*.5)/4 = -.125 ; (-1 - 3*2)/4 = -1.75
    torch.testing.assert_close(constrained_advantages(a_u, a_c, 3.0), torch.tensor([-0.125, -1.75]))
    torch.testing.assert_close(constrained_advantages(a_u, a_c, 0.0), a_u)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        constrained_advantages(a_u, a_c, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        constrained_advantages(a_u, a_c[:1], 1.0)


def test_lagrange_moves_up_then_down():
    lm = LagrangeMultiplier(log_lam=0.0, lr=0.5, threshold=0.2, lam_max=10.0)
    assert lm.lam == 1.0
    # cost above threshold: log_lam = 0 + .5 * (.6 - .2) = .2
    assert lm.update(0.6) == pytest.approx(1.221403, abs=1e-6)
    # cost below threshold: .2 + .5 * (0 - .2) = .1
    assert lm.update(torch.tensor(0.0)) == pytest.approx(1.105171, abs=1e-6)
    assert lm.step == 2


def test_lagrange_clamped_at_lam_max():
    lm = LagrangeMultiplier(lr=1.0, threshold=0.0, lam_max=2.0)
    assert lm.update(100.0) == pytest.approx(2.0)
    assert lm.log_lam == pytest.approx(math.log(2.0))
    assert LagrangeMultiplier(log_lam=5.0, lam_max=2.0).lam == pytest.approx(2.0)


def test_lagrange_delay():
    lm = LagrangeMultiplier(lr=1.0, threshold=0.0, delay_steps=2)
    assert lm.update(1.0) == 1.0
    assert lm.update(1.0) == 1.0
    assert lm.update(1.0) == pytest.approx(math.e)
    assert lm.step == 3


def test_lagrange_smoothing_follows_a_moving_average_of_the_measure():
    """smoothing s: lambda moves by lr * (ema - threshold), ema = s * ema + (1 - s) * measure, the first measure
    starting it; hand-computed."""
    lm = LagrangeMultiplier(lr=1.0, threshold=0.1, smoothing=0.75)
    # ema = 0.5 (first): log_lam = 0 + (0.5 - 0.1) = 0.4
    assert lm.update(0.5) == pytest.approx(math.exp(0.4))
    # ema = 0.75 * 0.5 + 0.25 * 0.0 = 0.375: log_lam = 0.4 + 0.275 = 0.675 (unsmoothed it would fall to 0.3)
    assert lm.update(0.0) == pytest.approx(math.exp(0.675))
    assert lm.ema == pytest.approx(0.375)
    # ema = 0.75 * 0.375 + 0.25 * 0.0 = 0.28125: log_lam = 0.675 + 0.18125
    assert lm.update(0.0) == pytest.approx(math.exp(0.85625))
    # the moving average is state: a restored multiplier continues it exactly
    twin = LagrangeMultiplier(lr=1.0, threshold=0.1, smoothing=0.75)
    twin.load_state_dict(lm.state_dict())
    assert twin.update(0.2) == lm.update(0.2)
    with pytest.raises(ValueError, match="smoothing must be in"):
        LagrangeMultiplier(smoothing=1.0)


def test_lagrange_state_dict_roundtrip():
    lm = LagrangeMultiplier.from_lambda(0.5, lr=0.1, threshold=0.3, lam_max=4.0, delay_steps=1)
    lm.update(0.9)
    lm.update(0.9)  # 0.5 * exp(0.1 * 0.6)
    state = lm.state_dict()
    other = LagrangeMultiplier()
    other.load_state_dict(state)
    assert other == lm
    assert other.lam == pytest.approx(0.5 * math.exp(0.06))
    with pytest.raises(KeyError, match="unknown LagrangeMultiplier state keys"):
        other.load_state_dict({"lambda": 1.0})
    with pytest.raises(ValueError, match="lam_max"):
        LagrangeMultiplier(lam_max=0.0)


# ------------------------------------------------------------------------- several constraints


def test_constrained_advantages_two_costs():
    a_u = torch.tensor([1.0, -1.0])
    a_c = torch.tensor([[0.5, 1.0], [2.0, -1.0]])
    # lam (1, 2), 1 + sum = 4: (1 - (.5 + 2)) / 4 = -.375 ; (-1 - (2 - 2)) / 4 = -.25
    torch.testing.assert_close(constrained_advantages(a_u, a_c, [1.0, 2.0]), torch.tensor([-0.375, -0.25]))
    with pytest.raises(ValueError, match="got 1 multipliers for 2 costs"):
        constrained_advantages(a_u, a_c, 1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        constrained_advantages(a_u, a_c, [1.0, -0.1])


def test_cost_signal():
    c = torch.tensor([2.0, -1.0, 0.0, float("nan")])
    torch.testing.assert_close(cost_signal(c, "cost"), torch.tensor([2.0, -1.0, 0.0, 0.0]))  # NaN (not applicable) = 0
    torch.testing.assert_close(cost_signal(c, "indicator"), torch.tensor([1.0, 0.0, 0.0, 0.0]))  # c > 0
    with pytest.raises(ValueError, match="unknown cost signal 'rate'; valid: cost, indicator"):
        cost_signal(c, "rate")


# Two groups of G=2; columns: reward r, cost c1 (its indicator enters: a rate constraint), cost c2 (itself: a mean one)
R2 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0], [0.0, -1.0, 5.0], [0.0, -2.0, 5.0]])
TWO = {"eps": 0.0, "cost_std_floor": [1.0, 0.5], "signals": ["indicator", "cost"]}


def test_separate_scheme_two_constraints_by_hand():
    adv, m = reward_and_cost_advantages(
        R2, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[2.0, 1.0], scheme="separate", **TWO
    )
    # group 1: A_r = +-.5 / std(1, 0) = +-.70711
    #          A_1: indicator (1, 0), +-.5 / (.70711 + floor 1) = +-.29289
    #          A_2: cost (3, 1), +-1 / (1.41421 + floor .5) = +-.52241
    #          (.70711 - 2 * .29289 - 1 * .52241) / (1 + 2 + 1) = -.10027, and +.10027
    # group 2: constant reward, indicator and cost: 0
    torch.testing.assert_close(adv, torch.tensor([-0.10027, 0.10027, 0.0, 0.0]), atol=1e-5, rtol=0)
    # per-batch measures of each cost column (index in R): mean cost and fraction > 0
    assert m == pytest.approx({"zero_std_frac": 0.5, "cost/1": -0.5, "rate/1": 0.25, "cost/2": 3.5, "rate/2": 1.0})


def test_active_scheme_divides_each_group_by_the_multipliers_of_its_varying_costs():
    # R2 with a third group of G=2 whose indicator is constant (both c1 > 0) but whose cost c2 varies (4, 2)
    R3 = torch.cat([R2, torch.tensor([[1.0, 1.0, 4.0], [0.0, 3.0, 2.0]])])
    adv, _ = reward_and_cost_advantages(
        R3, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[2.0, 1.0], scheme="active", **TWO
    )
    # group 1: both costs vary: separate's (.70711 - 2 * .29289 - 1 * .52241) / (1 + 2 + 1) = -.10027
    # group 2: nothing varies: 0
    # group 3: A_r +-.70711, indicator constant (A_1 = 0, lam_1 out of the normaliser), c2 (4, 2): +-1 / (1.41421 + .5)
    #          = +-.52241: (.70711 - 1 * .52241) / (1 + 1) = +.09235
    torch.testing.assert_close(adv, torch.tensor([-0.10027, 0.10027, 0.0, 0.0, 0.09235, -0.09235]), atol=1e-5, rtol=0)
    sep, _ = reward_and_cost_advantages(
        R3, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[2.0, 1.0], scheme="separate", **TWO
    )
    torch.testing.assert_close(sep[4:], torch.tensor([0.04618, -0.04618]), atol=1e-5, rtol=0)  # (.70711 - .52241) / 4
    # a group where no cost varies keeps its reward advantage whole; a plain penalty (None) never divides
    only_r = torch.tensor([[1.0, -1.0, 0.0], [0.0, -1.0, 0.0]])
    adv, _ = reward_and_cost_advantages(
        only_r, [1.0, 0.0, 0.5], [False, True, True], 2, lam=[9.0, None], scheme="active", **TWO
    )
    torch.testing.assert_close(adv, torch.tensor([0.70711, -0.70711]), atol=1e-5, rtol=0)


def test_scalarized_scheme_two_constraints_by_hand():
    adv, _ = reward_and_cost_advantages(
        R2, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[2.0, 1.0], scheme="scalarized", **TWO
    )
    # s = (r - 2 * indicator - 1 * c2) / 4 = (1 - 2 - 3) / 4, (0 - 0 - 1) / 4, -5/4, -5/4 = -1, -.25, -1.25, -1.25
    # group 1: +-.375 / std(-1, -.25) = +-.375 / .53033 = -+.70711 ; group 2 constant: 0
    torch.testing.assert_close(adv, torch.tensor([-0.70711, 0.70711, 0.0, 0.0]), atol=1e-5, rtol=0)
    # Dr. GRPO's scale none keeps the 1 + sum(lam) division: centred s only
    none, _ = reward_and_cost_advantages(
        R2, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[2.0, 1.0], scheme="scalarized", scale="none", **TWO
    )
    torch.testing.assert_close(none, torch.tensor([-0.375, 0.375, 0.0, 0.0]))
    with pytest.raises(ValueError, match="needs mode='sum'"):
        reward_and_cost_advantages(
            R2,
            [1.0, 0.0, 0.0],
            [False, True, True],
            2,
            lam=[2.0, 1.0],
            scheme="scalarized",
            mode="normalize_then_sum",
            **TWO,
        )


def test_unconstrained_cost_is_a_plain_penalty():
    # c2 not constrained (None): its weight .5 penalises it and stays out of the 1 + sum(lam) normaliser
    adv, _ = reward_and_cost_advantages(R2, [1.0, 0.0, 0.5], [False, True, True], 2, lam=[2.0, None], **TWO)
    # (.70711 - 2 * .29289 - .5 * .52241) / (1 + 2) = -.04663
    torch.testing.assert_close(adv, torch.tensor([-0.04663, 0.04663, 0.0, 0.0]), atol=1e-5, rtol=0)
    # no constraint at all: A_r - sum_k w_k A_k (the old unconstrained rule)
    free, _ = reward_and_cost_advantages(R2, [1.0, 0.25, 0.5], [False, True, True], 2, lam=None, **TWO)
    torch.testing.assert_close(
        free,
        torch.tensor([0.70711 - 0.25 * 0.29289 - 0.5 * 0.52241, -(0.70711 - 0.25 * 0.29289 - 0.5 * 0.52241), 0.0, 0.0]),
        atol=1e-5,
        rtol=0,
    )


def test_one_cost_column_keeps_its_old_metric_names():
    adv, m = reward_and_cost_advantages(R2[:, :2], [1.0, 0.0], [False, True], 2, lam=1.0, eps=0.0)
    assert m["cost"] == m["cost/1"] == -0.5 and m["unsafe_rate"] == m["rate/1"] == 0.25
    # the cost itself enters by default: group 1 costs (2, -1): +-1.5 / (2.12132 + 1) = +-.48057; group 2 costs (-1,
    # -2):
    # +-.5 / (.70711 + 1) = +-.29289 under a constant reward
    expected = [(0.70711 - 0.48057) / 2, -(0.70711 - 0.48057) / 2, -0.29289 / 2, 0.29289 / 2]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=0)


def test_schemes_registry_and_argument_errors():
    assert set(CONSTRAINT_SCHEMES.names()) == {"separate", "active", "scalarized"}
    with pytest.raises(Exception, match="unknown constraint advantage scheme 'x'; valid: active, scalarized, separate"):
        reward_and_cost_advantages(R2, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[1.0, 1.0], scheme="x")
    with pytest.raises(ValueError, match="2 cost columns but 1 multipliers"):
        reward_and_cost_advantages(R2, [1.0, 0.0, 0.0], [False, True, True], 2, lam=[1.0])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=8, max_size=8),
    st.floats(0, 10),
    st.sampled_from(["separate", "active", "scalarized"]),
)
def test_property_constrained_advantages_have_zero_group_mean(values, lam, scheme):
    R = torch.tensor(values).reshape(4, 2)
    adv, _ = reward_and_cost_advantages(R, [1.0, 0.0], [False, True], 2, lam=[lam], scheme=scheme)
    torch.testing.assert_close(adv.reshape(2, 2).sum(dim=-1), torch.zeros(2), atol=1e-5, rtol=0)


def test_multipliers_state_roundtrip_and_old_checkpoints():
    mults = {
        "safety": LagrangeMultiplier.from_lambda(2.0, lr=0.5, threshold=0.1),
        "length": LagrangeMultiplier(lr=0.1, threshold=20.0),
    }
    mults["safety"].update(0.3)
    mults["length"].update(25.0)
    other = {"safety": LagrangeMultiplier(), "length": LagrangeMultiplier()}
    load_multipliers(other, multipliers_state_dict(mults))
    assert other == mults
    # a checkpoint written with one multiplier (before constraints:): its state alone, loaded into the only one
    single = {"safety": LagrangeMultiplier()}
    load_multipliers(single, mults["safety"].state_dict())
    assert single["safety"] == mults["safety"]
    with pytest.raises(ValueError, match="holds one multiplier .* this run has 2"):
        load_multipliers(other, mults["safety"].state_dict())
    with pytest.raises(
        ValueError, match=r"holds multipliers for constraints \['length', 'safety'\]; this run has \['safety'\]"
    ):
        load_multipliers(single, multipliers_state_dict(mults))
