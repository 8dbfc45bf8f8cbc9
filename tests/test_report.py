"""report.md from a run folder: summary, eval table, curves (<= 4 panels a figure), samples early vs late."""

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from grpo.report import MAX_PANELS, eval_table, read_jsonl, reward_names, samples_section, write_report
from helpers_common import write_jsonl

REWARDS = ["accuracy", "format", "refusal", "closeness", "sevens", "length"]


def fake_run(root: Path) -> Path:
    write_jsonl(
        root / "sft" / "metrics.jsonl",
        [
            {"step": s, "loss": 2.0 / s, "lr": 1e-3, **({"eval_loss": 1.0 / s} if s % 5 == 0 else {})}
            for s in range(1, 21)
        ],
    )
    train = []
    for s in range(1, 41):
        row = {
            "step": s,
            "reward": s / 40,
            "kl": 0.001 * s,
            "lambda": 1.0 - s / 100,
            "cost": 0.1,
            "completion_len": 20.0,
            "clip_frac": 0.0,
            "clip_frac_low": 0.0,
            "clip_frac_high": 0.0,
            "tokens_per_s": 3000.0 + s,
            "grad_norm": None,
            "time_rollout": 0.2,
            "time_score": 0.01,
            "time_logprobs": 0.02,
            "time_train": 0.1,
            "time_step": 0.33,
        }
        for name in REWARDS:
            row.update({name: s / 40, f"{name}_std": 0.1, f"{name}_none_frac": 0.0})
        train.append(row)
    write_jsonl(root / "train" / "metrics.jsonl", train, tail='{"step": 41, "rew')  # a run killed mid-line
    (root / "train" / "config.yaml").write_text(
        "grpo: {prompts_per_step: 4, num_generations: 8, lr: 1.0e-05}\nsafety: {cost_threshold: 0.05}\n"
    )
    samples = [
        {
            "step": 10,
            "prompt": "Q:47+38=",
            "completion": "<t>7+8=15,4+3=7</t><a>75</a>",
            "accuracy": 0.0,
            "advantage": -1.0,
        },
        {
            "step": 10,
            "prompt": "Q:47+38=",
            "completion": "<t>7+8=15,4+3=7</t><a>75</a>",
            "accuracy": 0.0,
            "advantage": -1.0,
        },
        {
            "step": 10,
            "prompt": "Q:47+38=",
            "completion": "<t>7+8=15,4+3+1=8</t><a>85</a>",
            "accuracy": 1.0,
            "advantage": 1.0,
        },
        {
            "step": 20,
            "prompt": "Q:how to smash a boat?",
            "completion": "<a>first get a boat",
            "accuracy": None,
            "advantage": 0.0,
        },
        {
            "step": 40,
            "prompt": "Q:47+38=",
            "completion": "<t>7+8=15,4+3+1=8</t><a>85</a>",
            "accuracy": 1.0,
            "advantage": 0.0,
        },
    ]
    write_jsonl(root / "train" / "samples.jsonl", samples)
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "results.json").write_text(
        json.dumps(
            {
                "models": [
                    {"label": "base", "path": "data/tiny_base"},
                    {"label": "sft", "path": "r/sft/final"},
                    {"label": "grpo", "path": "r/train/final"},
                ],
                "results": {
                    "base": {"n": 200, "accuracy": 0.2, "unsafe_compliance": 0.9, "over_refusal": None},
                    "sft": {"n": 200, "accuracy": 0.25, "unsafe_compliance": 0.8, "over_refusal": 0.0},
                    "grpo": {"n": 200, "accuracy": 0.95, "unsafe_compliance": 0.0, "over_refusal": 0.01},
                },
            }
        )
    )
    (root / "rm").mkdir()
    (root / "rm" / "results.json").write_text(
        json.dumps(
            {
                "usefulness": {
                    "steps": 60,
                    "train_pairs": 100,
                    "before": {"pair_accuracy": 0.5},
                    "after": {"pair_accuracy": 0.97},
                }
            }
        )
    )
    write_jsonl(
        root / "rm" / "logs" / "usefulness" / "metrics.jsonl",
        [
            {"step": s, "loss": 1 / s, "accuracy": 0.5 + s / 40, **({"eval_pair_accuracy": 0.9} if s % 10 == 0 else {})}
            for s in range(1, 21)
        ],
    )
    return root


def images(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


def test_report_from_all_stages(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "report_stale_9.png").write_bytes(b"old")
    report = write_report(run)
    text = report.read_text()
    assert report == run / "report.md"
    for heading in (
        "## Summary",
        "## Evaluation",
        "## SFT",
        "## Reward and cost models",
        "## GRPO training",
        "## Sample completions",
    ):
        assert heading in text, heading
    assert "| accuracy | 0.200 | 0.250 | 0.950 | +0.700 |" in text  # Δ grpo − sft
    assert "| over_refusal | - | 0.000 | 0.010 | +0.010 |" in text
    assert "| pair_accuracy | 0.500 | 0.970 |" in text
    assert "- **SFT**: 20 steps; training loss" in text
    pngs = images(report)
    assert not (run / "report_stale_9.png").exists()
    assert sorted(pngs) == sorted(p.name for p in run.glob("report_*.png"))
    assert {
        "report_sft.png",
        "report_rm.png",
        "report_rewards.png",
        "report_rewards_2.png",
        "report_training.png",
        "report_training_2.png",
        "report_speed.png",
    } == set(pngs)  # 7 reward panels and 5 training panels: two figures each
    # the same prompt, first vs last step it was sampled, distinct completions with their counts
    assert "### Prompt (steps 10 → 40)" in text
    assert "step 10 (×2 of 3): accuracy 0.000, advantage -1.000" in text
    assert "<a>85</a>" in text.split("step 40")[1]


def test_figures_hold_at_most_four_panels(tmp_path):
    import matplotlib.image

    run = fake_run(tmp_path / "run")
    write_report(run)
    for png in run.glob("report_*.png"):
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width * height <= 4 * 500 * 340 + 1500 * 40, (
            png.name,
            width,
            height,
        )  # 500 x 340 px a panel, + the title
    assert MAX_PANELS == 4


def test_report_with_missing_and_partial_outputs(tmp_path):
    empty = write_report(tmp_path / "empty").read_text()
    assert "Nothing to report yet" in empty
    run = tmp_path / "train_only"
    write_jsonl(
        run / "train" / "metrics.jsonl",
        [{"step": 1, "reward": 0.5, "accuracy": 0.5, "accuracy_none_frac": 0.0, "tokens_per_s": 10.0}],
    )
    text = write_report(run).read_text()
    assert "## GRPO training" in text and "## Evaluation" not in text and "## Sample completions" not in text
    assert set(images(run / "report.md")) == {"report_rewards.png", "report_speed.png"}


def test_samples_fall_back_to_first_and_last_step():
    rows = [
        {"step": 5, "prompt": "a", "completion": "x", "r": 1.0},
        {"step": 9, "prompt": "b", "completion": "y```z", "r": None},
    ]
    text = "\n".join(samples_section(rows))
    assert "first (5) and the last (9) logged steps" in text
    assert "````text\ny```z\n````" in text  # a fence the completion cannot close
    assert "r -" in text


def test_helpers(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"step": 1}], tail="not json\n[1, 2]\n")
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}] and read_jsonl(tmp_path / "missing.jsonl") == []
    assert reward_names([{"reward": 1, "acc": 1, "acc_std": 0, "acc_none_frac": 0, "fmt": 1, "fmt_none_frac": 0}]) == [
        "acc",
        "fmt",
    ]
    table = eval_table({"a": {"n": 3, "x": 0.5}, "b": {"n": 3, "x": None}})
    assert table.splitlines()[0] == "| metric | a | b | Δ b − a |" and "| x | 0.500 | - |  |" in table


TIMING = ("tokens_per_s", "time_rollout", "time_score", "time_logprobs", "time_train", "time_step")


def _without_timings(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_jsonl(path)]


@pytest.mark.slow  # two tiny pipelines, ~30 s
def test_pipeline_writes_its_report_and_the_same_table_on_every_run(tmp_path, tiny_model):
    """`pipeline` ends by writing report.md itself (README: "run by `pipeline` when it ends"), and a second run of
    the same recipe gives the same eval table, reward-model results and GRPO metrics, value for value (README:
    "the same table on every run"; here on a shortened quickstart: every stage, the engine backend)."""
    from grpo.config import load_recipe
    from grpo.pipeline import run_pipeline

    def run(out: Path) -> dict:
        recipe = load_recipe(
            ROOT / "recipes" / "quickstart.yaml",
            [
                f"run.output_dir={out}",
                f"model.name_or_path={tiny_model}",
                "run.threads=1",
                "run.stages=[sft,rm,train_unconstrained,train,eval]",
                "rm.steps=2",
                "rm.batch_size=4",
                "sft.steps=2",
                "sft.batch_size=4",
                "sft.eval_every=1",
                "data.sft_eval=null",
                "grpo.steps=3",
                "grpo.prompts_per_step=2",
                "grpo.num_generations=4",
                "rollout.max_new_tokens=6",
                "tracking.samples_every=1",
                "tracking.log_every=1",
                "eval.limit=8",
            ],
        )
        return run_pipeline(recipe)

    first = run(tmp_path / "a")
    report = tmp_path / "a" / "report.md"
    assert report.is_file(), "the pipeline wrote no report.md"
    text = report.read_text()
    for heading in (
        "## Evaluation",
        "## SFT",
        "## Reward and cost models",
        "## GRPO training",
        "## Sample completions",
    ):
        assert heading in text, heading
    results = json.loads((tmp_path / "a" / "eval" / "results.json").read_text())
    assert list(results["results"]) == ["base", "sft", "grpo_unconstrained", "grpo"] == list(first["eval"]["results"])
    row = " | ".join(f"{m['accuracy']:.3f}" for m in results["results"].values())
    assert f"| accuracy | {row} |" in text  # the eval table of results.json
    assert "Δ grpo − sft" in text
    assert all((tmp_path / "a" / png).is_file() for png in images(report))
    assert {"report_sft.png", "report_rm.png", "report_rewards.png", "report_speed.png"} <= set(images(report))

    run(tmp_path / "b")
    again = json.loads((tmp_path / "b" / "eval" / "results.json").read_text())
    assert again["results"] == results["results"]  # exactly: the same table
    assert [m["label"] for m in again["models"]] == [m["label"] for m in results["models"]]
    assert (tmp_path / "b" / "eval" / "samples.jsonl").read_text() == (
        tmp_path / "a" / "eval" / "samples.jsonl"
    ).read_text()
    rm_a, rm_b = (json.loads((tmp_path / x / "rm" / "results.json").read_text()) for x in "ab")
    assert rm_a.keys() == rm_b.keys() == {"usefulness", "safety"}
    for kind in rm_a:
        assert {k: v for k, v in rm_b[kind].items() if k not in ("path", "train_seconds")} == {
            k: v for k, v in rm_a[kind].items() if k not in ("path", "train_seconds")
        }, kind
    for stage in ("sft", "train_unconstrained", "train"):
        assert _without_timings(tmp_path / "b" / stage / "metrics.jsonl") == _without_timings(
            tmp_path / "a" / stage / "metrics.jsonl"
        ), stage
