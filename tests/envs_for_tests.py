"""Environments and tools the multi-turn tests name by dotted path (envs_for_tests:Name)."""

from __future__ import annotations

import time


class ScriptedEnv:
    """Answers each of the first `answers` turns with fixed token ids `obs` (a list) or text; then done."""

    def __init__(self, row: dict, obs=(7, 8, 9), answers: int = 2, first=None):
        self.obs, self.answers, self.first, self.steps = (
            list(obs) if not isinstance(obs, str) else obs,
            answers,
            first,
            [],
        )

    def reset(self, row):
        return self.first

    def step(self, completion_text, completion_ids):
        self.steps.append(list(completion_ids))
        return self.obs if len(self.steps) <= self.answers else None

    def reward(self):
        return float(len(self.steps))


class RaisingEnv:
    def __init__(self, row: dict):
        pass

    def reset(self, row):
        return None

    def step(self, completion_text, completion_ids):
        raise KeyError("boom")


class BadObservationEnv(RaisingEnv):
    def step(self, completion_text, completion_ids):
        return {"not": "an observation"}


def divide(a: int, b: int) -> float:
    """Divides a by b.

    Args:
        a: the numerator
        b: the denominator
    """
    return a / b


def slow(x: str) -> str:
    """Sleeps for a second.

    Args:
        x: anything
    """
    time.sleep(1.0)
    return x


def search(query: str, top_k: int = 3) -> list:
    """Searches.

    Args:
        query: what to look for
        top_k: how many results
    """
    return [f"{query}-{i}" for i in range(top_k)]


def no_docstring(x: int) -> int:
    return x
