"""ruff (line length 120; pyproject.toml [tool.ruff]) passes on the whole repository, so CI keeps the style."""

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def test_ruff_check_passes():
    ruff = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if ruff is None:
        try:
            import ruff  # noqa: F401
        except ImportError:
            pytest.fail("ruff is not installed: it is in requirements-cpu.txt (pip install -r requirements-cpu.txt)")
        ruff = [sys.executable, "-m", "ruff"]
    cmd = (ruff if isinstance(ruff, list) else [ruff]) + ["check", "--no-cache", "."]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (
        "ruff found problems (run `ruff check --fix .` and `ruff format .`):\n" + proc.stdout[-4000:]
    )
