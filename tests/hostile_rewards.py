"""Rewards that misbehave on purpose (issue 21), referenced by dotted path (`hostile_rewards:...`) as a user's module
is."""

import time
from pathlib import Path


def never_returns(prompts, completions, *, marker: str | None = None, **columns):
    """Hangs (a loop of short sleeps that swallows ordinary exceptions); touches `marker` first, so a test knows it
    got here."""
    if marker:
        Path(marker).write_text("called")
    while True:
        try:
            time.sleep(0.05)
        except Exception:
            pass


def all_none(prompts, completions, **columns):
    """Not applicable to anything: no learning signal."""
    return [None] * len(completions)


def huge(prompts, completions, **columns):
    """A constant 1e30: in a float32 sum nothing else can be seen beside it."""
    return [1e30] * len(completions)


def big_spread(prompts, completions, **columns):
    """Varies by millions with the completion's length."""
    return [1e6 * len(c) for c in completions]


def length(prompts, completions, **columns):
    """A small signal that varies from sample to sample (even for an untrained model)."""
    return [len(c) / 100 for c in completions]
