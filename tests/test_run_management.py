"""Run management (issue 18): eval during training, the best checkpoint, applicable eval metrics."""

import json
import sys

import pytest
import torch

import grpo.trainer
from conftest import ROOT, TOYWORLD
from grpo.config import load_recipe
from grpo.trainer import run_grpo
from helpers_common import read_jsonl

sys.path.insert(0, str(ROOT / "tests"))


def recipe(tmp_path, model, *extra):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={model}",
            "run.threads=1",
            "safety.enabled=false",
            "grpo.prompts_per_step=4",
            "grpo.num_generations=4",
            "rollout.max_new_tokens=8",
            "grpo.lr=1e-2",
            "eval.limit=12",
            "rewards=[{name: accuracy}, {name: format, weight: 0.1}]",
            *extra,
        ],
    )


def history(path):
    return read_jsonl(path / "train" / "metrics.jsonl")


def test_eval_during_training_at_the_right_steps_and_without_changing_the_run(tmp_path, tiny_model):
    run_grpo(recipe(tmp_path / "eval", tiny_model, "grpo.steps=4", "grpo.eval_every=2", "grpo.eval_before_train=true"))
    run_grpo(recipe(tmp_path / "plain", tiny_model, "grpo.steps=4"))
    h, plain = history(tmp_path / "eval"), history(tmp_path / "plain")
    assert [r["step"] for r in h if "eval/accuracy" in r] == [0, 2, 4]
    assert all(0 <= r["eval/accuracy"] <= 1 and "eval/reward/format" in r for r in h if "eval/accuracy" in r)
    assert (tmp_path / "eval" / "train" / "eval_curves.png").exists()
    for a, b in zip([r for r in h if r["step"] > 0], plain):  # greedy eval draws no random numbers: the same training
        assert {k: v for k, v in a.items() if not k.startswith(("eval/", "time", "tokens_per_s"))} == {
            k: v for k, v in b.items() if not k.startswith(("time", "tokens_per_s"))
        }


def test_best_checkpoint_is_the_best_eval_not_the_last(tmp_path, tiny_model, monkeypatch):
    from safetensors.torch import load_file

    scores = iter([0.2, 0.7, 0.4])  # the eval curve: best at step 2, then worse
    monkeypatch.setattr(grpo.trainer, "evaluate_live", lambda s: {"eval/accuracy": next(scores)})
    run_grpo(
        recipe(
            tmp_path,
            tiny_model,
            "grpo.steps=3",
            "grpo.eval_every=1",
            "grpo.keep_best=eval/accuracy",
            "grpo.final_from=best",
            "grpo.save_every=1",
            "grpo.keep_last=3",
            "rewards=[{name: 'rewards_for_tests:sevens'}]",
        )
    )  # a reward that varies: every step moves the weights
    out = tmp_path / "train"
    assert json.loads((out / "best.json").read_text()) == {"step": 2, "metric": "eval/accuracy", "value": 0.7}
    weights = {name: load_file(out / name / "model.safetensors") for name in ("best", "final", "ckpt-2", "ckpt-3")}
    for key in weights["best"]:
        torch.testing.assert_close(weights["best"][key], weights["ckpt-2"][key], atol=0, rtol=0)
        torch.testing.assert_close(weights["final"][key], weights["best"][key], atol=0, rtol=0)
    assert any(
        not torch.equal(weights["ckpt-3"][k], weights["best"][k]) for k in weights["best"]
    )  # the last one differs


def test_eval_reports_accuracy_only_with_an_accuracy_reward_and_per_source(tmp_path, base_model):
    from grpo.evaluate import run_eval

    rows = [json.loads(line) for line in (TOYWORLD / "eval.jsonl").read_text().splitlines()][:12]
    for i, row in enumerate(rows):
        row["source"] = "even" if i % 2 == 0 else "odd"
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"data.eval={data}", f"model.name_or_path={base_model}", "run.threads=1", "safety.enabled=false"]
    with_acc = run_eval(
        load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            [*common, f"run.output_dir={tmp_path / 'a'}", "rewards=[{name: accuracy}]"],
        )
    )["results"]["base"]
    without = run_eval(
        load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            [*common, f"run.output_dir={tmp_path / 'b'}", "rewards=[{name: format}]"],
        )
    )["results"]["base"]
    assert "accuracy" in with_acc and {"accuracy/even", "accuracy/odd", "reward/accuracy/even"} <= set(with_acc)
    assert with_acc["accuracy"] == pytest.approx((with_acc["accuracy/even"] + with_acc["accuracy/odd"]) / 2)
    assert not any(k.startswith("accuracy") for k in without) and "reward/format/odd" in without


@pytest.mark.parametrize(
    "bad, message",
    [
        (["grpo.keep_best=eval/accuracy", "grpo.eval_every=0"], "set grpo.eval_every"),
        (["grpo.final_from=best"], "needs grpo.keep_best"),
        (["grpo.eval_every=2", "data.eval=null"], "need data.eval"),
    ],
)
def test_run_management_settings_are_checked(tmp_path, tiny_model, bad, message):
    from grpo.errors import UserError

    with pytest.raises(UserError, match=message):
        run_grpo(recipe(tmp_path, tiny_model, "grpo.steps=1", *bad))


def test_replay_reproduces_the_dumped_run(tmp_path, tiny_model):
    common = ["grpo.steps=3", "rewards=[{name: 'rewards_for_tests:sevens'}]"]
    run_grpo(recipe(tmp_path / "orig", tiny_model, *common, f"rollout.dump_dir={tmp_path / 'dump'}"))
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == [f"step_00000{i}.rank0.json.gz" for i in (1, 2, 3)]
    run_grpo(recipe(tmp_path / "replay", tiny_model, *common, f"rollout.replay_dir={tmp_path / 'dump'}"))
    for a, b in zip(history(tmp_path / "orig"), history(tmp_path / "replay")):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["sevens"] == b["sevens"]
    with pytest.raises(Exception, match="replay: .*step_000004.rank0.json.gz does not exist"):
        run_grpo(
            recipe(
                tmp_path / "short",
                tiny_model,
                "grpo.steps=4",
                "rewards=[{name: 'rewards_for_tests:sevens'}]",
                f"rollout.replay_dir={tmp_path / 'dump'}",
            )
        )


def test_rollout_command_generates_and_scores_without_touching_weights(tmp_path, tiny_model):
    import gzip
    import subprocess

    from safetensors.torch import load_file

    before = load_file(tiny_model / "model.safetensors")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpo",
            "rollout",
            str(ROOT / "recipes" / "quickstart.yaml"),
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={tiny_model}",
            "run.threads=1",
            "safety.enabled=false",
            "grpo.steps=2",
            "grpo.prompts_per_step=2",
            "grpo.num_generations=4",
            "rollout.max_new_tokens=6",
            "rewards=[{name: accuracy}, {name: format}]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dumped = sorted((tmp_path / "rollout" / "rollouts").iterdir())
    assert [p.name for p in dumped] == ["step_000001.rank0.json.gz", "step_000002.rank0.json.gz"]
    doc = json.loads(gzip.open(dumped[0], "rt").read())
    assert len(doc["rows"]) == 2 and len(doc["completions"]) == 8 and len(doc["advantages"]) == 8
    assert all(len(c["token_ids"]) == len(c["logprobs"]) for c in doc["completions"])
    logged = [json.loads(line) for line in (tmp_path / "rollout" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and all("format" in r and "zero_std_frac" in r for r in logged)
    after = load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "rollout" / "final").exists() and not list((tmp_path / "rollout").glob("ckpt-*"))


@pytest.mark.slow
def test_doctor_reports_the_setup_and_names_a_broken_recipe(tmp_path):
    import subprocess

    def doctor(*args):
        return subprocess.run([sys.executable, "-m", "grpo", "doctor", *args], cwd=ROOT, capture_output=True, text=True)

    ok = doctor(str(ROOT / "recipes" / "quickstart.yaml"), f"run.output_dir={tmp_path}", "--num-processes", "2")
    assert ok.returncode == 0, ok.stderr[-1500:]
    for needle in (
        "torch 2.",
        "transformers ",
        "batch on 2 process(es): 8 prompts x G=8 = 64 completions",
        "32 per process",
        "memory per process (estimate): policy 1.1 MiB",
        "doctor: no problems found",
    ):
        assert needle in ok.stdout, needle
    bad = doctor(
        str(ROOT / "recipes" / "quickstart.yaml"), f"run.output_dir={tmp_path}", "data.train=/nonexistent/prompts.jsonl"
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "problem: [train] data.train '/nonexistent/prompts.jsonl' does not exist" in bad.stdout
    assert "error: grpo doctor found" in bad.stderr
