"""`optim: adamw | adamw_fused` (sft, rm, grpo): the fused kernel is the same AdamW, and every stage takes it."""

import json
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import ROOT
from grpo.config import load_recipe
from grpo.errors import UserError
from grpo.memory import optimizer_step_bytes
from grpo.runtime import build_optimizer
from grpo.sft import run_sft
from grpo.trainer import run_grpo


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_takes_the_same_steps_as_adamw(dtype):
    """Five steps with weight decay (decayed matrices, undecayed biases and norm): the fused kernel's weights
    equal the default kernel's to rounding (fp32 1e-6; bf16 weights one bf16 ulp), and both move."""
    models = {name: _model().to(dtype) for name in ("adamw", "adamw_fused")}
    opts = {name: build_optimizer(m, lr=1e-2, weight_decay=0.1, optim=name) for name, m in models.items()}
    assert [g["fused"] for g in opts["adamw_fused"].param_groups] == [True, True]
    assert [g["fused"] for g in opts["adamw"].param_groups] == [None, None]
    assert [g["weight_decay"] for g in opts["adamw_fused"].param_groups] == [0.1, 0.0]
    start = [p.detach().clone() for p in models["adamw"].parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 6, generator=gen).to(dtype)
        for name, m in models.items():
            opts[name].zero_grad()
            m(x).float().square().mean().backward()
            opts[name].step()
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for a, b, s in zip(models["adamw"].parameters(), models["adamw_fused"].parameters(), start):
        torch.testing.assert_close(a, b, **tol)
        assert not torch.equal(a, s)


def test_an_unknown_optimizer_is_one_line_naming_the_key():
    with pytest.raises(UserError, match=r"grpo\.optim.*adamw_fused"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", ["grpo.optim=adam8bit"])
    for section in ("sft", "rm", "grpo"):
        assert getattr(load_recipe(None, [f"{section}.optim=adamw_fused"]), section).optim == "adamw_fused"


class LiveTemporaries(TorchDispatchMode):
    """The peak bytes of tensors that ops create inside the mode and that are still alive (not views of inputs)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, n = storage.data_ptr(), storage.nbytes()
            if ptr in inputs or ptr in self.held or n == 0:
                continue
            self.held.add(ptr)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self.live -= n
        self.held.discard(ptr)


@pytest.mark.parametrize("optim,foreach", [("adamw", None), ("adamw", True), ("adamw_fused", None)])
def test_memory_budget_counts_the_optimizer_steps_temporaries(optim, foreach):
    """`grpo.memory.optimizer_step_bytes` is what a step allocates, measured op by op: the default kernel on CPU
    (a loop: twice the largest parameter), `foreach` (CUDA's default: a whole parameter group at once, forced here
    on CPU), fused (nothing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 3000), torch.nn.Linear(3000, 10))
    params = list(model.parameters())
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, optim=optim)
    for group in opt.param_groups:
        group["foreach"] = foreach
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the moments exist from here on
    with LiveTemporaries() as seen:
        opt.step()
    on = [
        SimpleNamespace(numel=p.numel, element_size=p.element_size, ndim=p.ndim, device=torch.device("cuda"))
        for p in params
    ]
    expected = optimizer_step_bytes(on if foreach else params, optim)
    assert seen.peak == expected and (expected > 0) == (optim == "adamw")


def _recipe(tmp_path, model, *extra):
    """test_trainer's small GRPO recipe, 3 steps, and a 3-step SFT."""
    from test_trainer import recipe

    return recipe(
        tmp_path,
        model,
        "grpo.steps=3",
        "grpo.lr=3e-2",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "sft.steps=3",
        "sft.batch_size=8",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
        *extra,
    )


def test_grpo_and_sft_run_with_the_fused_optimizer(tmp_path, tiny_model):
    """The same GRPO run with either kernel: step 1 (before any update) is identical, later steps agree to
    rounding; SFT with the fused kernel trains (its loss falls)."""
    steps = {}
    for name in ("adamw", "adamw_fused"):
        run_grpo(_recipe(tmp_path / name, tiny_model, f"grpo.optim={name}"))
        rows = (tmp_path / name / "train" / "metrics.jsonl").read_text().splitlines()
        steps[name] = [json.loads(r) for r in rows]
    a, b = steps["adamw"], steps["adamw_fused"]
    assert len(a) == len(b) == 3
    assert a[0]["loss"] == b[0]["loss"] and a[0]["grad_norm"] == b[0]["grad_norm"]
    for x, y in zip(a, b):
        assert x["sevens"] == pytest.approx(y["sevens"], abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)

    out = run_sft(_recipe(tmp_path / "sft", tiny_model, "sft.optim=adamw_fused"))
    assert (out / "model.safetensors").exists()
    losses = [json.loads(r)["loss"] for r in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]


@pytest.mark.slow
def test_fused_optimizer_under_fsdp2_takes_the_same_steps_as_one_process(tmp_path, tiny_model):
    """FSDP2 shards parameters as DTensors: the fused kernel steps them (gloo, 2 processes) exactly as one
    process steps whole tensors. (ZeRO-2 was checked by hand the same way: DeepSpeed steps flat fp32 tensors.)"""
    import test_distributed as td

    single = td.launch(tmp_path / "single", tiny_model, None, "grpo.optim=adamw_fused")
    fsdp = td.launch(tmp_path / "fsdp", tiny_model, "fsdp.yaml", "grpo.optim=adamw_fused")
    td.assert_same_steps(single.metrics, fsdp.metrics, td.COMPARED, "fsdp2 + adamw_fused")
    assert len(fsdp.metrics) == 3 and fsdp.info["distributed_type"] == "FSDP"
