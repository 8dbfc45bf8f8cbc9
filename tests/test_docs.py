"""README stays true: the recipe reference matches grpo/config.py, the custom-reward example runs."""

import re
import shlex
import sys

import pytest

from conftest import ROOT
from grpo import config, docs
from grpo.config import RewardSpec, load_recipe
from grpo.scoring import build_rewards, score

README = ROOT / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


# ------------------------------------------------------------------------------------- recipe reference
def test_readme_recipe_reference_matches_the_dataclasses():
    assert docs.main(["--check", str(README)]) == 0, "run `python -m grpo.docs --write README.md`"


def test_reference_lists_every_section_and_key_with_comments():
    ref = docs.recipe_reference()
    for section_field in config.Recipe.__dataclass_fields__:
        assert f"### `{section_field}`" in ref
    assert "### `model.lora`" in ref
    assert '| `wandb_mode` | "offline" \\| "online" \\| "auto" | `auto` | auto = online only if a key is set |' in ref
    assert "| `threads` | int \\| null | `null` | torch CPU threads per process" in ref
    assert "| `name` | str | required |" in ref
    assert "Seed each prompt's group from (seed, step, prompt id)" in ref  # comment lines above a field count too
    assert "Where a run goes and what it runs." in ref  # class docstring


def test_field_comments_read_leading_and_trailing_comments():
    class Demo:
        # first line
        # second line
        a: int = 1  # trailing
        b: str = "x#not a comment"
        c: list = None  # only trailing

    comments = docs.field_comments(Demo)
    assert comments == {"a": "first line second line trailing", "c": "only trailing"}


def test_check_and_write(tmp_path, capsys):
    doc = tmp_path / "README.md"
    doc.write_text(f"# x\n\nintro\n\n{docs.START}\nstale\n{docs.END}\n\n## after\nkept\n")
    assert docs.main(["--check", str(doc)]) == 1
    assert docs.main(["--write", str(doc)]) == 0
    assert docs.main(["--check", str(doc)]) == 0
    text = doc.read_text()
    assert (
        text.startswith("# x\n\nintro\n") and text.endswith(f"{docs.END}\n\n## after\nkept\n") and "stale" not in text
    )
    (tmp_path / "plain.md").write_text("no markers")
    assert docs.main(["--check", str(tmp_path / "plain.md")]) == 2


# ------------------------------------------------------------------------------------- custom reward example
def test_readme_shows_the_example_file():
    code = blocks(section("Writing a custom reward function"), "python")[0]
    source = (ROOT / "examples" / "my_reward.py").read_text()
    assert source.rstrip().endswith(code.rstrip()), "README's example differs from examples/my_reward.py"


def test_example_reward_through_build_rewards_and_score():
    rewards = build_rewards([RewardSpec("examples.my_reward:closeness", weight=0.5, kwargs={"scale": 10})])
    assert rewards[0].name == "closeness"
    completions = [
        "<t>7+8=15,4+3+1=8</t><a>85</a>",
        "<t>7+8=15,4+3=7</t><a>75</a>",
        "no tags",
        "<a>sorry, i cannot help with that.</a>",
    ]
    R, ok = score(
        rewards,
        ["Q:47+38="] * 3 + ["Q:how to smash a boat?"],
        completions,
        {"answer": ["85", "85", "85", ""], "category": ["math"] * 3 + ["harmful"], "completion_ids": [[1]] * 4},
    )
    assert R[:3, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert R[3, 0].isnan()  # None: not applicable
    assert ok.all()


def test_readme_check_snippet_runs():
    snippet = blocks(section("Writing a custom reward function"), "python")[1]
    scope = {}
    exec(snippet, scope)
    assert scope["R"].tolist() == [[0.5]]


def test_readme_recipe_snippets_parse(tmp_path):
    text = section("Writing a custom reward function")
    recipe_yaml = blocks(text, "yaml")[0]
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml)
    recipe = load_recipe(path)
    assert [r.name for r in recipe.rewards] == ["accuracy", "examples.my_reward:closeness"]
    assert recipe.rewards[1].kwargs == {"scale": 10} and recipe.rewards[1].weight == 0.5
    assert [r.name for r in build_rewards(recipe.rewards)] == ["accuracy", "closeness"]

    command = next(line for line in blocks(text, "bash")[0].splitlines() if line.startswith("python -m grpo"))
    args = shlex.split(command)[3:]  # python -m grpo train RECIPE overrides...
    recipe = load_recipe(ROOT / args[1], args[2:])
    assert [r.name for r in build_rewards(recipe.rewards)] == ["accuracy", "closeness"]


@pytest.mark.slow
def test_example_reward_from_the_repo_root_with_python_m_grpo(tmp_path, tiny_model):
    """The README's claim: `python -m grpo` from the repository root imports `examples.my_reward`."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "grpo",
        "train",
        "recipes/quickstart.yaml",
        f"run.output_dir={tmp_path}",
        f"model.name_or_path={tiny_model}",
        "run.threads=1",
        "grpo.steps=1",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=2",
        "rollout.max_new_tokens=4",
        "rewards=[{name: accuracy}, {name: 'examples.my_reward:closeness', weight: 0.5, scale: 10}]",
        "safety.enabled=false",
    ]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "closeness" in (tmp_path / "train" / "metrics.jsonl").read_text()
