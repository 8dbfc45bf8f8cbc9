"""Rewards used by tests through dotted paths (`rewards_for_tests:...`), as a user's own module would be."""


def sevens(prompts, completions, **columns):
    """Trivially learnable: the fraction of completion characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def nan_reward(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def raises(prompts, completions, **columns):
    raise RuntimeError("boom")


def wrong_length(prompts, completions, **columns):
    return [1.0]


def slow_sevens(prompts, completions, *, delay: float = 0.2, **columns):
    """`sevens`, slowly: gives a signal time to arrive mid-run."""
    import time

    time.sleep(delay)
    return sevens(prompts, completions)


def no_columns(prompts, completions):
    """Breaks the protocol: no **columns, so the dataset columns cannot be passed."""
    return [0.0] * len(completions)


def keyed_sevens(prompts, completions, *, api_key: str | None = None, **columns):
    """A reward holding a secret setting (as a hosted judge would): the secret must never be written anywhere."""
    assert api_key, "api_key must reach the reward"
    return sevens(prompts, completions)


def even_tokens(prompts, completions, *, completion_ids, **columns):
    """A reward with known values: the fraction of each completion's token ids that are even."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def odd_first_token_cost(prompts, completions, *, completion_ids, **columns):
    """A safety cost with known values: +1 (unsafe) when the first token id is odd, else -1 (about half each)."""
    return [1.0 if ids and ids[0] % 2 else -1.0 for ids in completion_ids]


_CALLS: dict[str, int] = {}


def signal_self(
    prompts, completions, *, key: str, at_call: int, sig: str = "SIGINT", rank: int | None = None, **columns
):
    """Sends `sig` to this process on its `at_call`-th call for `key` (a user pressing Ctrl-C mid-step); 0 = never;
    `rank`: only on that process of a multi-process launch. The count is per process and per key, so a resumed
    run (same key, same process) does not send it again."""
    import os
    import signal

    _CALLS[key] = _CALLS.get(key, 0) + 1
    if _CALLS[key] == at_call and (rank is None or int(os.environ.get("RANK", "0")) == rank):
        os.kill(os.getpid(), getattr(signal, sig))
    return [0.0] * len(completions)
