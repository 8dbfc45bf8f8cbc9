"""The architecture rules (issue 13), checked on the source: every import counts, also one inside a function.

- `rewards/` is a leaf: reward functions, reward-model scorers, pairwise losses. Nothing it imports,
  directly or through other modules, is a stage (or stage plumbing).
- The math (`grpo.advantages`, `grpo.multipliers`, `grpo.losses`, `grpo.logprobs`) reaches no stage and no config
  section.
- No import cycle between modules (a function-level import that dodges one is still one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("grpo", "rewards")
STAGES = {
    "grpo.trainer",
    "grpo.constrained",
    "grpo.train_state",
    "grpo.sft",
    "grpo.rm",
    "grpo.evaluate",
    "grpo.pipeline",
    "grpo.cli",
    "grpo.__main__",
    "grpo.preflight",
    "grpo.preflight_io",
    "grpo.preflight_rewards",
    "grpo.report",
    "grpo.batch",
    "grpo.generation",
    "grpo.scoring",
    "grpo.tracking",
    "grpo.runtime",
    "grpo.metrics",
}
# the floors of grpo that rewards/ may stand on: errors, registries, the config dataclasses (and their YAML parser),
# model loading, atomic folders
REWARDS_MAY_REACH = {
    "grpo",
    "grpo.errors",
    "grpo.registry",
    "grpo.config",
    "grpo.recipe_yaml",
    "grpo.modeling",
    "grpo.checkpoint",
}
MATH = ("grpo.advantages", "grpo.multipliers", "grpo.losses", "grpo.logprobs")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules `name` imports anywhere in its file (`from pkg import mod` counts as pkg.mod when that is a
    module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a.b.c where only a.b is a module (an attribute import)
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_function_level_imports(graph):
    # grpo.pipeline imports the stages inside run_stage; they must show up
    assert {"grpo.sft", "grpo.trainer", "grpo.rm", "grpo.evaluate"} <= graph["grpo.pipeline"]
    assert "grpo.modeling" in graph["rewards.models"]  # a function-level import in a method


def test_rewards_is_a_leaf(graph):
    for name in [m for m in graph if m.startswith("rewards")]:
        reach = reachable(graph, name)
        bad = sorted(m for m in reach if m.startswith("grpo") and m not in REWARDS_MAY_REACH)
        assert not bad, f"{name} reaches {bad}: rewards/ is a leaf and may use only {sorted(REWARDS_MAY_REACH)} of grpo"
        assert not reach & STAGES


@pytest.mark.parametrize("name", MATH)
def test_math_imports_no_stage_and_no_config(graph, name):
    bad = sorted(reachable(graph, name) & (STAGES | {"grpo.config"}))
    assert not bad, f"{name} reaches {bad}: the math takes tensors and scalars, never stages or config sections"


def test_no_import_cycles(graph):
    cycles = []
    for name in graph:
        if name in reachable(graph, name):
            cycles.append(name)
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"
