"""The `hf` baseline backend and the shared Rollout contract (grouping, params, registry)."""

from __future__ import annotations

import pytest
import torch
from rollout_models import (
    PROMPTS,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_model,
)

from grpo.rollout import BACKENDS, SamplingParams, make_rollout


def test_grouping_shapes_and_logprobs_contract():
    model = tiny_model("llama")
    out = make_rollout("hf", model, None).generate(
        PROMPTS, 3, SamplingParams(max_new_tokens=6, temperature=0.8, seed=0)
    )
    assert len(out) == len(PROMPTS) * 3
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    for c in out:
        assert c.finish_reason == "length" and len(c.token_ids) == len(c.logprobs) == 6
        assert all(lp <= 0 for lp in c.logprobs)
        ids = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0] / 0.8, dim=-1)[
                len(PROMPTS[c.prompt_index]) - 1 : -1
            ]
        assert torch.allclose(
            torch.tensor(c.logprobs), logp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0], atol=1e-4
        )


def test_peft_model_batch_size_and_repeat_variants_agree():
    model = tiny_model("qwen2", lora=True)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    a = make_rollout("hf", model, None).generate(PROMPTS, 2, params)
    b = make_rollout("hf", model, None, batch_size=1, num_return_sequences=False).generate(PROMPTS, 2, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.prompt_index for c in b] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_seeded_sampling_is_reproducible_and_restores_train_mode():
    model = tiny_model("llama", lora=True)
    model.train()
    rollout = make_rollout("hf", model, None)
    a = rollout.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=5))
    b = rollout.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=5))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(m.training for m in model.modules())


def test_registry_names_backends_and_rejects_unknown():
    assert set(BACKENDS.names()) == {"engine", "hf"}
    with pytest.raises(KeyError, match="unknown rollout backend 'nope'; valid: engine, hf"):
        make_rollout("nope", tiny_model("llama"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-1), "temperature"),
        (dict(max_new_tokens=4, top_p=0), "top_p"),
        (dict(max_new_tokens=4, top_k=-1), "top_k"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_bad_prompts_fail_clearly(backend):
    rollout = make_rollout(backend, tiny_model("llama"))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        rollout.generate([[3], []], 2, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="outside"):
        rollout.generate([[3, 999]], 2, SamplingParams(max_new_tokens=2))
    assert rollout.generate([], 2, SamplingParams(max_new_tokens=2)) == []
