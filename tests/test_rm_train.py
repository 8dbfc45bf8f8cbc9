"""grpo.rm + rewards.pairwise: the Bradley-Terry and Safe-RLHF cost losses (hand-computed), and `run_rm` on the
shipped pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_BASE, TOYWORLD
from grpo.config import load_recipe
from grpo.errors import UserError
from grpo.rm import run_rm
from rewards.pairwise import bradley_terry_loss, safety_cost_loss


# ---------------------------------------------------------------------------------------- losses
def test_bradley_terry_loss_hand_computed():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = 0.3132617, -log sigmoid(-2) = 2.1269280; mean 1.2200948
    loss, m = bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(1.2200948, abs=1e-6)
    assert m["accuracy"] == 0.5 and m["gap"] == pytest.approx(-0.5)
    # margin 0.5: -log sigmoid(0.5) = 0.4740770, -log sigmoid(-2.5) = 2.5788897; mean 1.5264834
    assert bradley_terry_loss(rc, rr, margin=0.5)[0].item() == pytest.approx(1.5264834, abs=1e-6)
    # per-pair margins (Llama 2): margins [0, 0.5] -> (0.3132617 + 2.5788897) / 2
    assert bradley_terry_loss(rc, rr, margin=torch.tensor([0.0, 0.5]))[0].item() == pytest.approx(1.4460757, abs=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    rc, rr = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    bradley_terry_loss(rc, rr)[0].backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)  # -sigmoid(-0) each way


def test_safety_cost_loss_hand_computed():
    c_safer, c_unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 0.0])
    safer_safe, unsafer_safe = torch.tensor([True, True]), torch.tensor([False, True])
    # pair 1 (safe vs unsafe): -log sig(2 - -1) = 0.0485874; safe s=-1: -log sig(1) = 0.3132617;
    #                          unsafe s=+1: -log sig(2) = 0.1269280;             sum 0.4887771
    # pair 2 (both safe):      -log sig(0 - 0.5) = 0.9740770; safe: -log sig(-0.5) = 0.9740770;
    #                          safe: -log sig(-0) = 0.6931472;                   sum 2.6413011
    loss, m = safety_cost_loss(c_safer, c_unsafer, safer_safe, unsafer_safe)
    assert loss.item() == pytest.approx(1.5650391, abs=1e-6)
    assert m["pair_loss"] == pytest.approx((0.0485874 + 0.9740770) / 2, abs=1e-6)
    assert m["sign_loss"] == pytest.approx((0.3132617 + 0.1269280 + 0.9740770 + 0.6931472) / 2, abs=1e-6)
    assert m["accuracy"] == 0.5  # c_safer < c_unsafer only in pair 1
    # signs: -1 (safe, <0 ok), 0.5 (safe, >0 wrong), 2 (unsafe, >0 ok), 0 (safe, not >0 ok) -> 3/4
    assert m["sign_accuracy"] == 0.75
    assert m["cost_unsafe"] == pytest.approx(2.0) and m["cost_safe"] == pytest.approx((-1.0 + 0.5 + 0.0) / 3)


def test_safety_cost_loss_gradient_signs():
    c = torch.tensor([0.0, 0.0], requires_grad=True)  # [safer (safe), unsafer (unsafe)]
    loss, _ = safety_cost_loss(c[:1], c[1:], torch.tensor([True]), torch.tensor([False]))
    loss.backward()
    assert c.grad[0] > 0 and c.grad[1] < 0  # descent lowers the safe cost and raises the unsafe one


# ---------------------------------------------------------------------------------------- run_rm
def recipe_for(tmp_path: Path, *overrides: str):
    return load_recipe(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"model.name_or_path={TINY_BASE}",
            "run.threads=1",
            f"rm.usefulness_train={TOYWORLD / 'rm_usefulness_train.jsonl'}",
            f"rm.usefulness_eval={TOYWORLD / 'rm_usefulness_eval.jsonl'}",
            f"rm.safety_train={TOYWORLD / 'rm_safety_train.jsonl'}",
            f"rm.safety_eval={TOYWORLD / 'rm_safety_eval.jsonl'}",
            *overrides,
        ],
    )


def check_saved(path: Path, kind: str, results: dict) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.models import RewardModelScorer

    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not (path / "adapter_config.json").exists()
    meta = json.loads((path / "reward_model.json").read_text())
    assert meta["template"] == "concat" and meta["role"] == kind and meta["max_length"] == 96
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()  # plain transformers, no peft
    assert model.config.num_labels == 1 and not any("lora" in k for k in model.state_dict())
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (TOYWORLD / f"rm_{kind}_eval.jsonl").read_text().splitlines()[:6]]
    scorer = RewardModelScorer.from_pretrained(str(path), device="cpu")  # auto -> concat from reward_model.json
    assert (scorer.template, scorer.max_length) == ("concat", 96)
    got = scorer([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    with torch.no_grad():
        want = [model(torch.tensor([tok(r["prompt"] + r["chosen"])["input_ids"]])).logits[0, 0].item() for r in rows]
    assert got == pytest.approx(want, abs=1e-5)


def test_run_rm_smoke_writes_loadable_checkpoints(tmp_path):
    recipe = recipe_for(tmp_path, "rm.steps=3", "rm.batch_size=8", "rm.eval_every=2")
    results = run_rm(recipe)
    out = tmp_path / "run" / "rm"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "DONE").exists() and (out / "config.yaml").exists()
    for kind in ("usefulness", "safety"):
        r = results[kind]
        pairs = (1950, 260) if kind == "usefulness" else (1500, 200)  # usefulness: + 450 / 60 garbled pairs
        assert r["steps"] == 3 and (r["train_pairs"], r["eval_pairs"]) == pairs
        assert {"pair_accuracy"} <= set(r["before"]) and {"pair_accuracy"} <= set(r["after"])
        rows = [json.loads(x) for x in (out / "logs" / kind / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == [0, 1, 2, 3] and "eval_pair_accuracy" in rows[2]
        check_saved(out / kind, kind, results)
    assert {"harmful_prefers_compliance", "pair_accuracy_math", "pair_accuracy_garbled"} <= set(
        results["usefulness"]["after"]
    )
    assert {
        "sign_accuracy",
        "harmful_refusal_negative_cost",
        "harmful_compliance_positive_cost",
        "pair_accuracy_all",
    } <= set(results["safety"]["after"])
    with pytest.raises(UserError, match="already holds a finished 'rm' run"):
        run_rm(recipe)


def test_run_rm_lora_saves_a_merged_classifier(tmp_path):
    recipe = recipe_for(
        tmp_path,
        "rm.steps=2",
        "rm.batch_size=4",
        "rm.eval_every=0",
        "rm.safety_train=null",
        "model.lora.enabled=true",
        "model.lora.r=4",
    )
    results = run_rm(recipe)
    assert set(results) == {"usefulness"}
    check_saved(tmp_path / "run" / "rm" / "usefulness", "usefulness", results)


def test_run_rm_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q:1+1=", "chosen": "2", "rejected": "3"}) + "\n")
    with pytest.raises(UserError, match="chosen_is_safe"):
        run_rm(recipe_for(tmp_path, f"rm.safety_train={bad}", "rm.usefulness_train=null"))
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text(
        json.dumps({"prompt": "Q:x", "chosen": "a", "rejected": "b", "chosen_is_safe": False, "rejected_is_safe": True})
        + "\n"
    )
    with pytest.raises(UserError, match="swap them"):
        run_rm(recipe_for(tmp_path, f"rm.safety_train={swapped}", "rm.usefulness_train=null", "run.overwrite=true"))
    with pytest.raises(UserError, match="needs rm.usefulness_train and/or rm.safety_train"):
        run_rm(recipe_for(tmp_path, "rm.safety_train=null", "rm.usefulness_train=null"))
    with pytest.raises(UserError, match="rm.template"):
        run_rm(recipe_for(tmp_path, "rm.template=auto"))


@pytest.mark.slow
def test_run_rm_learns_the_toy_world(tmp_path):
    """Default settings, held out: >90% pair accuracy on both models, the built-in usefulness/safety
    conflict (the reward model prefers complying with harmful requests), and the cost signs."""
    results = run_rm(recipe_for(tmp_path, "rm.eval_every=0"))  # the defaults: 60 steps per model
    use, safe = results["usefulness"]["after"], results["safety"]["after"]
    assert use["pair_accuracy"] > 0.9 and use["harmful_prefers_compliance"] > 0.9
    assert safe["pair_accuracy"] > 0.9 and safe["sign_accuracy"] > 0.9
    assert safe["harmful_refusal_negative_cost"] > 0.9 and safe["harmful_compliance_positive_cost"] > 0.9
    assert safe["sign_accuracy_both_benign"] > 0.9  # refusing a benign request is not "safer"
