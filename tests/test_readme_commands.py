"""Every shell line of README.md runs as written (issue 21), after the quickstart, in a fresh copy of the repository
layout (data/, recipes/, examples/ linked into a temporary folder, so `runs/` starts empty).

The README says every command takes overrides and shows the ones for a quick look; the test appends those
(`QUICK`) to every `python -m grpo` command, so the whole README runs in a few minutes instead of an hour.
Lines not run, and why (`NOT_RUN`):
- setup lines (`python3 -m venv ...`, `pip install ...`): they install; the test runs in the installed environment
  (the quickstart command at the end of the first one is run);
- the test-suite line (`... -m pytest -q`): that is this suite;
- syntax summaries with placeholders (`RECIPE`, `PATH`, `DIR`, `[...]`), except the `--dry-run` one, run with
  recipes/quickstart.yaml (it used to need an earlier run's reward models);
- hub models and datasets (`Qwen/...`, `openai/gsm8k`, `recipes/gsm8k_qwen.yaml`): network and GPUs;
- ZeRO-2 on CPU: DeepSpeed JIT-builds a C++ op on first use (minutes); FSDP2 on CPU: both run in
  tests/test_distributed.py (the same launches, smaller model). The DDP line runs here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICK = [
    "sft.steps=5",
    "rm.steps=5",
    "grpo.steps=3",
    "eval.limit=20",
    "run.threads=1",
]  # the README's quick-look overrides
NOT_RUN = [
    (r"^python3 -m venv .* -m pytest", "the test suite itself"),
    (r"^pip install", "installs packages"),
    (r"\bRECIPE\b(?!.*--dry-run)|\[RECIPE\]|\bDIR\b", "a syntax summary with placeholders"),
    (r"Qwen/|openai/gsm8k|gsm8k_qwen", "needs the hub (network) and GPUs"),
    (r"zero2\.yaml", "DeepSpeed JIT-builds a C++ op first (minutes); tests/test_distributed.py runs ZeRO-2/3 on CPU"),
    (r"fsdp\.yaml", "tests/test_distributed.py runs FSDP2 on CPU"),
    (r"recipes/lora_domain\.yaml", "tests/test_lora_domain.py runs it as written and checks its table"),
    (r"recipes/tools_quickstart\.yaml", "tests/test_tools_demo.py runs both lines as written, checks the table"),
]


def readme_lines() -> list[str]:
    """Shell lines of the README's ```bash blocks, continuation lines joined, comments kept (shlex drops them)."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        out += [
            l.strip() for l in block.replace("\\\n", " ").splitlines() if l.strip() and not l.strip().startswith("#")
        ]
    return out


def plan(line: str):
    """(argv, extra env) to run for a README line, or the reason it is not run."""
    for pattern, why in NOT_RUN:
        if re.search(pattern, line):
            return why
    if "&&" in line:  # the setup line: what it runs after installing
        line = line.rsplit("&&", 1)[1].strip()
    line = line.replace("RECIPE", "recipes/quickstart.yaml")
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    if words[:2] == ["accelerate", "launch"]:
        words = [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
    elif words[0] in ("python", ".venv/bin/python"):
        words = [sys.executable, *words[1:]]
    else:
        return f"not a python/accelerate command: {words[0]}"
    if "grpo" in words and "--dry-run" not in words:
        words += QUICK
    return words, env


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh checkout's layout: the shipped folders linked, no runs/."""
    from conftest import fresh_layout

    return fresh_layout(tmp_path_factory.mktemp("readme"))


def run(words, env, cwd, timeout=900):
    from conftest import fresh_env

    return subprocess.run(words, cwd=cwd, env=fresh_env(**env), capture_output=True, text=True, timeout=timeout)


def test_every_readme_line_is_run_or_says_why_not():
    lines = readme_lines()
    assert any("pipeline recipes/quickstart.yaml" in l for l in lines)
    for line in lines:
        p = plan(line)
        assert isinstance(p, str) and p or p[0][0] == sys.executable, (line, p)
    assert sum(not isinstance(plan(l), str) for l in lines) >= 8  # quickstart, dry run, custom reward, 4 evals, DDP


def test_the_check_it_snippet_prints_what_its_comment_says(repo):
    text = README.read_text()
    section = text[text.index("## Writing a custom reward function") :]
    snippet = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)[1]
    proc = run([sys.executable, "-c", snippet], {}, repo, timeout=300)  # from the repository root, as the README says
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = re.search(r"print\(.*\)\s+#\s*(\[\[.*?\]\] \[.*?\])", snippet).group(1)
    assert proc.stdout.strip() == expected == "[[0.5]] [True]"


@pytest.mark.slow  # the quickstart pipeline (shortened by QUICK) and every other README command after it: ~3 min
def test_readme_commands_run_as_written(repo):
    ran, skipped = [], []
    for line in readme_lines():
        p = plan(line)
        if isinstance(p, str):
            skipped.append((line, p))
            continue
        proc = run(*p, cwd=repo)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{line}\n{proc.stderr[-3000:]}"
        ran.append(line)
    assert (repo / "runs" / "quickstart" / "eval" / "results.json").exists()
    assert (repo / "runs" / "my_reward" / "train" / "final").is_dir() and (
        repo / "runs" / "ddp" / "train" / "DONE"
    ).exists()
    assert len(ran) >= 8, ran
