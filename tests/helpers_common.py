"""Helpers several test modules share (fixtures are in conftest.py): JSONL files, a CLI's one-line failure."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows, tail: str = "") -> Path:
    """`rows` as JSON lines (then `tail` verbatim, e.g. a torn last line); the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSONL file (e.g. a stage's metrics.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_clean_failure(proc, *needles):
    """A CLI run that failed as users should see it: exit code 2, no traceback, exactly one `error: ` line, which
    holds every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
