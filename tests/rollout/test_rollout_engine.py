"""The `engine` backend against `hf` generate and against a plain full forward, on tiny fp32 models."""

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

from grpo.rollout import SamplingParams, make_rollout

STOPS = tuple(range(1, VOCAB, 6))  # ~1/6 of the vocabulary: many samples stop early, some do not


def full_forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of a fresh forward over prompt + completion, at the completion tokens."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def token_ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_greedy_matches_hf_token_for_token(arch, lora):
    model = tiny_model(arch, lora=lora)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    ref = make_rollout("hf", model, None).generate(PROMPTS, 2, params)
    out = make_rollout("engine", model, None).generate(PROMPTS, 2, params)
    assert token_ids(out) == token_ids(ref)
    for a, b in zip(out, ref):
        assert a.prompt_index == b.prompt_index and a.finish_reason == b.finish_reason == "length"
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_lora_adapter_changes_the_model():
    model = tiny_model("llama", lora=True)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert (with_adapter - without).abs().max() > 1e-2


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_full_forward(arch, lora, temperature):
    model = tiny_model(arch, lora=lora)
    params = SamplingParams(max_new_tokens=16, temperature=temperature, seed=1)
    out = make_rollout("engine", model, None).generate(PROMPTS, 3, params)
    for c in out:
        expected = full_forward_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4), c


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model("qwen2")
    rollout = make_rollout("engine", model, None)
    a = rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=12, seed=7))
    b = rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=12, seed=7))
    c = rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=12, seed=8))
    assert token_ids(a) == token_ids(b) and [x.logprobs for x in a] == [x.logprobs for x in b]
    assert token_ids(a) != token_ids(c)
    # the n samples of one prompt are different draws
    assert len({tuple(x.token_ids) for x in a[:4]}) > 1


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_stop_tokens_and_max_new_tokens(backend):
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=10, stop_token_ids=STOPS, seed=3)
    out = make_rollout(backend, model, None).generate(PROMPTS, 8, params)
    assert {c.finish_reason for c in out} == {"stop", "length"}
    for c in out:
        assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
        assert not set(c.token_ids[:-1]) & set(STOPS), "nothing after the first stop token"
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in STOPS
        else:
            assert len(c.token_ids) == 10 and c.token_ids[-1] not in STOPS


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_min_new_tokens(backend):
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=10, min_new_tokens=6, stop_token_ids=STOPS, seed=3)
    out = make_rollout(backend, model, None).generate(PROMPTS, 8, params)
    assert any(c.finish_reason == "stop" for c in out)
    for c in out:
        assert not set(c.token_ids[:6]) & set(STOPS)
        assert len(c.token_ids) >= 7 or c.finish_reason == "length"


def test_min_new_tokens_greedy_matches_hf():
    model = tiny_model("llama")
    params = SamplingParams(max_new_tokens=12, temperature=0.0, min_new_tokens=4, stop_token_ids=STOPS)
    ref = make_rollout("hf", model, None).generate(PROMPTS, 1, params)
    out = make_rollout("engine", model, None).generate(PROMPTS, 1, params)
    assert token_ids(out) == token_ids(ref)
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]


def test_top_k_1_equals_greedy():
    model = tiny_model("mistral")
    rollout = make_rollout("engine", model, None)
    greedy = rollout.generate(PROMPTS, 1, SamplingParams(max_new_tokens=16, temperature=0.0))
    top1 = rollout.generate(PROMPTS, 3, SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1, seed=0))
    assert token_ids(top1) == [c.token_ids for c in greedy for _ in range(3)]
    assert all(lp == 0.0 for c in top1 for lp in c.logprobs)  # a one-token distribution


def test_top_p_logprobs_are_of_the_filtered_distribution():
    """Each returned logprob is exactly log softmax over transformers' top-p nucleus (TopPLogitsWarper) of a
    fresh forward, not of the full distribution."""
    from transformers.generation.logits_process import TopPLogitsWarper

    model = tiny_model("llama")
    out = make_rollout("engine", model, None).generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, top_p=0.5, seed=2))
    warp, renormalised = TopPLogitsWarper(top_p=0.5), 0
    for c in out:
        ids = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()[len(PROMPTS[c.prompt_index]) - 1 : -1]
        nucleus = torch.log_softmax(warp(ids, logits), dim=-1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        full = full_forward_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), nucleus, atol=1e-5, rtol=0)
        renormalised += int((nucleus - full > 1e-3).sum())
    assert renormalised > 0  # the nucleus really differs from the full distribution here


def test_continuous_batching_matches_one_batch():
    """More prompts than slots: slots are refilled as groups finish; greedy output is unchanged."""
    model = tiny_model("qwen3")
    prompts = PROMPTS * 3
    params = SamplingParams(max_new_tokens=14, temperature=0.0, stop_token_ids=STOPS[:6])
    ref = make_rollout("hf", model, None).generate(prompts, 2, params)
    small = make_rollout("engine", model, None, max_batch=4, max_prefill_tokens=8).generate(prompts, 2, params)
    assert token_ids(small) == token_ids(ref)
    assert [c.prompt_index for c in small] == [i for i in range(len(prompts)) for _ in range(2)]


def test_kv_storage_is_reused_and_sized_from_config():
    model = tiny_model("llama")
    rollout = make_rollout("engine", model, None, max_batch=8)
    rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6, seed=0))
    cache = rollout.cache
    assert (cache.slots, cache.n, cache.rows) == (2, 4, 8)
    assert cache.prefix_k[0].shape == (2, 2, max(map(len, PROMPTS)), 8)  # [slots, Hkv, prefix, Dk]
    assert cache.suffix_k[0].shape == (8, 2, 6, 8)  # [rows, Hkv, suffix, Dk]
    rollout.generate(PROMPTS[:2], 4, SamplingParams(max_new_tokens=5, seed=0))
    assert rollout.cache is cache


def test_sync_weights_sees_updated_parameters_and_restores_state():
    model = tiny_model("llama", lora=True)
    model.train()
    rollout = make_rollout("engine", model, None)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    before = rollout.generate(PROMPTS, 1, params)
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation != "grpo_rollout"
    with torch.no_grad():  # an "optimizer step" on the adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    rollout.sync_weights(model)
    after = rollout.generate(PROMPTS, 1, params)
    ref = make_rollout("hf", model, None).generate(PROMPTS, 1, params)
    assert token_ids(after) == token_ids(ref) != token_ids(before)


def test_rejects_too_long_requests():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_len"):
        make_rollout("engine", model, None, max_len=16).generate(PROMPTS, 2, SamplingParams(max_new_tokens=8))


def test_sliding_window_beyond_its_length_is_refused():
    model = tiny_model("mistral", sliding_window=12)
    rollout = make_rollout("engine", model, None)
    rollout.generate([[5, 6, 7]], 2, SamplingParams(max_new_tokens=8, seed=0))  # 3 + 8 <= 12: exact attention
    with pytest.raises(NotImplementedError, match="sliding window"):
        rollout.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=0))
    assert model.config._attn_implementation != "grpo_rollout"  # restored on the way out
