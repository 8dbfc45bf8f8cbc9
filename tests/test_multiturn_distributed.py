"""Multi-turn GRPO on two CPU processes (DDP through `accelerate launch`) gives the metrics of one process.

With `rollout.seed_per_prompt=true` each prompt's episodes are drawn by their own engine session seeded from the
prompt's seed (`grpo.rollout.multiturn`), so what a group samples over all its turns does not depend on which
process runs it or what else is in the batch; the two runs must then log the same rewards, episode statistics,
loss, KL and gradient norm at every step (a per-rank RNG, a batch-dependent draw or an un-reduced metric would
differ). Launch and comparison helpers are those of tests/test_distributed.py.
"""

import pytest
from test_distributed import COMPARED, assert_same_steps, launch

pytestmark = pytest.mark.slow

MULTI_TURN = [
    "rollout.backend=engine",  # turns continue on the engine's KV cache
    "rollout.max_new_tokens=24",
    "environment.name=envs_for_tests:ScriptedEnv",
    "environment.obs='<a>7</a>'",
    "environment.answers=1",  # answers the first turn, then done: two turns unless the budget ends it
    "environment.max_tokens_per_turn=6",
    "environment.stop_strings=[]",
    "rewards=[{name: 'rewards_for_tests:sevens'}, {name: environment}]",
    "grpo.loss_type=dapo",  # its token count is all-reduced over processes
]
EPISODE = ("environment", "episode/turns", "episode/observation_token_share", "episode/truncated_frac")


def test_two_processes_match_one_with_multi_turn_episodes(tmp_path, tiny_model):
    one = launch(tmp_path / "one", tiny_model, None, *MULTI_TURN)
    two = launch(tmp_path / "two", tiny_model, "cpu_ddp.yaml", *MULTI_TURN)
    assert one.info["world_size"] == 1 and two.info["world_size"] == 2
    a, b = two.info["param_checksums"]
    assert a == pytest.approx(b, rel=1e-9) and a == pytest.approx(one.info["param_checksums"][0], rel=1e-4)
    assert len(one.metrics) == len(two.metrics) == 3
    assert all(m["episode/turns"] > 1 and m["episode/observation_token_share"] > 0 for m in one.metrics)
    assert_same_steps(one.metrics, two.metrics, COMPARED + EPISODE, "multi-turn cpu_ddp")
