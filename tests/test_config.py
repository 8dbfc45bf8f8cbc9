"""Recipe loader: sections, overrides, and one clear error per bad input."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.config import Recipe, load_recipe
from grpo.errors import UserError
from grpo.recipe_yaml import recipe_to_dict, save_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_quickstart_recipe_loads():
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert r.model.name_or_path == "data/tiny_base"
    assert [x.name for x in r.rewards] == ["accuracy", "format", "{output_dir}/rm/usefulness", "{output_dir}/rm/safety"]
    assert [x.role for x in r.rewards] == ["reward", "reward", "usefulness", "safety"] and r.safety.enabled
    assert r.grpo.num_generations == 8


def test_overrides_nested_list_and_types(tmp_path):
    p = write(tmp_path, "grpo: {lr: 1.0e-5}\nrewards:\n  - {name: accuracy, weight: 1.0}\n")
    r = load_recipe(
        p,
        [
            "grpo.lr=3e-4",
            "model.lora.enabled=true",
            "run.stages=[sft,eval]",
            "rewards.0.weight=2",
            "rewards.1={name: format, tags: [x, y]}",
            "tracking.report_to=wandb",
        ],
    )
    assert r.grpo.lr == pytest.approx(3e-4) and isinstance(r.grpo.lr, float)
    assert r.model.lora.enabled is True
    assert r.run.stages == ["sft", "eval"]
    assert r.rewards[0].weight == 2.0
    assert r.rewards[1].kwargs == {"tags": ["x", "y"]}
    assert r.tracking.report_to == ["wandb"]


def test_reward_kwargs_round_trip(tmp_path):
    p = write(
        tmp_path, "rewards:\n  - {name: soft_overlong, weight: 0.5, max_completion_length: 40, cache_length: 8}\n"
    )
    r = load_recipe(p)
    assert r.rewards[0].kwargs == {"max_completion_length": 40, "cache_length": 8}
    save_recipe(r, tmp_path / "saved.yaml")
    again = load_recipe(tmp_path / "saved.yaml")
    assert again == r


def test_saved_config_redacts_secrets(tmp_path):
    r = load_recipe(None, ["rewards.0={name: accuracy, api_key: sk-123}"])
    save_recipe(r, tmp_path / "c.yaml")
    assert "sk-123" not in (tmp_path / "c.yaml").read_text()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("grpo: {lrr: 1}\n", [], "unknown key 'grpo.lrr'; valid keys in grpo: steps"),
        ("gpro: {lr: 1}\n", [], "unknown key 'gpro'; valid keys: run, model"),
        ("grpo: {steps: ten}\n", [], "'grpo.steps' must be an integer"),
        ("grpo: {lr: fast}\n", [], "'grpo.lr' must be a number"),
        ("model: {lora: {enabled: 3}}\n", [], "'model.lora.enabled' must be true or false"),
        ("grpo: {importance_level: seq}\n", [], "'grpo.importance_level' must be one of token, sequence"),
        ("grpo: [1, 2]\n", [], "'grpo' must be a mapping"),
        ("grpo: {steps: 1\n", [], "invalid YAML"),
        ("- 1\n- 2\n", [], "a recipe must be a mapping"),
        ("rewards: [{weight: 1}]\n", [], "'rewards.0' needs a 'name'"),
        ("run: {seed: !!python/object/apply:os.system [echo hi]}\n", [], "invalid YAML"),
        ("", ["grpo.lr"], "is not of the form key.sub=value"),
        ("grpo: {lr: 0.1}\n", ["grpo.lr.x=1"], "'grpo.lr' is not a section"),
    ],
)
def test_bad_recipes_fail_with_one_clear_line(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(p, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    if not overrides:
        assert str(p) in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_field_has_a_default():
    # A recipe can be empty: every section and field has the paper's default.
    r = load_recipe(None)
    assert r == Recipe()
    assert set(recipe_to_dict(r)) == {f.name for f in dataclasses.fields(Recipe)}


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
section_names = st.sampled_from([f.name for f in dataclasses.fields(Recipe)] + ["bogus"])


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        section_names, st.dictionaries(st.text(max_size=12), yaml_values, max_size=3) | yaml_values, max_size=4
    )
)
def test_random_documents_never_crash_uncleanly(tmp_path_factory, doc):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(p)
    except UserError as e:
        assert "\n" not in str(e) and str(p) in str(e), str(e)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_random_text_never_crashes_uncleanly(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text)
    try:
        r = load_recipe(p)
    except UserError as e:  # one line naming the file, never another exception type
        assert "\n" not in str(e) and str(p) in str(e), str(e)
    else:  # text that parses to nothing or a mapping of known sections: a complete recipe with defaults
        assert isinstance(r, Recipe) and set(recipe_to_dict(r)) == {f.name for f in dataclasses.fields(Recipe)}


def test_saved_recipe_redacts_by_the_one_secret_rule(tmp_path):
    """save_recipe and the trackers share one rule (whole words): a reward's `api_key` is redacted,
    its `max_tokens` setting is not (a substring rule would hide it)."""
    r = load_recipe(None, ["rewards=[{name: accuracy, api_key: sk-123, max_tokens: 7, hf_token: abc}]"])
    save_recipe(r, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["rewards"][0]
    assert saved["api_key"] == "<redacted>" and saved["hf_token"] == "<redacted>" and saved["max_tokens"] == 7
