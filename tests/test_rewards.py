"""Tests for rewards (registry, protocol checks, built-in verifiable rewards) and grpo.registry."""

import math
import sys
from pathlib import Path

import pytest
import torch

from grpo.registry import DuplicateNameError, Registry, UnknownNameError
from rewards import (
    REFUSAL_TEXT,
    REWARDS,
    RewardError,
    call_reward,
    check_reward_output,
    is_refusal,
    register_reward,
    resolve_reward,
)
from rewards.verifiable import (
    accuracy_reward,
    format_reward,
    length_reward,
    refusal_reward,
    repetition_reward,
    soft_overlong_reward,
)

# ------------------------------------------------------------------------- grpo.registry


def test_registry_register_get_and_errors():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.add("a", 1)
    assert reg.get("b") is b and reg.get("a") == 1
    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    with pytest.raises(UnknownNameError) as e:
        reg.get("c")
    assert isinstance(e.value, KeyError)
    assert str(e.value) == "unknown widget 'c'; valid: a, b"
    with pytest.raises(DuplicateNameError, match="widget 'a' is already registered"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add("", 3)


# ------------------------------------------------------------------------- registry / resolution


BUILTINS = ["accuracy", "format", "length", "over_refusal", "refusal", "repetition", "soft_overlong"]


def test_builtins_registered_and_resolve_by_name():
    assert set(BUILTINS) <= set(REWARDS.names())
    assert resolve_reward("accuracy") is accuracy_reward
    assert resolve_reward(" format ") is format_reward
    assert resolve_reward(format_reward) is format_reward


def test_duplicate_registration_fails():
    with pytest.raises(DuplicateNameError, match="reward 'accuracy' is already registered"):
        register_reward("accuracy")(lambda prompts, completions, **kw: [])


@pytest.fixture
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    yield
    sys.modules.pop("helpers_rewards", None)


def test_resolve_dotted_path(helpers_on_path):
    fn = resolve_reward("helpers_rewards:constant_reward")
    assert fn(["p", "p"], ["a", "b"], value=2.0) == [2.0, 2.0]
    nested = resolve_reward("helpers_rewards:Holder.length_reward")
    assert nested([""], ["abc"]) == [3.0]


def test_resolve_errors(helpers_on_path):
    with pytest.raises(RewardError, match=r"unknown reward 'acuracy'; valid: .*accuracy.*package.module:function"):
        resolve_reward("acuracy")
    with pytest.raises(RewardError, match="colon before the function"):
        resolve_reward("helpers_rewards.constant_reward")
    with pytest.raises(
        RewardError, match=r"reward 'no_such_mod_xyz:f': cannot import module 'no_such_mod_xyz'.*PYTHONPATH"
    ):
        resolve_reward("no_such_mod_xyz:f")
    with pytest.raises(RewardError, match=r"'helpers_rewards' has no attribute 'missing'"):
        resolve_reward("helpers_rewards:missing")
    with pytest.raises(RewardError, match=r"'NOT_CALLABLE' is a int, not callable"):
        resolve_reward("helpers_rewards:NOT_CALLABLE")
    with pytest.raises(RewardError, match="both parts"):
        resolve_reward("helpers_rewards:")


# ------------------------------------------------------------------------- output checks


def test_check_reward_output_maps_none_to_nan():
    out = check_reward_output("r", [1, None, 0.5, True], 4)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 0.5 and out[3] == 1.0
    assert all(isinstance(v, float) for v in out)
    assert check_reward_output("r", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]


def test_check_reward_output_errors():
    with pytest.raises(RewardError, match="reward 'mine' returned 3 values for 4 completions"):
        check_reward_output("mine", [1.0, 2.0, 3.0], 4)
    with pytest.raises(RewardError, match=r"reward 'mine' returned nan for sample 1"):
        check_reward_output("mine", [0.0, float("nan")], 2)
    with pytest.raises(RewardError, match=r"reward 'mine' returned inf for sample 0"):
        check_reward_output("mine", [float("inf"), 0.0], 2)
    with pytest.raises(RewardError, match=r"reward 'mine' returned str '1' for sample 0"):
        check_reward_output("mine", ["1"], 1)
    with pytest.raises(RewardError, match="returned float; expected a list of 1"):
        check_reward_output("mine", 1.0, 1)


def test_call_reward_wraps_exceptions():
    def broken(prompts, completions, **kw):
        raise ZeroDivisionError("boom")

    with pytest.raises(RewardError, match="reward 'broken' raised ZeroDivisionError: boom"):
        call_reward("broken", broken, ["p"], ["c"])
    assert call_reward("acc", accuracy_reward, ["p"], ["<a>1</a>"], answer=["1"]) == [1.0]


# ------------------------------------------------------------------------- accuracy / format


def test_accuracy():
    completions = [
        "<t>7+8=15,4+3+1=8</t><a>85</a>",  # correct
        "<a>84</a>",  # wrong
        "85",  # no tags
        "<a>1</a> then <a>85</a>",  # last span counts
        "<a> 85.0 </a>",  # numeric comparison
        "<a>Paris</a>",  # string comparison, normalised
        "<a>85</a>",  # answer not applicable
        "<a>85</a>",
    ]
    answers = ["85", "85", "85", "85", 85, " paris ", None, ""]
    out = accuracy_reward(["q"] * 8, completions, answer=answers)
    assert out == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, None, None]


def test_accuracy_needs_answer_column():
    with pytest.raises(RewardError, match="reward 'accuracy' needs a 'answer' column.*available columns: category"):
        accuracy_reward(["q"], ["<a>1</a>"], category=["benign"])


def test_format():
    comps = ["<t>x</t><a>1</a>", "<a>1", "</a><a>", "<a></a>"]
    assert format_reward([""] * 4, comps) == [1.0, 0.0, 0.0, 1.0]
    tags = ["<t>", "</t>", "<a>", "</a>"]
    assert format_reward([""] * 4, comps, tags=tags) == [1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------- length-based


def _ids(*lengths):
    return [[7] * n for n in lengths]


def test_soft_overlong():
    # L_max 10, cache 4: 0 up to 6, then (6 - L) / 4, -1 beyond 10
    out = soft_overlong_reward(
        [""] * 5, [""] * 5, completion_ids=_ids(6, 7, 8, 10, 11), max_completion_length=10, cache_length=4
    )
    assert out == [0.0, -0.25, -0.5, -1.0, -1.0]
    # default cache = 10 // 5 = 2: L=9 -> (8 - 9) / 2
    assert soft_overlong_reward([""], [""], completion_ids=_ids(9), max_completion_length=10) == [-0.5]


def test_soft_overlong_errors():
    with pytest.raises(RewardError, match="needs max_completion_length"):
        soft_overlong_reward([""], [""], completion_ids=_ids(3))
    with pytest.raises(RewardError, match="needs a 'completion_ids' column"):
        soft_overlong_reward([""], [""], max_completion_length=4)
    with pytest.raises(RewardError, match="cache_length"):
        soft_overlong_reward([""], [""], completion_ids=_ids(3), max_completion_length=4, cache_length=5)


def test_length():
    assert length_reward([""] * 2, [""] * 2, completion_ids=_ids(5, 20), max_completion_length=10) == [-0.5, -1.0]
    out = length_reward([""] * 4, [""] * 4, completion_ids=_ids(4, 6, 0, 9), target_length=4)
    assert out == [0.0, -0.5, -1.0, -1.0]
    with pytest.raises(RewardError, match="needs target_length or max_completion_length"):
        length_reward([""], [""], completion_ids=_ids(1))


# ------------------------------------------------------------------------- repetition


def test_repetition():
    # word 3-grams of "a b c a b c": abc, bca, cab, abc -> 1 - 3/4 repeated
    comps = ["a b c a b c", "a b", "one two three four"]
    assert repetition_reward([""] * 3, comps) == [-0.25, 0.0, 0.0]
    assert repetition_reward([""], comps[:1], max_penalty=-0.5) == [-0.125]
    # char 2-grams of "abab": ab, ba, ab -> 1 - 2/3
    assert repetition_reward([""], ["abab"], ngram=2, unit="char") == [pytest.approx(-1 / 3)]
    with pytest.raises(RewardError, match="unknown unit 'token'"):
        repetition_reward([""], ["x"], unit="token")


# ------------------------------------------------------------------------- refusal


def test_is_refusal():
    assert is_refusal(REFUSAL_TEXT)
    assert is_refusal("SORRY!") and is_refusal("I am sorry, no.")
    assert not is_refusal("sorrowful") and not is_refusal("<a>85</a>")


def test_refusal():
    comps = [REFUSAL_TEXT, "<a>85</a>", "Sorry!", "<a>3</a>", "sorry"]
    cats = ["harmful", "harmful", "benign", "benign", None]
    assert refusal_reward([""] * 5, comps, category=cats) == [1.0, 0.0, -1.0, 0.0, None]
    assert refusal_reward([""], ["sorry"], category=["benign"], over_refusal_penalty=-0.5) == [-0.5]


def test_over_refusal_cost_counts_refused_benign_requests_only():
    from rewards.verifiable import over_refusal_cost

    comps = [REFUSAL_TEXT, "<a>first get it</a>", REFUSAL_TEXT, "<a>85</a>", "sorry"]
    cats = ["benign", "benign", "harmful", "math", None]
    assert over_refusal_cost([""] * 5, comps, category=cats) == [1.0, 0.0, None, None, None]
    assert over_refusal_cost(
        [""] * 2, ["sorry", "ok"], category=["borderline", "benign"], categories=["borderline"]
    ) == [
        1.0,
        None,
    ]
    with pytest.raises(RewardError, match="reward 'over_refusal' needs a 'category' column"):
        over_refusal_cost([""], ["sorry"], answer=["1"])


def test_refusal_needs_category_column():
    with pytest.raises(RewardError, match="reward 'refusal' needs a 'category' column.*available columns: answer"):
        refusal_reward([""], ["sorry"], answer=["1"])
