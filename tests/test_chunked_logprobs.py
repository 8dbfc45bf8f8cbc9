"""Chunked LM-head log-probs (grpo.logprobs) and shared-prefix attention under gradient checkpointing.

Every faster path is checked against today's full-logits path: the model's ``[B, C + 1, V]`` logits
(``logits_to_keep``) and `selective_log_softmax`, values and gradients of every parameter (fp32: 1e-5).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from conftest import ROOT, make_tiny_model
from grpo.logprobs import chunked_logprobs, entropy_from_logits, forward_logprobs, selective_log_softmax
from grpo.prefix import pack_groups, packed_logprobs, supports_training

TEMPERATURE = 0.7
ATOL = 1e-5


# ------------------------------------------------------------------------------------- helpers
def tiny(tmp_path, arch: str = "llama", tied: bool = True, **load) -> nn.Module:
    """A tiny random model of `arch` (conftest.make_tiny_model), with its own lm_head weight when not `tied`."""
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_model(tmp_path / arch, arch, seed=1), dtype=torch.float32, **load
    )
    if not tied:
        model.config.tie_word_embeddings = False
        g = torch.Generator().manual_seed(5)
        noise = 0.05 * torch.randn(model.lm_head.weight.shape, generator=g)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + noise)
        assert model.lm_head.weight is not model.get_input_embeddings().weight
    return model.train()


def padded_inputs(vocab: int, rows: int = 3, prompt: int = 6, completion: int = 7, seed: int = 0):
    """A plain-layout batch: left-padded prompts of different lengths, then `completion` tokens per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, prompt + completion), generator=g)
    attn = torch.ones_like(ids)
    for r in range(rows):
        attn[r, :r] = 0  # row r has r padding tokens
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=attn, position_ids=pos), ids[:, prompt:]


def full_path(model, inputs: dict, targets, temperature=TEMPERATURE):
    """Today's plain path: full logits of the last C+1 positions, then selective_log_softmax."""
    C = targets.shape[1]
    logits = model(**inputs, use_cache=False, logits_to_keep=C + 1).logits[:, :-1]
    return selective_log_softmax(logits, targets, temperature=temperature)


def grads_of(model, logp, weights) -> dict:
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict, b: dict, atol=ATOL, rtol=1e-4):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def weights_like(x, seed=0):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- chunked_logprobs
@pytest.mark.parametrize("temperature", [1.0, TEMPERATURE])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_head_equals_full_logits(temperature, chunk_size):
    """Any chunk size (dividing the 30 tokens or not): values, entropy and gradients (hidden, weight, bias)."""
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 53)
    hidden = torch.randn(5, 6, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 53, (5, 6), generator=g)
    logits = head(hidden)
    ref = selective_log_softmax(logits, targets, temperature=temperature)
    logp, ent = chunked_logprobs(hidden, head, targets, temperature, chunk_size, with_entropy=True)
    assert logp.shape == ent.shape == (5, 6) and logp.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(logp, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, entropy_from_logits(logits.detach() / temperature), atol=ATOL, rtol=0)
    w = weights_like(ref)
    got = torch.autograd.grad((logp * w).sum(), [hidden, head.weight, head.bias])
    want = torch.autograd.grad((ref * w).sum(), [hidden, head.weight, head.bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_chunked_head_bf16_is_close_and_float32():
    """bf16 weights: the log-sum-exp runs in fp32. Values and gradients are as close to fp32 math on the same
    weights as today's bf16 path is (<= 1e-2 of the gradient's scale), and close to today's path."""
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(16, 101, bias=False).to(torch.bfloat16)
    hidden = torch.randn(40, 16, generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 101, (40,), generator=g)
    logp = chunked_logprobs(hidden, head, targets, TEMPERATURE, chunk_size=6)
    assert logp.dtype == torch.float32
    today = selective_log_softmax(head(hidden)[None], targets[None], TEMPERATURE)[0]
    h32, w32 = hidden.detach().float().requires_grad_(), head.weight.detach().float().requires_grad_()
    exact = torch.log_softmax(h32 @ w32.t() / TEMPERATURE, -1).gather(-1, targets[:, None])[:, 0]
    want = torch.autograd.grad(exact.sum(), [h32, w32])
    torch.testing.assert_close(logp, exact, atol=1e-2, rtol=0)
    torch.testing.assert_close(logp, today, atol=1e-2, rtol=0)
    grads = {}
    for name, x in (("chunked", logp), ("today", today)):
        grads[name] = torch.autograd.grad(x.sum(), [hidden, head.weight])
        assert all(t.dtype == torch.bfloat16 for t in grads[name])
        for got, ref in zip(grads[name], want):
            assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    for a, b in zip(*grads.values()):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


class CountShape(TorchDispatchMode):
    """Counts the tensors of one shape that operators create (not those an in-place or out= op writes into)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [id(t) for t in tree_flatten((args, kwargs))[0]]
        self.count += sum(
            isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape and id(t) not in given
            for t in tree_flatten(out)[0]
        )
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_plain_linear_head_accumulates_the_weight_gradient_in_place(tied):
    """A bare nn.Linear head takes the one-node path: the same values, entropy and gradients (hidden, weight, bias;
    a weight tied to an embedding gets both contributions) as the chunk-by-chunk path through the module, which a
    forward hook on the head forces; and its backward makes ONE [vocab, hidden] weight gradient, where the module
    path makes one per chunk."""
    g = torch.Generator().manual_seed(3)
    V, H, chunk = 97, 12, 8
    emb, head = nn.Embedding(V, H), nn.Linear(H, V)
    if tied:
        head.weight = emb.weight
    ids = torch.randint(0, V, (40,), generator=g)
    targets = torch.randint(0, V, (40,), generator=g)
    w = torch.randn(40, generator=g)
    results = {}
    for path in ("one node", "module"):
        hook = head.register_forward_hook(lambda *a: None) if path == "module" else None
        hidden = torch.tanh(emb(ids))
        with CountShape((V, H)) as mode:
            logp, ent = chunked_logprobs(hidden, head, targets, TEMPERATURE, chunk, with_entropy=True)
            grads = torch.autograd.grad((logp * w).sum(), [emb.weight, head.weight, head.bias])
        results[path] = (logp, ent, grads, mode.count)
        if hook:
            hook.remove()
    (lp1, ent1, g1, n1), (lp2, ent2, g2, n2) = results["one node"], results["module"]
    torch.testing.assert_close(lp1, lp2, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent1, ent2, atol=1e-6, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    chunks = -(-40 // chunk)
    assert n2 >= chunks and n1 < n2  # the module path: a [V, H] weight gradient per chunk (and their sums)
    assert n1 <= 2 + tied  # one node: the one accumulator (+ the embedding's gradient, + the tied sum)


def test_plain_linear_head_under_autocast_with_bf16_hidden_states():
    """Under bf16 autocast with an fp32 head and bf16 hidden states (what a model's last norm may hand over), the
    one-node path runs and agrees with the module path (which computes its backward in bf16: close, not equal)."""
    g = torch.Generator().manual_seed(4)
    head = nn.Linear(8, 31)
    hidden = torch.randn(10, 8, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 31, (10,), generator=g)
    out = {}
    for path in ("one node", "module"):
        hook = head.register_forward_hook(lambda *a: None) if path == "module" else None
        x = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = chunked_logprobs(x, head, targets, TEMPERATURE, 4)
        gx, gw = torch.autograd.grad(logp.sum(), [x, head.weight])
        out[path] = (logp, gx, gw)
        if hook:
            hook.remove()
    (lp1, gx1, gw1), (lp2, gx2, gw2) = out["one node"], out["module"]
    assert gx1.dtype == gx2.dtype == torch.bfloat16 and gw1.dtype == gw2.dtype == torch.float32
    torch.testing.assert_close(lp1, lp2, atol=1e-5, rtol=0)
    for a, b in ((gx1, gx2), (gw1, gw2)):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


def test_bad_arguments():
    head = nn.Linear(4, 9)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprobs(torch.zeros(3, 4), head, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        chunked_logprobs(torch.zeros(3, 4), head, torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(torch.zeros(3, 4), head, torch.zeros(3, dtype=torch.long), chunk_size=0)


# ------------------------------------------------------------------------------------- forward_logprobs
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_forward_logprobs_equals_full_logits_path(tmp_path, arch, tied):
    """Plain layout, each architecture of tests/test_architectures.py, tied and untied heads (lm_head trained)."""
    model = tiny(tmp_path, arch, tied)
    head = model.get_output_embeddings()
    inputs, targets = padded_inputs(model.config.vocab_size)
    ref = full_path(model, inputs, targets)
    logp = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=5)  # 21 tokens: 5+5+5+5+1
    assert model.get_output_embeddings() is head  # put back
    assert logp.shape == targets.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=ATOL, rtol=0)
    w = weights_like(ref)
    got = grads_of(model, forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=5), w)
    assert "lm_head.weight" in got or "model.embed_tokens.weight" in got
    assert_same_grads(got, grads_of(model, full_path(model, inputs, targets), w))


def test_forward_logprobs_entropy_and_no_grad(tmp_path):
    model = tiny(tmp_path)
    inputs, targets = padded_inputs(model.config.vocab_size, seed=1)
    with torch.no_grad():
        logp, ent = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=4, with_entropy=True)
        logits = model(**inputs, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
    assert not logp.requires_grad and ent.shape == targets.shape
    torch.testing.assert_close(ent, entropy_from_logits(logits / TEMPERATURE), atol=ATOL, rtol=0)
    torch.testing.assert_close(logp, full_path(model, inputs, targets).detach(), atol=ATOL, rtol=0)


def test_forward_logprobs_bf16_model_is_close(tmp_path):
    model = tiny(tmp_path, "qwen2", tied=False).to(torch.bfloat16)
    inputs, targets = padded_inputs(model.config.vocab_size, seed=2)
    logp = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
    ref = full_path(model, inputs, targets)
    assert logp.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=2e-2, rtol=1e-2)
    w = weights_like(ref)
    got, want = grads_of(model, logp, w), grads_of(model, ref, w)
    assert got.keys() == want.keys()
    for name in got:  # bf16 gradients: relative to the gradient's scale
        scale = want[name].float().abs().max().clamp(min=1e-3)
        assert ((got[name].float() - want[name].float()).abs().max() / scale) < 5e-2, name


def test_under_autocast_bf16(tmp_path):
    """Mixed precision as accelerate runs it (autocast around the forward): the chunks' recompute runs under the
    same autocast, the log-sum-exp in fp32; close to the full path under the same autocast."""
    model = tiny(tmp_path, "qwen2", tied=False)
    inputs, targets = padded_inputs(model.config.vocab_size, seed=9)
    w = weights_like(targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
        ref = full_path(model, inputs, targets)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref.float(), atol=2e-2, rtol=1e-2)
    got, want = grads_of(model, logp, w), grads_of(model, ref, w)
    assert got.keys() == want.keys()
    for name in got:
        assert (got[name] - want[name]).abs().max() <= 5e-2 * want[name].abs().max().clamp(min=1e-3), name


@pytest.mark.parametrize("lm_head", ["lora", "modules_to_save"])
def test_lora_including_the_output_layer(tmp_path, lm_head):
    """peft wraps lm_head (LoRA on it, or a trained copy): the wrapped module runs chunk by chunk, gradients exact."""
    from peft import LoraConfig, get_peft_model

    base = tiny(tmp_path, "llama", tied=False)
    if lm_head == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    else:
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
        )
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))  # an adapter (and head copy) that changes the output
    inputs, targets = padded_inputs(base.config.vocab_size, seed=3)
    ref = full_path(model, inputs, targets)
    logp = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=3)
    torch.testing.assert_close(logp, ref, atol=ATOL, rtol=0)
    w = weights_like(ref)
    got = grads_of(model, logp, w)
    assert any("lm_head" in n for n in got), sorted(got)
    assert_same_grads(got, grads_of(model, full_path(model, inputs, targets), w))
    with torch.no_grad(), model.disable_adapter():  # the reference policy under LoRA
        torch.testing.assert_close(
            forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=3),
            full_path(model, inputs, targets),
            atol=ATOL,
            rtol=0,
        )


def test_logit_softcapping_falls_back_to_full_logits(tmp_path, caplog):
    """Gemma2 softcaps its logits after lm_head: detected, one warning, full-logits values (still exact)."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    inputs, targets = padded_inputs(61, seed=4)
    with caplog.at_level(logging.WARNING, logger="grpo.logprobs"):
        logp = forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
        forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "Gemma2ForCausalLM transforms its logits" in caplog.records[0].getMessage()
    torch.testing.assert_close(logp, full_path(model, inputs, targets), atol=ATOL, rtol=0)
    assert logp.requires_grad


# ------------------------------------------------------------------------------------- memory
class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor (numel) any op produces whose last dim is the vocabulary, forward and backward."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_vocab_sized_tensors_do_not_grow_with_tokens(tmp_path):
    """Forward + backward: the chunked path's largest [.., V] tensor is the same for 32 and 128 completion tokens
    (at most max(chunk, hidden) x V), while the full-logits path's grows with the tokens (>= B x C x V)."""
    from transformers import LlamaConfig

    V, H, chunk = 1031, 16, 8
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    largest = {}
    for C in (32, 128):
        inputs, targets = padded_inputs(V, rows=2, prompt=5, completion=C)
        runs = {
            "chunked": lambda: forward_logprobs(model, inputs, targets, temperature=TEMPERATURE, chunk_size=chunk),
            "full": lambda: full_path(model, inputs, targets),
        }
        for name, run in runs.items():
            with LargestVocabTensor(V) as mode:
                run().sum().backward()
            model.zero_grad(set_to_none=True)
            largest[name, C] = mode.largest
    assert largest["chunked", 32] == largest["chunked", 128] <= max(chunk, H) * V
    assert largest["full", 32] >= 2 * 32 * V and largest["full", 128] >= 2 * 128 * V


# ------------------------------------------------------------------------------------- wrappers
@pytest.mark.parametrize("find_unused", [False, True])
def test_under_ddp(tmp_path, find_unused):
    """Through DDP's forward (its hooks fire; with find_unused_parameters its outputs are fresh tensors)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny(tmp_path, tied=False)
    inputs, targets = padded_inputs(model.config.vocab_size, seed=6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(model), find_unused_parameters=find_unused)
        w = weights_like(targets)
        logp = forward_logprobs(ddp, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
        got = grads_of(ddp.module, logp, w)
        assert_same_grads(got, grads_of(model, full_path(model, inputs, targets), w))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("error:FSDP2-wrapped module")  # our output is no view (FSDP2 hooks the root's outputs)
@pytest.mark.parametrize("head_unit", [False, True], ids=["head_in_root", "head_own_unit"])
def test_under_fsdp2(tmp_path, head_unit):
    """FSDP2 (fully_shard): the head runs inside the root's forward, where its DTensor weight is unsharded
    (called outside that forward it would fail: mixed Tensor and DTensor), or as its own FSDP unit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny(tmp_path, tied=False)
    inputs, targets = padded_inputs(model.config.vocab_size, seed=7)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (1,))
        for layer in sharded.model.layers:
            fully_shard(layer, mesh=mesh)
        if head_unit:
            fully_shard(sharded.lm_head, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        w = weights_like(targets)
        logp = forward_logprobs(sharded, inputs, targets, temperature=TEMPERATURE, chunk_size=4)
        (logp * w).sum().backward()
        got = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
        assert_same_grads(got, grads_of(model, full_path(model, inputs, targets), w))
    finally:
        dist.destroy_process_group()


ZERO3_CHECK = """
import copy, os, sys, torch
import deepspeed
from deepspeed.utils import safe_get_full_grad
from transformers import AutoModelForCausalLM
from grpo.logprobs import forward_logprobs
import test_chunked_logprobs as t

deepspeed.init_distributed(dist_backend="gloo")
for tied in (True, False):
    model = t.tiny(t.Path(sys.argv[1]) / str(tied), tied=tied)
    twin = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(model=twin, optimizer=torch.optim.SGD(twin.parameters(), lr=0.1), config={
        "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    assert all(p.ds_tensor.numel() >= 0 and p.numel() == 0 for p in engine.module.parameters())  # partitioned
    inputs, targets = t.padded_inputs(model.config.vocab_size, seed=8)
    w = t.weights_like(targets)
    logp = forward_logprobs(engine, inputs, targets, temperature=t.TEMPERATURE, chunk_size=4)
    ref = t.full_path(model, inputs, targets)
    torch.testing.assert_close(logp.detach(), ref.detach(), atol=t.ATOL, rtol=0)
    engine.backward((logp * w).sum())
    got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
    t.assert_same_grads(got, t.grads_of(model, ref, w))
print("ZERO3 OK")
"""


@pytest.mark.slow
def test_under_deepspeed_zero3(tmp_path):
    """ZeRO-3 (one process, every weight partitioned): the head's weight is gathered by DeepSpeed's module hooks
    on each chunk call and recompute; values and full gradients equal the unsharded full-logits path."""
    pytest.importorskip("deepspeed")
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    env.pop("ACCELERATE_USE_CPU", None)
    code = "from pathlib import Path\n" + ZERO3_CHECK.replace("t.Path", "Path")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "ZERO3 OK" in proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------- shared prefix
def packed_and_plain(model, group_size=3, seed=0):
    """Ragged prompts / completions as a packed layout, and the same rows as a plain padded batch."""
    rng = random.Random(seed)
    V = model.config.vocab_size
    prompts = [[rng.randrange(1, V) for _ in range(n)] for n in (5, 9)]
    comps = [[rng.randrange(1, V) for _ in range(rng.randint(1, 7))] for _ in range(len(prompts) * group_size)]
    group_of = [j // group_size for j in range(len(comps))]
    P, C = max(map(len, prompts)), max(map(len, comps))
    ids, attn = torch.zeros(len(comps), P + C, dtype=torch.long), torch.zeros(len(comps), P + C, dtype=torch.long)
    mask = torch.zeros(len(comps), C)
    for j, (c, i) in enumerate(zip(comps, group_of)):
        p = prompts[i]
        ids[j, P - len(p) : P], ids[j, P : P + len(c)] = torch.tensor(p), torch.tensor(c)
        attn[j, P - len(p) : P + len(c)] = 1
        mask[j, : len(c)] = 1
    inputs = dict(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
    return pack_groups(prompts, comps, group_of), inputs, ids[:, P:], mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_packed_layout_chunked(tmp_path, arch):
    """The shared-prefix path with several chunks equals the plain full-logits path (values, gradients)."""
    model = tiny(tmp_path, arch, tied=False)
    packed, inputs, targets, mask = packed_and_plain(model)
    ref = full_path(model, inputs, targets)
    logp, ent = packed_logprobs(model, packed, TEMPERATURE, chunk_size=4, with_entropy=True)
    torch.testing.assert_close(logp * mask, ref * mask, atol=ATOL, rtol=0)
    assert ent.shape == mask.shape and (ent[mask == 0] == 0).all() and (ent[mask == 1] > 0).all()
    w = weights_like(ref) * mask
    assert_same_grads(
        grads_of(model, packed_logprobs(model, packed, TEMPERATURE, chunk_size=4), w),
        grads_of(model, full_path(model, inputs, targets), w),
    )


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_prefix_sharing_under_gradient_checkpointing(tmp_path, arch, reentrant):
    """With checkpointing on, the backward's recompute still runs the shared-prefix attention: gradients exact."""
    model = tiny(tmp_path, arch, tied=False)
    packed, inputs, targets, mask = packed_and_plain(model, seed=1)
    w = weights_like(targets, seed=2) * mask
    want = grads_of(model, full_path(model, inputs, targets), w)  # no checkpointing: the reference
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert supports_training(model)
    logp = packed_logprobs(model, packed, TEMPERATURE, chunk_size=4)
    torch.testing.assert_close(logp * mask, full_path(model, inputs, targets).detach() * mask, atol=ATOL, rtol=0)
    calls = packed.calls
    assert_same_grads(grads_of(model, logp, w), want)
    assert packed.calls == 2 * calls  # the backward recomputed every layer through the shared-prefix attention
    assert model.config._attn_implementation == "sdpa"


def test_prefix_sharing_under_gradient_checkpointing_with_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny(tmp_path, "qwen2")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    packed, inputs, targets, mask = packed_and_plain(model.get_base_model(), seed=3)
    w = weights_like(targets, seed=4) * mask
    want = grads_of(model, full_path(model, inputs, targets), w)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads_of(model, packed_logprobs(model, packed, TEMPERATURE, chunk_size=4), w)
    assert got and all("lora_" in n for n in got)
    assert_same_grads(got, want)


def test_eager_attention_under_checkpointing_is_refused(tmp_path):
    """Eager attention is each model file's own function (not in AttentionInterface): it cannot be routed."""
    model = tiny(tmp_path, attn_implementation="eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed, *_ = packed_and_plain(model)
    assert not supports_training(model)
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
        packed_logprobs(model, packed, TEMPERATURE)
    with torch.no_grad():  # reference / old logprobs are fine
        packed_logprobs(model, packed, TEMPERATURE)
    model.gradient_checkpointing_disable()
    assert supports_training(model)


def test_routed_attention_is_transparent_without_a_layout(tmp_path):
    """The routing wrapper under "sdpa" passes every call without ``prefix_layout`` to the original function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny(tmp_path)
    packed, *_ = packed_and_plain(model)
    with torch.no_grad():
        packed_logprobs(model, packed, TEMPERATURE)  # installs the routing
    routed = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert routed is not sdpa_attention_forward and routed.grpo_prefix_routed
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))  # 4 query heads, 2 key/value heads
    module = model.model.layers[0].self_attn
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    for a, b in zip(
        routed(module, q, k, v, mask, dropout=0.0), sdpa_attention_forward(module, q, k, v, mask, dropout=0.0)
    ):
        assert (a is None and b is None) or torch.equal(a, b)
