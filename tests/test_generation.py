"""grpo.generation: training and eval sample from the same distribution; decode-then-score."""

import dataclasses

import pytest
import torch

from conftest import ROOT
from grpo.config import RolloutConfig, load_recipe
from grpo.data import check_columns, load_rows, prompt_records
from grpo.evaluate import evaluate_model
from grpo.generation import sampling_params
from grpo.modeling import load_tokenizer
from grpo.rollout import SamplingParams


def test_every_rollout_field_reaches_the_sampling_params():
    cfg = RolloutConfig(max_new_tokens=7, temperature=0.6, top_p=0.9, top_k=5, min_new_tokens=2, stop_token_ids=[4, 9])
    p = sampling_params(cfg, eos_token_id=2, seed=11)
    shared = {f.name for f in dataclasses.fields(SamplingParams)} & {f.name for f in dataclasses.fields(RolloutConfig)}
    for name in shared - {"stop_token_ids"}:
        assert getattr(p, name) == getattr(cfg, name), name
    assert p.stop_token_ids == (2, 4, 9) and p.seed == 11  # eos always stops, first
    greedy = sampling_params(cfg, 2, seed=0, max_new_tokens=3, temperature=0.0)
    assert (greedy.max_new_tokens, greedy.temperature, greedy.top_k, greedy.min_new_tokens) == (3, 0.0, 5, 2)


def eval_records(recipe, n=6):
    tok = load_tokenizer(recipe.model)
    rows = load_rows(recipe.data.eval, "data.eval")
    fmt = check_columns(rows, recipe.data, recipe.data.eval, "data.eval", need_completion=False)
    return prompt_records(rows[:n], fmt, recipe.data, tok)[0]


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_eval_samples_as_training_does(base_model, backend):
    """eval keeps rollout.min_new_tokens (greedy too) and rollout.top_k (pass@k sampling): top_k=1 is greedy."""
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"model.name_or_path={base_model}",
            f"rollout.backend={backend}",
            "rollout.max_new_tokens=12",
            "rollout.min_new_tokens=12",
        ],
    )
    records = eval_records(recipe)
    m, _ = evaluate_model(recipe, str(base_model), records, [])
    assert (
        m["completion_len"] == 12 and m["truncated_frac"] == 1.0
    )  # without min_new_tokens the toy model stops earlier
    short = dataclasses.replace(
        recipe, rollout=dataclasses.replace(recipe.rollout, min_new_tokens=0, max_new_tokens=40)
    )
    greedy, greedy_samples = evaluate_model(short, str(base_model), records, [])
    assert greedy["completion_len"] < 40
    pass_k = dataclasses.replace(
        short,
        rollout=dataclasses.replace(short.rollout, top_k=1, temperature=1.0),
        eval=dataclasses.replace(short.eval, num_samples=3),
    )
    sampled, sampled_samples = evaluate_model(pass_k, str(base_model), records, [])
    assert sampled_samples == greedy_samples  # top_k=1 leaves one token to sample: the greedy one
    torch.testing.assert_close(torch.tensor(sampled["completion_len"]), torch.tensor(greedy["completion_len"]))
