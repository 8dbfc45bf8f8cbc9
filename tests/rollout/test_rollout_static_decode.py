"""The engine's static-shape decode step (static_decode=True) against `hf`, a fresh forward and the eager step."""

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
from torch.utils._python_dispatch import TorchDispatchMode

import grpo.rollout.static_decode as static_decode
from grpo.rollout import SamplingParams, make_rollout
from grpo.rollout.sampling import sample_next, sample_static
from grpo.rollout.static_decode import buckets, model_fingerprint, quiet_steps, storage_size

STOPS = tuple(range(1, VOCAB, 6))
# aten ops (overload packet[.overload]) that read device data on the host (item/int/bool/equal) or whose
# output shape depends on the data; seen as `item` under inference mode, `_local_scalar_dense` below it
HOST_SYNC_OPS = {
    "item",
    "_local_scalar_dense",
    "is_nonzero",
    "equal",
    "allclose",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "bincount",
    "repeat_interleave.Tensor",
    "repeat_interleave.self_Tensor",
    "where.default",
}


def syncs(op: str) -> bool:
    return op in HOST_SYNC_OPS or op.split(".")[0] in HOST_SYNC_OPS


def token_ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def full_forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logits = logits / temperature if temperature > 0 else logits
    return (
        torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None]).squeeze(1)
    )


def static_engine(model, **opts):
    return make_rollout("engine", model, None, static_decode=True, **opts)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_greedy_matches_hf_token_for_token(arch, lora):
    model = tiny_model(arch, lora=lora)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    ref = make_rollout("hf", model, None).generate(PROMPTS, 2, params)
    out = static_engine(model).generate(PROMPTS, 2, params)
    assert token_ids(out) == token_ids(ref)
    for a, b in zip(out, ref):
        assert a.prompt_index == b.prompt_index and a.finish_reason == b.finish_reason == "length"
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_stops_refills_and_buckets_matches_hf(arch):
    """More prompts than slots, stop ids and min_new_tokens: rows finish at different steps, buckets shrink,
    slots are refilled; the output is still hf's."""
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    prompts = PROMPTS + [
        torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (8,), generator=g)
    ]
    params = SamplingParams(max_new_tokens=14, temperature=0.0, min_new_tokens=3, stop_token_ids=STOPS)
    ref = make_rollout("hf", model, None).generate(prompts, 2, params)
    out = static_engine(model, max_batch=4, max_prefill_tokens=8).generate(prompts, 2, params)
    assert token_ids(out) == token_ids(ref)
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]
    assert len({len(c.token_ids) for c in out}) > 4  # rows finished at many different steps


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_logprobs_match_full_forward(arch, temperature):
    model = tiny_model(arch)
    params = SamplingParams(max_new_tokens=16, temperature=temperature, stop_token_ids=STOPS, seed=1)
    out = static_engine(model, max_batch=6).generate(PROMPTS, 3, params)
    assert any(c.finish_reason == "stop" for c in out)
    for c in out:
        expected = full_forward_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4), c


def test_stop_tokens_min_new_tokens_and_top_k_top_p():
    model = tiny_model("llama")
    rollout = static_engine(model)
    out = rollout.generate(
        PROMPTS, 8, SamplingParams(max_new_tokens=10, min_new_tokens=4, stop_token_ids=STOPS, seed=3)
    )
    assert {c.finish_reason for c in out} == {"stop", "length"}
    for c in out:
        assert 5 <= len(c.token_ids) <= 10 or c.finish_reason == "length"
        assert not set(c.token_ids[:-1]) & set(STOPS) and not set(c.token_ids[:4]) & set(STOPS)
        assert (c.token_ids[-1] in STOPS) == (c.finish_reason == "stop")
    greedy = rollout.generate(PROMPTS, 1, SamplingParams(max_new_tokens=12, temperature=0.0))
    top1 = rollout.generate(PROMPTS, 3, SamplingParams(max_new_tokens=12, top_k=1, seed=0))
    assert token_ids(top1) == [c.token_ids for c in greedy for _ in range(3)]
    assert all(lp == 0.0 for c in top1 for lp in c.logprobs)
    nucleus = rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=8, top_p=0.5, seed=2))
    for c in nucleus:  # logprobs of the renormalised nucleus: >= the full distribution's
        assert (
            torch.tensor(c.logprobs) >= full_forward_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, 1.0) - 1e-5
        ).all()


def test_same_seed_same_samples_and_equal_to_eager_while_no_row_finishes_early():
    model = tiny_model("qwen2")
    rollout = static_engine(model)
    stops = SamplingParams(max_new_tokens=12, stop_token_ids=STOPS, seed=7)
    a, b = rollout.generate(PROMPTS, 4, stops), rollout.generate(PROMPTS, 4, stops)
    assert token_ids(a) == token_ids(b) and [x.logprobs for x in a] == [x.logprobs for x in b]
    assert token_ids(a) != token_ids(
        rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=12, stop_token_ids=STOPS, seed=8))
    )
    # Fixed length: every row is fed at every step, so the static step draws the eager step's uniforms
    # (one per row, in row order). With stops the eager step draws one per unfinished row instead.
    fixed = SamplingParams(max_new_tokens=12, min_new_tokens=12, seed=7)
    assert token_ids(rollout.generate(PROMPTS, 4, fixed)) == token_ids(
        make_rollout("engine", model, None).generate(PROMPTS, 4, fixed)
    )


class _Trace(TorchDispatchMode):
    """Records every aten op with its output shapes."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))
        self.ops.append((f"{func.overloadpacket.__name__}.{func._overloadname}", shapes))
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_step_has_no_host_sync_and_the_same_shapes_at_every_position(arch, greedy, monkeypatch):
    """What a CUDA graph needs, checked on CPU: no op reads device data on the host, and a bucket's step
    runs the same ops on the same shapes whatever the decode position and the rows' lengths."""
    traces: dict[int, list] = {}
    original = static_decode.static_step

    def no_host_copy(*args, **kwargs):
        raise AssertionError("the static step copied a tensor to the host (tolist/numpy)")

    def traced(model, cache, state, bucket, *args):
        saved = torch.Tensor.tolist, torch.Tensor.numpy  # not aten ops: invisible to the dispatch mode
        torch.Tensor.tolist = torch.Tensor.numpy = no_host_copy
        try:
            with _Trace() as trace:
                original(model, cache, state, bucket, *args)
        finally:
            torch.Tensor.tolist, torch.Tensor.numpy = saved
        traces.setdefault(bucket, []).append(trace.ops)

    monkeypatch.setattr(static_decode, "static_step", traced)
    model = tiny_model(arch, lora=arch == "llama")
    params = SamplingParams(
        max_new_tokens=10, temperature=0.0 if greedy else 1.0, min_new_tokens=2, stop_token_ids=STOPS, seed=0
    )
    static_engine(model, max_batch=8).generate(PROMPTS * 2, 2, params)
    assert len(traces) > 1, "the test should see several buckets"
    for bucket, calls in traces.items():
        ops = {name for name, _ in calls[0]}
        assert not [op for op in ops if syncs(op)], sorted(ops)
        assert all(call == calls[0] for call in calls), f"bucket {bucket}: shapes change between steps"


def test_sample_static_equals_sample_next_given_the_same_uniforms():
    torch.manual_seed(0)
    logits = torch.randn(64, 40) * 2
    too_short = torch.rand(64) < 0.5
    stops = torch.tensor([3, 7])
    for kw in (
        dict(temperature=0.0, min_new_tokens=1),
        dict(temperature=0.8, min_new_tokens=1),
        dict(top_k=5, top_p=0.7),
        dict(temperature=1.3, top_p=0.9, min_new_tokens=1),
    ):
        params = SamplingParams(max_new_tokens=4, **kw)
        short = too_short & (params.min_new_tokens > 0)  # the engine's too_short: t < min_new_tokens
        ref = sample_next(logits, params, torch.Generator().manual_seed(5), stops, short)
        out = sample_static(logits, params, torch.rand(64, 1, generator=torch.Generator().manual_seed(5)), stops, short)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), kw


def test_buckets_storage_sizes_and_quiet_steps():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(12) == [1, 2, 4, 8, 12]
    assert [storage_size(n) for n in (1, 16, 17, 40, 256, 257)] == [16, 16, 32, 64, 256, 512]
    fixed = SamplingParams(max_new_tokens=10, min_new_tokens=10)
    assert quiet_steps(1, fixed) == 8  # steps sample tokens 1..8; the 9th step samples token 9, the last
    stops = SamplingParams(max_new_tokens=10, min_new_tokens=4, stop_token_ids=(1,))
    assert [quiet_steps(g, stops) for g in (1, 3, 4, 9)] == [3, 1, 0, 0]
    assert quiet_steps(1, SamplingParams(max_new_tokens=10)) == 8  # no stop ids: only the length ends a row


def test_fixed_length_generation_reads_the_device_once(monkeypatch):
    """Steps in which no row can finish run back to back: one host read for a fixed-length call."""
    reads = []
    original = static_decode.StaticDecoder.summary
    monkeypatch.setattr(static_decode.StaticDecoder, "summary", lambda self: reads.append(1) or original(self))
    model = tiny_model("llama")
    out = static_engine(model).generate(PROMPTS, 4, SamplingParams(max_new_tokens=10, min_new_tokens=10, seed=0))
    assert len(reads) == 1 and all(len(c.token_ids) == 10 for c in out)


def test_storage_reused_across_calls_and_sliding_window_refused():
    model = tiny_model("llama")
    rollout = static_engine(model, max_batch=8)
    rollout.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6, seed=0))
    cache, decoder = rollout.cache, rollout.static
    assert (cache.prefix_len, cache.suffix_len) == (16, 16)  # rounded up: 11 -> 16, 6 -> 16
    rollout.generate(PROMPTS[:2], 4, SamplingParams(max_new_tokens=9, seed=0))
    assert rollout.cache is cache and rollout.static is decoder
    windowed = static_engine(tiny_model("mistral", sliding_window=40))
    windowed.generate([[5, 6, 7]], 2, SamplingParams(max_new_tokens=8, seed=0))  # storage 16 + 16 <= 40
    with pytest.raises(NotImplementedError, match="sliding window"):
        windowed.generate(PROMPTS, 2, SamplingParams(max_new_tokens=30, seed=0))  # 16 + 32 > 40
    assert windowed.model.config._attn_implementation != "grpo_rollout"


def test_fingerprint_follows_parameters_and_adapter_switches():
    model = tiny_model("llama", lora=True)
    base = model.get_base_model()
    before = model_fingerprint(base)
    with model.disable_adapter():
        assert model_fingerprint(base) != before
    assert model_fingerprint(base) == before
    with torch.no_grad():
        next(base.parameters()).add_(1.0)  # an optimizer step: same storage, graphs stay valid
    assert model_fingerprint(base) == before
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.clone())  # new storage: graphs must go
    assert model_fingerprint(base) != before


def test_compile_decode_needs_static_decode():
    with pytest.raises(ValueError, match="static_decode"):
        make_rollout("engine", tiny_model("llama"), None, compile_decode=True)


@pytest.mark.parametrize(
    "arch,lora", [("llama", True), ("qwen2", False), ("qwen3", True), ("mistral", False), ("deepseek_v3", False)]
)
def test_step_traces_into_one_graph(arch, lora, monkeypatch):
    """torch.compile(fullgraph=True) raises on any graph break (unsupported Python, data-dependent control
    flow) in the step, the model's forward or the sampling: compile_decode compiles one graph. (Dynamo may
    trace some host reads, e.g. `int(t.max())`, without a break: those are caught by the dispatch trace
    above.) Dynamo's `eager` backend traces without code generation (seconds); greedy output stays hf's."""
    compile_ = torch.compile
    monkeypatch.setattr(
        static_decode.torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "eager", "fullgraph": True})
    )
    model = tiny_model(arch, lora=lora)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, min_new_tokens=2, stop_token_ids=STOPS)
    out = static_engine(model, compile_decode=True).generate(PROMPTS, 2, params)
    assert token_ids(out) == token_ids(make_rollout("hf", model, None).generate(PROMPTS, 2, params))


@pytest.mark.slow
def test_compile_decode_matches_hf():
    """The option as shipped (inductor code generation: ~30-100 s on 2 shared cores)."""
    model = tiny_model("qwen2", lora=True)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, min_new_tokens=2, stop_token_ids=STOPS)
    ref = make_rollout("hf", model, None).generate(PROMPTS, 2, params)
    out = static_engine(model, compile_decode=True).generate(PROMPTS, 2, params)
    assert token_ids(out) == token_ids(ref)
    sampled = static_engine(model, compile_decode=True).generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=0))
    for c in sampled:
        assert torch.allclose(
            torch.tensor(c.logprobs), full_forward_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, 1.0), atol=1e-4
        )
