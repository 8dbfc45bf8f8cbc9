"""grpo.batch and the GRPO step's data path: token-budget micro-batches, rollout/training mismatch and TIS."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT
from grpo.batch import Rollouts, split_rows, split_to_count
from grpo.config import load_recipe
from grpo.losses import policy_loss, rollout_correction
from grpo.rollout import Completion
from grpo.trainer import run_grpo


def rollouts_of(prompt_lens, comp_lens, G):
    rows = [{"prompt_ids": [3] * p} for p in prompt_lens]
    comps = [Completion(j // G, [5] * n, None, "stop") for j, n in enumerate(comp_lens)]
    return Rollouts(
        rows, comps, [""] * len(comps), torch.zeros(len(comps), 0), torch.ones(len(comps), dtype=torch.bool)
    )


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_token_budget_split_covers_every_row_once_and_respects_the_budget(data):
    G = data.draw(st.integers(1, 4))
    n_prompts = data.draw(st.integers(1, 5))
    prompt_lens = data.draw(st.lists(st.integers(1, 12), min_size=n_prompts, max_size=n_prompts))
    comp_lens = data.draw(st.lists(st.integers(0, 20), min_size=n_prompts * G, max_size=n_prompts * G))
    budget = data.draw(st.integers(1, 80))
    r = rollouts_of(prompt_lens, comp_lens, G)
    splits = split_rows(r, size=4, token_budget=budget)
    assert sorted(i for rows in splits for i in rows) == list(range(n_prompts * G))
    for rows in splits:
        groups = {r.completions[i].prompt_index for i in rows}
        tokens = sum(prompt_lens[g] for g in groups) + sum(comp_lens[i] for i in rows)
        # over the budget only when one row alone (with its prompt) is
        assert tokens <= budget or len(rows) == 1, (rows, tokens, budget)
    for count in range(len(splits), n_prompts * G + 1):
        cut = split_to_count(splits, count)
        assert len(cut) == count and sorted(i for rows in cut for i in rows) == list(range(n_prompts * G))


def test_token_budget_packs_whole_groups_longest_first():
    # groups (prompt + completions): 4+2*10=24, 2+2*1=4, 3+2*6=15; budget 30 -> [24 + 4], [15]
    r = rollouts_of([4, 2, 3], [10, 10, 1, 1, 6, 6], G=2)
    assert split_rows(r, size=2, token_budget=30) == [[0, 1, 2, 3], [4, 5]]
    assert split_rows(r, size=2) == [[0, 1], [2, 3], [4, 5]]
    # budget 14: groups 0 (24) and 2 (15) are cut by rows into 14, 14, 9, 9; group 1 (4) joins the first with room
    assert split_rows(r, size=2, token_budget=14) == [[0], [1], [2, 3, 4], [5]]


def test_rollout_correction_by_hand():
    train = torch.tensor([[-1.0, -2.0, -0.5]])
    sampled = torch.tensor([[-1.0, -2.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    none, m = rollout_correction(train, sampled, mask)
    d = torch.tensor([0.0, 0.5])  # train - rollout on the scored tokens
    assert none is None and m["mismatch_kl"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-6)
    w, m = rollout_correction(train, sampled, mask, mode="tis", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5, 0.0]]))  # exp(0.5) = 1.65 capped at 1.5; masked -> 0
    assert m["is_capped_frac"] == 0.5 and m["is_weight_mean"] == pytest.approx(1.25)
    same, m0 = rollout_correction(train, train, mask, mode="tis")
    assert m0["mismatch_kl"] == 0.0 and torch.equal(same, mask)


def test_is_weights_scale_each_tokens_surrogate():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, mask = torch.tensor([2.0]), torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = policy_loss(logp, None, adv, mask, loss_type="bnpo", is_weights=w)
    loss.backward()
    # on-policy: ratio 1, d loss / d logp_t = -A * w_t / T
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -2.0]]))
    assert loss.item() == pytest.approx(-(2.0 * 0.5 + 2.0 * 2.0) / 2)


def recipe(tmp_path, model, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "safety.enabled=false",
            "grpo.steps=1",
            "grpo.prompts_per_step=4",
            "grpo.num_generations=8",
            "rollout.max_new_tokens=8",
            "grpo.lr=1e-2",
            "grpo.max_grad_norm=0",
            "rewards=[{name: 'rewards_for_tests:sevens'}]",
            *extra,
        ],
    )


def first_step(path):
    return json.loads((path / "train" / "metrics.jsonl").read_text().splitlines()[0])


def test_token_budget_micro_batches_give_the_same_step(tmp_path, tiny_model):
    from safetensors.torch import load_file

    run_grpo(recipe(tmp_path / "rows", tiny_model, "grpo.micro_batch_size=32"))
    run_grpo(recipe(tmp_path / "tokens", tiny_model, "grpo.micro_batch_tokens=40"))  # several uneven micro-batches
    a, b = first_step(tmp_path / "rows"), first_step(tmp_path / "tokens")
    assert (
        a["sevens"] == b["sevens"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0
    )
    wa, wb = (load_file(p / "train" / "final" / "model.safetensors") for p in (tmp_path / "rows", tmp_path / "tokens"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_mismatch_kl_is_zero_in_fp32_and_positive_in_bf16(tmp_path, tiny_model, backend):
    """The sampler's and the trainer's log-probs of the same tokens agree in fp32; in bf16 they differ
    (other kernels, other shapes), and TIS weights are applied (a cap under 1 makes them visible)."""
    run_grpo(recipe(tmp_path / "fp32", tiny_model, f"rollout.backend={backend}"))
    assert abs(first_step(tmp_path / "fp32")["mismatch_kl"]) < 1e-9  # seen: 0.0
    common = [f"rollout.backend={backend}", "model.dtype=bfloat16"]
    run_grpo(recipe(tmp_path / "bf16", tiny_model, *common))
    run_grpo(recipe(tmp_path / "tis", tiny_model, *common, "grpo.rollout_is=tis", "grpo.rollout_is_cap=0.999"))
    bf16, tis = first_step(tmp_path / "bf16"), first_step(tmp_path / "tis")
    assert bf16["mismatch_kl"] > 1e-9 and "is_weight_mean" not in bf16  # seen: ~8e-8
    assert tis["mismatch_kl"] == bf16["mismatch_kl"]  # the same samples
    assert tis["is_capped_frac"] > 0.3 and tis["is_weight_mean"] <= 0.999
    assert tis["grad_norm"] == pytest.approx(
        bf16["grad_norm"] * tis["is_weight_mean"], rel=0.05
    )  # weights scale the surrogate


def test_fp32_output_layer_keeps_the_tied_weight_and_computes_in_fp32(tiny_model, tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from grpo.modeling import fp32_output_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = model.model(input_ids=ids).last_hidden_state
    fp32_output_layer(model)
    head = model.get_output_embeddings()
    assert (
        head.weight is model.get_input_embeddings().weight and head.weight.dtype == torch.bfloat16
    )  # still tied, still bf16
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden.float(), head.weight.float()), atol=1e-5, rtol=0)
    assert (logits - F.linear(hidden, head.weight).float()).abs().max() > 0  # the bf16 head rounds; this one does not
    run_grpo(
        recipe(tmp_path, tiny_model, "model.dtype=bfloat16", "model.fp32_lm_head=true")
    )  # sampler and trainer run with it
    assert math.isfinite(first_step(tmp_path)["mismatch_kl"])


def test_memory_budget_matches_what_the_run_allocates(tiny_model):
    """Parameters, gradients, Adam moments and the engine's KV storage as counted before step 1 equal what exists
    after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo.generation import make_backend, sampling_params
    from grpo.memory import format_budget, memory_budget

    r = recipe("/tmp/unused", tiny_model, "rollout.max_batch=16", "data.max_prompt_length=10")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    budget = memory_budget(model, None, r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    opt.step()
    assert budget["policy"] == sum(p.numel() * 4 for p in model.parameters())
    assert budget["gradients"] == sum(p.grad.numel() * 4 for p in model.parameters())
    assert budget["optimizer"] == sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if t.dim()
    )
    assert budget["reference"] == 0 and budget["activations"] > 0
    engine = make_backend(r.rollout, model.eval(), AutoTokenizer.from_pretrained(tiny_model))
    engine.generate([[5] * 10, [6] * 10], r.grpo.num_generations, sampling_params(r.rollout, 2, seed=0))
    kv = engine.cache
    held = sum(
        t.numel() * t.element_size() for ts in (kv.prefix_k, kv.prefix_v, kv.suffix_k, kv.suffix_v) for t in ts.values()
    )
    assert budget["rollout_kv"] == held
    assert "rollout_kv" in format_budget(budget, torch.device("cpu"))
