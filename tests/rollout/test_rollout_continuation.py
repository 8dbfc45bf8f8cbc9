"""Multi-turn continuation on the engine's KV (grpo/rollout/continuation.py) against prefilling the whole history.

Each turn of a session must equal what a fresh `generate` over prompt + trajectory samples: token for token under
greedy decoding (against `hf` generate and the engine's own one-turn path), and with sampling, logprobs equal to
a fresh forward. The trajectories here differ per row (different observations, different numbers of turns, one
rewound to a shorter history, as a stop-string cut does), so every path of the extend step is exercised.
"""

from __future__ import annotations

import pytest
import torch
from rollout_models import (
    ARCHS,
    PROMPTS,
    VOCAB,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)
from test_rollout_engine import full_forward_logprobs

from grpo.rollout import SamplingParams, make_rollout
from grpo.rollout.continuation import common_prefix

STOPS = tuple(range(1, VOCAB, 6))
N = 2


def observation(row: int, turn: int) -> list[int]:
    """Inserted ids: different per row and turn (row 0 gets none on turn 0: an empty observation)."""
    return [2 + (row * 7 + turn * 3 + i) % (VOCAB - 2) for i in range((row + turn) % 4)]


def play(session, prompts, params, turns: int = 3, room: int = 6):
    """Drives a session like the multi-turn driver: rows stop at different turns, observations differ per row, and
    some turns are cut to 2 tokens before their observation (a rewind, as a stop-string cut). Returns each row's
    trajectory and the (row, trajectory before, completion) of every turn."""
    rows = len(prompts) * N
    traj = {r: [] for r in range(rows)}
    seen = []
    for turn in range(turns):
        active = [r for r in range(rows) if turn < 1 + r % turns]  # row r takes 1 + r % turns turns
        before = [list(traj[r]) for r in active]
        comps = session.turn(active, before, [room] * len(active), params.min_new_tokens if turn == 0 else 0)
        for r, b, c in zip(active, before, comps):
            assert c.prompt_index == r // N
            seen.append((r, b, c))
            ids = c.token_ids[:2] if (r, turn) in {(1, 0), (2, 0), (5, 1)} else c.token_ids
            traj[r] += ids + observation(r, turn)
    return traj, seen


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_turns_equal_generate_over_the_whole_history(arch, static):
    model = tiny_model(arch)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=STOPS)
    engine = make_rollout("engine", model, None, static_decode=static)
    hf = make_rollout("hf", model, None)
    with engine.open_episodes(PROMPTS, N, params) as session:
        _, seen = play(session, PROMPTS, params)
    assert len(seen) > 3 * len(PROMPTS) * N // 2
    for r, before, c in seen:
        turn_params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=STOPS)
        (ref,) = hf.generate([PROMPTS[r // N] + before], 1, turn_params)
        (own,) = make_rollout("engine", model, None).generate([PROMPTS[r // N] + before], 1, turn_params)
        assert c.token_ids == ref.token_ids == own.token_ids, (r, before)
        assert c.finish_reason == ref.finish_reason
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(ref.logprobs), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_turn_logprobs_match_a_fresh_forward(arch, temperature):
    model = tiny_model(arch)
    params = SamplingParams(max_new_tokens=40, temperature=temperature, stop_token_ids=STOPS, seed=11)
    with make_rollout("engine", model, None).open_episodes(PROMPTS, N, params) as session:
        traj, seen = play(session, PROMPTS, params)
    for r, before, c in seen:
        fresh = full_forward_logprobs(model, PROMPTS[r // N] + before, c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), fresh, atol=1e-4), (r, before)
    assert len({tuple(t) for t in traj.values()}) > len(PROMPTS)  # the samples of a prompt differ


def test_min_new_tokens_on_the_first_turn_and_same_seed_same_turns():
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=40, temperature=1.0, stop_token_ids=STOPS, min_new_tokens=4, seed=5)

    def run():
        with make_rollout("engine", model, None).open_episodes(PROMPTS, N, params) as session:
            return play(session, PROMPTS, params)

    (a, seen), (b, _) = run(), run()
    assert a == b
    first = [c for _, before, c in seen if not before]
    assert first and all(len(c.token_ids) >= 4 and not set(c.token_ids[:3]) & set(STOPS) for c in first)


def test_a_session_holds_the_engine_and_checks_its_arguments():
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=STOPS)
    engine = make_rollout("engine", model, None)
    session = engine.open_episodes(PROMPTS, N, params)
    with pytest.raises(RuntimeError, match="session is open"):
        engine.generate(PROMPTS, N, params)
    with pytest.raises(RuntimeError, match="still open"):
        engine.open_episodes(PROMPTS, N, params)
    with pytest.raises(ValueError, match="trajectory \\+ room <= the budget \\(10\\)"):
        session.turn([0], [[5] * 8], [3])
    with pytest.raises(ValueError, match="row 8 \\(of 8\\)"):
        session.turn([8], [[]], [3])
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.turn([0], [[]], [3])
    assert len(engine.generate(PROMPTS, N, params)) == len(PROMPTS) * N  # free again
    with pytest.raises(ValueError, match="exceeds max_len=256"):
        engine.open_episodes(PROMPTS, N, SamplingParams(max_new_tokens=250))


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2
