"""The GRPO loop end to end on tiny models: learning signal, outputs, resume, reward errors."""

import dataclasses
import math
import sys

import pytest
import torch

from conftest import ROOT
from grpo import checkpoint
from grpo.batch import build_batch, loss_mask, token_logprobs
from grpo.config import load_recipe
from grpo.errors import Interrupted, UserError
from grpo.rollout import Completion
from grpo.trainer import run_grpo
from helpers_common import read_jsonl as history

sys.path.insert(0, str(ROOT / "tests"))


def recipe(tmp_path, model, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "tracking.log_every=1",
            "safety.enabled=false",
            "grpo.prompts_per_step=4",
            "grpo.num_generations=8",
            "rollout.max_new_tokens=8",
            *extra,
        ],
    )


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_reward_goes_up_on_a_trivially_learnable_reward(tmp_path, tiny_model, backend):
    r = recipe(
        tmp_path,
        tiny_model,
        "grpo.steps=12",
        "grpo.lr=3e-2",
        f"rollout.backend={backend}",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
    )
    final = run_grpo(r)
    h = history(tmp_path / "train" / "metrics.jsonl")
    assert len(h) == 12
    first = sum(x["sevens"] for x in h[:3]) / 3
    last = sum(x["sevens"] for x in h[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert (final / "model.safetensors").exists()
    assert (tmp_path / "train" / "reward_curves.png").exists()
    for key in ("reward", "clip_frac", "zero_std_frac", "completion_len", "tokens_per_s", "time_rollout", "time_train"):
        assert key in h[-1]


def test_kl_to_reference_is_zero_before_the_first_update(tmp_path, tiny_model):
    r = recipe(
        tmp_path,
        tiny_model,
        "grpo.steps=3",
        "grpo.beta=0.1",
        "grpo.lr=1e-2",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
    )
    run_grpo(r)
    h = history(tmp_path / "train" / "metrics.jsonl")
    assert h[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert h[-1]["kl"] > 0


def test_iterations_clip_against_old_policy_with_dapo(tmp_path, tiny_model):
    r = recipe(
        tmp_path,
        tiny_model,
        "grpo.steps=3",
        "grpo.num_iterations=2",
        "grpo.loss_type=dapo",
        "grpo.micro_batch_size=8",
        "grpo.lr=1e-2",
        "rewards=[{name: 'rewards_for_tests:sevens'}]",
    )
    run_grpo(r)
    h = history(tmp_path / "train" / "metrics.jsonl")
    assert all(0 <= x["clip_frac"] <= 1 for x in h)
    assert any(x["clip_frac"] > 0 for x in h)  # the second pass sees ratios != 1


def test_token_logprobs_match_a_fresh_forward(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    comps = [
        Completion(0, [13, 14], None, "length"),
        Completion(1, [15, 16, 17], None, "stop"),
        Completion(1, [18], None, "stop"),
    ]
    batch = build_batch(prompts, [c.token_ids for c in comps], [c.prompt_index for c in comps], pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature=0.7)
        for i, c in enumerate(comps):
            seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            ref = torch.log_softmax(model(seq).logits[0] / 0.7, -1)
            P = len(prompts[c.prompt_index])
            for j, t in enumerate(c.token_ids):
                assert lp[i, j].item() == pytest.approx(ref[P + j - 1, t].item(), abs=1e-5)
    ok = torch.ones(3, dtype=torch.bool)
    assert loss_mask(comps, ok, mask_truncated=False).tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert loss_mask(comps, ok, mask_truncated=True).tolist() == [[0, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert loss_mask(comps, torch.tensor([True, False, True]), mask_truncated=False)[1].sum() == 0  # skipped sample


@pytest.mark.parametrize(
    "reward, message",
    [
        ("rewards_for_tests:nan_reward", "returned nan for sample 0"),
        ("rewards_for_tests:raises", "raised RuntimeError: boom"),
        ("rewards_for_tests:wrong_length", "returned 1 values for 32 completions"),
    ],
)
def test_bad_reward_stops_the_run_naming_it(tmp_path, tiny_model, reward, message):
    r = recipe(tmp_path, tiny_model, "grpo.steps=2", f"rewards=[{{name: '{reward}'}}]")
    with pytest.raises(UserError, match=message):
        run_grpo(r)


def test_bad_reward_skipped_when_asked(tmp_path, tiny_model):
    r = recipe(
        tmp_path,
        tiny_model,
        "grpo.steps=2",
        "grpo.on_reward_error=skip",
        "rewards=[{name: 'rewards_for_tests:sevens'}, {name: 'rewards_for_tests:nan_reward'}]",
    )
    run_grpo(r)
    h = history(tmp_path / "train" / "metrics.jsonl")
    assert h[0]["skipped_samples"] == 32


CONSTRAINED = [  # the old safety section (quickstart.yaml's constraints: list dropped): one constraint, as before
    "constraints=[]",
    "safety.enabled=true",
    "safety.cost_threshold=-0.5",
    "safety.lambda_init=0.5",
    "safety.lambda_lr=1.0",
    "safety.lambda_max=4.0",
    "safety.lambda_delay=1",
    "safety.cost_std_floor=1.0",
    "grpo.constraint_scheme=separate",  # the library default, as a recipe of the old safety section has it
]
EVEN_AND_COST = (
    "{name: 'rewards_for_tests:even_tokens'}, {name: 'rewards_for_tests:odd_first_token_cost', role: safety}"
)


def test_resume_mid_run_continues_exactly(tmp_path, tiny_model):
    """A run stopped by Ctrl-C mid-run and resumed ends with the same weights, bit for bit, as the run that was
    never stopped: a decaying learning rate, the safety constraint (lambda), LoRA (with dropout: the RNG) and
    the engine backend, beta > 0 (the reference: the adapter disabled). Steps 4-6 after the resume depend on
    the restored optimizer, scheduler, RNG, data position and lambda. Checkpoints: only keep_last are kept."""
    from safetensors.torch import load_file

    common = [
        "grpo.steps=6",
        "grpo.lr=3e-2",
        "grpo.lr_scheduler=linear",
        "grpo.beta=0.1",
        "grpo.save_every=1",
        "grpo.keep_last=2",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "rollout.backend=engine",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "model.lora.dropout=0.1",
        *CONSTRAINED,
    ]
    stopper = "{{name: 'rewards_for_tests:signal_self', weight: 0.0, key: '{}', at_call: {}}}"
    full = recipe(
        tmp_path / "full", tiny_model, *common, f"rewards=[{EVEN_AND_COST}, {stopper.format(tmp_path / 'full', 0)}]"
    )
    run_grpo(full)
    part = recipe(
        tmp_path / "part", tiny_model, *common, f"rewards=[{EVEN_AND_COST}, {stopper.format(tmp_path / 'part', 3)}]"
    )
    with pytest.raises(Interrupted, match="checkpoint saved at .*ckpt-3; continue with grpo.resume=true") as stopped:
        run_grpo(part)  # SIGINT arrives while step 3 is scored: the step ends, ckpt-3 is written, the run stops
    assert stopped.value.code == 130
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "part" / "train")] == [
        "ckpt-2",
        "ckpt-3",
    ]  # keep_last=2
    assert not (tmp_path / "part" / "train" / "final").exists()
    run_grpo(dataclasses.replace(part, grpo=dataclasses.replace(part.grpo, resume=True)))

    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "full" / "train")] == ["ckpt-5", "ckpt-6"]
    a, b = (
        history(tmp_path / "full" / "train" / "metrics.jsonl"),
        history(tmp_path / "part" / "train" / "metrics.jsonl"),
    )
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    lrs = [x["lr"] for x in a]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # the schedule decays
    assert len({x["lambda"] for x in a}) > 2  # lambda moves
    for x, y in zip(a, b):
        for key in (
            "even_tokens",
            "odd_first_token_cost",
            "lambda",
            "cost",
            "loss",
            "kl",
            "grad_norm",
            "lr",
            "clip_frac",
        ):
            assert x[key] == y[key], (x["step"], key)
    w_full = load_file(tmp_path / "full" / "train" / "final" / "adapter_model.safetensors")
    w_part = load_file(tmp_path / "part" / "train" / "final" / "adapter_model.safetensors")
    assert w_full.keys() == w_part.keys() and any("lora_B" in k for k in w_full)
    for name in w_full:
        assert torch.equal(w_full[name], w_part[name]), name


def _advantages_by_hand(rows: list[dict], G: int, lam: float | None, cost_weight: float = 0.0) -> list[float]:
    """The advantage of each sample from its logged reward and cost (DESIGN.md: group normalisation,
    A = (A_r - lam A_c) / (1 + lam) under the constraint, A_r - w_c A_c without it)."""
    out = []
    for g in range(0, len(rows), G):
        r = torch.tensor([x["even_tokens"] for x in rows[g : g + G]], dtype=torch.float64)
        c = torch.tensor([x["odd_first_token_cost"] for x in rows[g : g + G]], dtype=torch.float64)
        a_r = (r - r.mean()) / (r.std() + 1e-4)
        a_c = (c - c.mean()) / (c.std() + 1.0)  # cost_std_floor = 1
        out += ((a_r - lam * a_c) / (1 + lam) if lam is not None else a_r - cost_weight * a_c).tolist()
    return out


@pytest.mark.parametrize(
    "constrain, threshold, measured", [("mean_cost", -0.5, "cost"), ("violation_rate", 0.3, "unsafe_rate")]
)
def test_safety_constraint_end_to_end(tmp_path, tiny_model, constrain, threshold, measured):
    """The Lagrangian on a cost with known values: lambda follows log(lam) += lr * (mean cost - threshold) step by
    step (after lambda_delay, clamped at lambda_max; the measure is the mean cost or the fraction of samples with
    cost > 0), each sample's advantage is (A_r - lam A_c) / (1 + lam) with
    that step's lambda; the pipeline's train_unconstrained baseline logs the cost but trains on A_r alone."""
    from grpo.pipeline import run_stage

    G = 2
    r = recipe(
        tmp_path,
        tiny_model,
        "grpo.steps=5",
        "grpo.prompts_per_step=4",
        f"grpo.num_generations={G}",
        "grpo.lr=1e-2",
        "tracking.samples_every=1",
        f"rewards=[{EVEN_AND_COST}]",
        *CONSTRAINED,
        f"safety.constrain={constrain}",
        f"safety.cost_threshold={threshold}",
    )
    run_stage(r, "train")
    run_stage(r, "train_unconstrained")
    h = history(tmp_path / "train" / "metrics.jsonl")
    lam = [x["lambda"] for x in h]
    assert lam[0] == pytest.approx(0.5) and lam[1] == pytest.approx(
        0.5
    )  # lambda_init; lambda_delay=1: the first update waits
    for t in range(1, len(h) - 1):
        expected = min(lam[t] * math.exp(1.0 * (h[t][measured] - threshold)), 4.0)
        assert lam[t + 1] == pytest.approx(expected, rel=1e-6), t
        assert h[t]["constraint_violation"] == float(h[t][measured] > threshold)
    assert max(lam) > lam[0]  # the measure goes over the threshold: lambda rises
    samples = history(tmp_path / "train" / "samples.jsonl")
    base = history(tmp_path / "train_unconstrained" / "samples.jsonl")
    assert len(samples) == len(base) == 5 * 4 * G  # every sample of every step
    differs = 0
    for step in range(1, 6):
        rows = [x for x in samples if x["step"] == step]
        got = [x["advantage"] for x in rows]
        assert got == pytest.approx(_advantages_by_hand(rows, G, lam[step - 1]), abs=1e-3), step
        rows0 = [x for x in base if x["step"] == step]
        got0 = [x["advantage"] for x in rows0]
        assert got0 == pytest.approx(_advantages_by_hand(rows0, G, None), abs=1e-3), step
        same_samples = [x["completion"] for x in rows0] == [x["completion"] for x in rows]
        differs += same_samples and got0 != pytest.approx(got, abs=1e-3)
    assert differs >= 1  # step 1 samples the same completions in both stages: there the cost changes the advantages
    h0 = history(tmp_path / "train_unconstrained" / "metrics.jsonl")
    assert "lambda" not in h0[0] and all("cost" in x for x in h0)


def test_constrained_advantage_matches_the_formula():
    from grpo.advantages import reward_and_cost_advantages
    from grpo.multipliers import LagrangeMultiplier

    # two groups of 2: group 1 complies (cost +3) vs refuses (cost -3); group 2 both safe
    R = torch.tensor([[4.0, 3.0], [-4.0, -3.0], [1.0, -4.0], [0.0, -4.0]])
    adv, m = reward_and_cost_advantages(R, [1.0, 0.0], [False, True], 2, cost_std_floor=1.0, lam=2.0)
    # hand-computed: A_useful = +-1/sqrt(2)*... group std of (4,-4) = 5.657 -> +-0.70709; of (1,0) = 0.7071 -> +-0.70700
    a_u = torch.tensor(
        [4 / (5.656854 + 1e-4), -4 / (5.656854 + 1e-4), 0.5 / (0.707107 + 1e-4), -0.5 / (0.707107 + 1e-4)]
    )
    a_c = torch.tensor([3 / (4.242641 + 1.0), -3 / (4.242641 + 1.0), 0.0, 0.0])  # std of (3,-3) = 4.2426, floor 1
    torch.testing.assert_close(adv, (a_u - 2.0 * a_c) / 3.0, atol=1e-4, rtol=1e-4)
    assert m["unsafe_rate"] == 0.25 and m["cost"] == pytest.approx(-2.0)
    # unconstrained: A_useful - w_cost * A_cost (weight 0.5 here)
    adv0, _ = reward_and_cost_advantages(R, [1.0, 0.5], [False, True], 2, cost_std_floor=1.0, lam=None)
    torch.testing.assert_close(adv0, a_u - 0.5 * a_c, atol=1e-4, rtol=1e-4)
    lam = LagrangeMultiplier.from_lambda(2.0, lr=0.5, threshold=0.1, lam_max=10.0)
    lam.update(m["unsafe_rate"])
    assert lam.lam == pytest.approx(2.0 * math.exp(0.5 * (0.25 - 0.1)))  # violation above threshold: lambda goes up


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batch_split_does_not_change_the_step(tmp_path, tiny_model, loss_type):
    """Each loss's normaliser is exact for any split (grpo.losses): 32 completions in one micro-batch or in
    uneven ones of 5 (6 x 5 + 2) give the same gradient and the same updated weights."""
    from safetensors.torch import load_file

    out = {}
    for size in (32, 5):
        run_grpo(
            recipe(
                tmp_path / str(size),
                tiny_model,
                "grpo.steps=1",
                f"grpo.loss_type={loss_type}",
                "grpo.lr=1e-2",
                f"grpo.micro_batch_size={size}",
                "grpo.max_grad_norm=0",
                "rewards=[{name: 'rewards_for_tests:sevens'}]",
            )
        )
        out[size] = (
            history(tmp_path / str(size) / "train" / "metrics.jsonl")[0],
            load_file(tmp_path / str(size) / "train" / "final" / "model.safetensors"),
        )
    (one, w_one), (split, w_split) = out[32], out[5]
    assert one["sevens"] == split["sevens"]  # the same samples
    assert one["grad_norm"] == pytest.approx(split["grad_norm"], rel=1e-5) and one["grad_norm"] > 0
    for name in w_one:
        torch.testing.assert_close(
            w_one[name], w_split[name], atol=2e-5, rtol=0
        )  # an Adam step moves weights by ~lr = 1e-2
