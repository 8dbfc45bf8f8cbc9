"""grpo.prefix: shared-prefix logprobs equal the plain padded forward (values and gradients)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from grpo.batch import PaddedBatch, Rollouts, build_batch, loss_mask, micro_batches, split_rows, token_logprobs
from grpo.prefix import (
    PackedGroups,
    pack_groups,
    packed_logprobs,
    prefix_attention,
    shared_prefix_logprobs,
    supports_training,
)
from grpo.rollout import Completion

TEMPERATURE = 0.7
ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "qwen2", "deepseek_v3"])
def model(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("prefix") / request.param, request.param, seed=1)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()


def ragged(vocab: int, group_size: int, prompt_lens=(5, 11, 1), seed: int = 0):
    """Prompts of different lengths, completions of lengths 0..9 (one empty, one of length 1)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    comps = [[rng.randrange(vocab) for _ in range(rng.randint(2, 9))] for _ in range(len(prompts) * group_size)]
    comps[1], comps[group_size] = [], [rng.randrange(vocab)]
    return prompts, comps


def plain(model, prompts, comps, group_of):
    """The reference: grpo.batch.build_batch + token_logprobs (left-padded prompts, padded completions)."""
    batch = build_batch(prompts, comps, group_of, 0)
    logp = token_logprobs(model, batch, TEMPERATURE)
    return logp, lengths_mask(comps, logp.shape[1])


def lengths_mask(comps, width):
    return (torch.arange(width)[None] < torch.tensor([len(c) for c in comps])[:, None]).float()


def grads_of(model, logp, weights):
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------- layout
def test_layout_by_hand():
    # prompt [7, 8] with completions [1, 2, 3] and [4]; prompt [9] with [5, 6] and []
    p = pack_groups([[7, 8], [9]], [[1, 2, 3], [4], [5, 6], []], [0, 0, 1, 1])
    assert p.input_ids.tolist() == [[7, 8, 1, 2, 3, 4, 9, 5, 6]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 2]]
    # logits of token t come from the previous token: the prompt's last for t = 0
    assert p.keep_idx.tolist() == [1, 2, 3, 1, 6, 7]
    assert p.target.tolist() == [1, 2, 3, 4, 5, 6]
    assert list(zip(p.rows.tolist(), p.cols.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1)]
    assert (p.groups, p.prompt_width, p.n_rows, p.comp_width, p.group_size, p.width) == (2, 2, 4, 3, 2, 3)
    # buffer: prompts [2 groups x 2] then completions [4 rows x 3]; padding feeds from position 0 / the zero row (9)
    assert p.src_zero.tolist() == [0, 1, 6, 9, 2, 3, 4, 5, 9, 9, 7, 8, 9, 9, 9, 9]
    assert p.src.tolist() == [0, 1, 6, 0, 2, 3, 4, 5, 0, 0, 7, 8, 0, 0, 0, 0]
    assert p.inv.tolist() == [0, 1, 4, 5, 6, 7, 2, 10, 11]
    # keys a completion attends: its group's prompt entries, then its own entries
    assert p.kv_idx.view(4, 5).tolist() == [[0, 1, 4, 5, 6], [0, 1, 7, 8, 9], [2, 3, 10, 11, 12], [2, 3, 13, 14, 15]]
    # row 2 (prompt of length 1) sees prompt key 0 only, then itself causally
    assert p.comp_mask[2, 0].int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 1, 1]]
    assert p.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert pack_groups([[7, 8], [9]], [[1, 2, 3], [4]], [1, 0], width=2).input_ids.tolist() == [[9, 1, 2, 7, 8, 4]]


def test_bad_inputs():
    with pytest.raises(ValueError, match="prompt_index 3"):
        pack_groups([[1]], [[2]], [3])
    with pytest.raises(ValueError, match="group_size"):
        shared_prefix_logprobs(torch.nn.Linear(1, 1), [[1]], [[2], [3], [4]], 2, 1.0)
    with pytest.raises(RuntimeError, match="prefix_layout"):
        prefix_attention(None, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), None)


# ------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("group_size", [1, 4])
def test_logprobs_and_grads_match_plain_forward(model, group_size):
    prompts, comps = ragged(model.config.vocab_size, group_size)
    group_of = [j // group_size for j in range(len(comps))]
    ref, ref_mask = plain(model, prompts, comps, group_of)
    logp, mask = shared_prefix_logprobs(model, prompts, comps, group_size, TEMPERATURE)
    assert logp.shape == ref.shape and torch.equal(mask, ref_mask)
    torch.testing.assert_close(logp * mask, ref * ref_mask, atol=ATOL, rtol=0)
    assert (logp[mask == 0] == 0).all()
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) * ref_mask
    assert_same_grads(
        grads_of(model, logp, weights), grads_of(model, plain(model, prompts, comps, group_of)[0], weights)
    )


def test_groups_out_of_order_and_split(model):
    """Rows of a group need not be contiguous or complete (the gather path instead of the broadcast)."""
    prompts, comps = ragged(model.config.vocab_size, 3, prompt_lens=(4, 9, 2), seed=3)
    group_of = [2, 0, 0, 1, 2, 1, 0]
    comps = comps[: len(group_of)]
    packed = pack_groups(prompts, comps, group_of)
    assert packed.group_size == 0
    ref, ref_mask = plain(model, prompts, comps, group_of)
    logp = packed_logprobs(model, packed, TEMPERATURE)
    torch.testing.assert_close(logp * ref_mask, ref * ref_mask, atol=ATOL, rtol=0)
    weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)) * ref_mask
    assert_same_grads(
        grads_of(model, packed_logprobs(model, packed, TEMPERATURE), weights),
        grads_of(model, plain(model, prompts, comps, group_of)[0], weights),
    )


def test_no_grad_and_eval_mode(model):
    prompts, comps = ragged(model.config.vocab_size, 3)
    model.eval()
    try:
        with torch.no_grad():
            logp, mask = shared_prefix_logprobs(model, prompts, comps, 3, TEMPERATURE)
            ref, _ = plain(model, prompts, comps, [j // 3 for j in range(len(comps))])
    finally:
        model.train()
    assert not logp.requires_grad
    torch.testing.assert_close(logp * mask, ref * mask, atol=ATOL, rtol=0)
    assert model.config._attn_implementation != "grpo_prefix"  # switched back


def test_lora_policy_and_reference(model):
    import copy

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    )
    for name, p in lora.named_parameters():  # a non-zero adapter, so the adapter matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    prompts, comps = ragged(model.config.vocab_size, 3, seed=5)
    group_of = [j // 3 for j in range(len(comps))]
    ref, mask = plain(lora, prompts, comps, group_of)
    logp, _ = shared_prefix_logprobs(lora, prompts, comps, 3, TEMPERATURE)
    torch.testing.assert_close(logp * mask, ref * mask, atol=ATOL, rtol=0)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)) * mask
    got = grads_of(lora, logp, weights)
    assert got and all("lora_" in name for name in got)
    assert_same_grads(got, grads_of(lora, plain(lora, prompts, comps, group_of)[0], weights))
    with torch.no_grad(), lora.disable_adapter():  # the reference policy under LoRA
        base, _ = shared_prefix_logprobs(lora, prompts, comps, 3, TEMPERATURE)
        base_ref, _ = plain(model, prompts, comps, group_of)
    torch.testing.assert_close(base * mask, base_ref * mask, atol=ATOL, rtol=0)
    assert (base * mask - logp.detach() * mask).abs().max() > 1e-3


def test_trainer_micro_batches_same_logprobs_either_layout(model):
    """grpo.batch.micro_batches: the packed and the padded layout of every micro-batch give the same logprobs."""
    G = 4
    prompts, comps = ragged(model.config.vocab_size, G, prompt_lens=(6, 3, 8), seed=7)
    prompts[2] = prompts[0]  # the same prompt twice in a step: one group
    comps[-1] = comps[-1] + [5] * 4  # the longest completion is truncated and masked (mask_truncated)
    completions = [
        Completion(j // G, c, None, "length" if j == len(comps) - 1 else "stop") for j, c in enumerate(comps)
    ]
    rollouts = Rollouts(
        [{"prompt_ids": p} for p in prompts],
        completions,
        [""] * len(comps),
        torch.zeros(len(comps), 0),
        torch.ones(len(comps), dtype=torch.bool),
    )
    mask = loss_mask(completions, rollouts.ok, mask_truncated=True)
    assert mask[-1].sum() == 0 and mask.shape[1] == max(len(c) for c in comps)
    adv = torch.randn(len(comps))
    for size in (12, 6):
        splits = split_rows(rollouts, size=size)
        packed = micro_batches(rollouts, mask, adv, splits, shared_prefix=True, pad_id=0, device="cpu")
        padded = micro_batches(rollouts, mask, adv, splits, shared_prefix=False, pad_id=0, device="cpu")
        assert len(packed) == len(padded) == -(-len(comps) // size)
        for k, (a, b) in enumerate(zip(packed, padded)):
            assert isinstance(a.layout, PackedGroups) and isinstance(b.layout, PaddedBatch)
            torch.testing.assert_close(a.mask, b.mask)
            m = a.mask
            logp, ref = a.logprobs(model, TEMPERATURE), b.logprobs(model, TEMPERATURE)
            assert logp.shape == ref.shape == m.shape
            torch.testing.assert_close(logp * m, ref * m, atol=ATOL, rtol=0)
            rows = slice(k * size, k * size + size)
            assert a.layout.groups == len({tuple(prompts[c.prompt_index]) for c in completions[rows]})
    whole = micro_batches(rollouts, mask, adv, [list(range(len(comps)))], shared_prefix=True, pad_id=0, device="cpu")[
        0
    ].layout
    assert whole.groups == 2 and whole.group_size == 0  # prompt 0 and 2 merged: 8 + 4 rows
    # the width of a micro-batch is its last scored column: the masked, truncated tail is not fed
    assert whole.width == max(len(c) for c in comps[:-1])


def test_gradient_checkpointing(tmp_path):
    """Under gradient checkpointing (sdpa) the packed path trains: values and gradients equal the plain forward's."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"), dtype=torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts, comps = ragged(model.config.vocab_size, 2)
    assert supports_training(model)
    group_of = [j // 2 for j in range(len(comps))]
    logp, mask = shared_prefix_logprobs(model, prompts, comps, 2, TEMPERATURE)
    ref = token_logprobs(model, build_batch(prompts, comps, group_of, 0), TEMPERATURE)
    torch.testing.assert_close(logp * mask, ref * mask, atol=ATOL, rtol=0)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    assert_same_grads(
        grads_of(model, shared_prefix_logprobs(model, prompts, comps, 2, TEMPERATURE)[0], weights),
        grads_of(model, token_logprobs(model, build_batch(prompts, comps, group_of, 0), TEMPERATURE), weights),
    )


def test_under_ddp(model, tmp_path):
    """Called through DistributedDataParallel (its forward and hooks run); gradients as the plain forward's."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(model))
        prompts, comps = ragged(model.config.vocab_size, 3, seed=11)
        group_of = [j // 3 for j in range(len(comps))]
        batch = build_batch(prompts, comps, group_of, 0)
        mask = lengths_mask(comps, batch.completion_ids.shape[1])
        weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)) * mask
        got = grads_of(ddp.module, packed_logprobs(ddp, pack_groups(prompts, comps, group_of), TEMPERATURE), weights)
        assert_same_grads(got, grads_of(model, token_logprobs(model, batch, TEMPERATURE), weights))
    finally:
        dist.destroy_process_group()
