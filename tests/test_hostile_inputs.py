"""Hostile inputs (issue 21) through the CLI, where a user meets them: one `error: ...` line (what, where, how to
fix), exit code 2, no traceback, nothing written; or a correct run that says what it did.

The CLI runs in-process (`grpo.cli.main`, the same code `python -m grpo` runs) to keep the suite fast; the cases
that need a process of their own (signals, hangs, locks between runs, launchers) are in tests/test_hangs_and_locks.py.
Each case here failed before its fix: a traceback, a silent wrong run (exit 0), or a vaguer line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from grpo import cli
from grpo.config import load_recipe
from helpers_common import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def train_args(out, model, *extra):
    """A 1-step GRPO run of the tiny model: fast, so a check that is missing shows as a finished run, not a hang."""
    return [
        QUICKSTART,
        f"run.output_dir={out}",
        f"model.name_or_path={model}",
        "run.threads=1",
        "grpo.steps=1",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=2",
        "rollout.max_new_tokens=4",
        "rollout.backend=hf",
        "safety.enabled=false",
        "rewards=[{name: accuracy}, {name: format, weight: 0.1}]",
        *extra,
    ]


@pytest.fixture
def grpo_cli(monkeypatch, capsys):
    """grpo_cli(*args) -> (exit code, stderr) of the real CLI, in-process (logging left to pytest's capture)."""
    monkeypatch.setattr(cli, "setup_logging", lambda debug=False: None)

    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        return code, capsys.readouterr().err

    return run


def assert_one_error(code, err, *needles):
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------- recipe values
def test_yaml_alias_bomb_in_reward_kwargs_is_refused_at_once(tmp_path, grpo_cli):
    # nine nested lists of nine aliases: 387 million values once expanded (it used to hang for minutes, silent)
    lines = ["    a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)
    ]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}}}\nsafety: {{enabled: false}}\nrewards:\n  - name: accuracy\n"
        "  - name: examples.my_reward:closeness\n" + "\n".join(lines) + "\n"
    )
    assert_one_error(*grpo_cli("train", recipe), "bomb.yaml", "100,000 values", "aliases")
    assert not (tmp_path / "run").exists()


def test_deeply_nested_yaml_is_one_line(tmp_path, grpo_cli):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("rewards:\n  - {name: accuracy, k: " + "[" * 3000 + "]" * 3000 + "}\n")
    assert_one_error(*grpo_cli("train", recipe), "deep.yaml", "nested too deeply")


@pytest.mark.parametrize(
    "override, key",
    [
        ("grpo.lr=.inf", "grpo.lr=inf"),
        ("rewards.0.weight=.nan", "rewards.0.weight=nan"),
        ("rewards.1.weight=-.inf", "rewards.1.weight=-inf"),
        ("safety.lambda_lr=.nan", "safety.lambda_lr=nan"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, tiny_model, grpo_cli, override, key):
    # rewards.N.weight=.nan used to exit 0 with a final model byte-identical to the base; grpo.lr=.inf to train NaNs
    assert_one_error(
        *grpo_cli("train", *train_args(tmp_path / "run", tiny_model, override)), key, "not a finite number"
    )
    assert not (tmp_path / "run").exists()


def test_non_finite_numbers_are_refused_by_the_stage_itself(tmp_path, tiny_model):
    from grpo.errors import UserError
    from grpo.trainer import run_grpo

    args = train_args(tmp_path / "run", tiny_model, "rewards.0.weight=.nan")
    recipe = load_recipe(args[0], [str(a) for a in args[1:]])
    with pytest.raises(UserError, match="rewards.0.weight=nan is not a finite number"):
        run_grpo(recipe)


def test_max_prompt_length_zero_is_refused(tmp_path, tiny_model, grpo_cli):
    # `ids[-0:]` is the whole prompt: 0 used to mean "no truncation at all"
    assert_one_error(
        *grpo_cli("train", *train_args(tmp_path / "run", tiny_model, "data.max_prompt_length=0")),
        "data.max_prompt_length=0 must be >= 1",
    )
    from grpo.config import DataConfig
    from grpo.data import prompt_records
    from grpo.errors import UserError

    with pytest.raises(UserError, match="data.max_prompt_length=0"):
        prompt_records([{"prompt": "Q:1+2="}], "prompt", DataConfig(max_prompt_length=0), None)


# ---------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("where", ["after --dry-run", "after --num-processes", "between options"])
def test_overrides_are_accepted_after_options(tmp_path, grpo_cli, capsys, where):
    out = f"run.output_dir={tmp_path / 'run'}"
    args = {
        "after --dry-run": ["train", QUICKSTART, "--dry-run", out, "grpo.prompts_per_step=6"],
        "after --num-processes": [
            "train",
            QUICKSTART,
            "--dry-run",
            "--num-processes",
            "3",
            out,
            "grpo.prompts_per_step=6",
        ],
        "between options": ["train", QUICKSTART, "--num-processes", "3", out, "--dry-run", "grpo.prompts_per_step=6"],
    }[where]
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "prompts_per_step" not in captured.err and "6 prompts" in captured.out


def test_overrides_after_eval_model_option(tmp_path, tiny_model, grpo_cli):
    code, err = grpo_cli(
        "eval",
        QUICKSTART,
        "--model",
        tiny_model,
        f"run.output_dir={tmp_path / 'run'}",
        "eval.limit=2",
        "rollout.max_new_tokens=2",
        "rewards=[{name: accuracy}]",
        "run.threads=1",
        "safety.enabled=false",
    )
    assert code == 0, err[-2000:]
    assert (
        json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"][Path(tiny_model).name]["n"] == 2
    )


def test_an_unknown_option_is_still_an_error(grpo_cli):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(QUICKSTART), "--dry-runn"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------- reward code
@pytest.mark.parametrize(
    "source, needles",
    [
        (
            'raise RuntimeError("no config here")\n',
            ["raised RuntimeError: no config here", "hostile_mod.py:1", "fix the module"],
        ),
        ("def f(:\n    pass\n", ["syntax error", "hostile_mod.py, line 1"]),
        ("import json\njson.loads('{')\n", ["raised JSONDecodeError", "fix the module"]),
    ],
)
def test_reward_module_that_fails_at_import(tmp_path, tiny_model, grpo_cli, monkeypatch, source, needles):
    (tmp_path / "hostile_mod.py").write_text(
        source + "\ndef reward(prompts, completions, **columns):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = train_args(tmp_path / "run", tiny_model, "rewards=[{name: 'hostile_mod:reward'}]")
    assert_one_error(*grpo_cli("train", *args), "rewards.0", "hostile_mod", *needles)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- data
BAD_ROWS = {
    "invalid UTF-8": (
        b'{"prompt": "Q:1+2=", "answer": "3"}\n{"prompt": "Q:\xff\xfe=", "answer": "3"}\n',
        ["line 2", "not UTF-8"],
    ),
    "malformed line": (
        b'{"prompt": "Q:1+2=", "answer": "3"}\n{"prompt": "Q:2+2=", "answer": "4"\n',
        ["line 2", "not JSON"],
    ),
    "int prompt": (
        b'{"prompt": "Q:1+2=", "answer": "3"}\n{"prompt": 5, "answer": "3"}\n',
        ["row 2", "'prompt' = 5 (int)", "string"],
    ),
    "null prompt": (
        b'{"prompt": "Q:1+2=", "answer": "3"}\n{"prompt": null, "answer": "3"}\n',
        ["row 2", "'prompt' = None"],
    ),
    "array line": (b'{"prompt": "Q:1+2=", "answer": "3"}\n[1, 2]\n', ["line 2", "not an object"]),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_grpo_rows_name_the_file_and_row(tmp_path, tiny_model, grpo_cli, case):
    data, needles = BAD_ROWS[case]
    (tmp_path / "train.jsonl").write_bytes(data)
    args = train_args(tmp_path / "run", tiny_model, f"data.train={tmp_path / 'train.jsonl'}")
    assert_one_error(*grpo_cli("train", *args), "data.train", "train.jsonl", *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "completion, needles", [(7, ["row 2", "'completion' = 7 (int)"]), ([1], ["row 2", "'completion' = [1]"])]
)
def test_bad_sft_completion_names_the_row(tmp_path, tiny_model, grpo_cli, completion, needles):
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"prompt": "Q:1+2=", "completion": "<a>3</a>"}, {"prompt": "Q:1+3=", "completion": completion}],
    )
    assert_one_error(
        *grpo_cli(
            "sft",
            QUICKSTART,
            f"run.output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_model}",
            f"data.sft_train={data}",
            "data.sft_eval=null",
            "sft.steps=1",
        ),
        "data.sft_train",
        *needles,
    )


def test_all_empty_sft_completions_are_refused(tmp_path, tiny_model, grpo_cli):
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Q:1+2=", "completion": ""},
            {"prompt": "Q:1+3=", "completion": "  "},
            {"prompt": "Q:1+4=", "completion": None},
        ],
    )
    assert_one_error(
        *grpo_cli(
            "sft",
            QUICKSTART,
            f"run.output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_model}",
            f"data.sft_train={data}",
            "data.sft_eval=null",
            "sft.steps=1",
        ),
        "data.sft_train",
        "all 3 rows have an empty 'completion'",
    )
    assert not (tmp_path / "run").exists()


def test_some_empty_sft_completions_are_counted(tmp_path, tiny_model, grpo_cli, caplog):
    data = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Q:1+2=", "completion": "<a>3</a>"},
            {"prompt": "Q:1+3=", "completion": ""},
            {"prompt": "Q:1+4=", "completion": "<a>5</a>"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli(
            "sft",
            QUICKSTART,
            f"run.output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_model}",
            f"data.sft_train={data}",
            "data.sft_eval=null",
            "sft.steps=1",
            "sft.batch_size=2",
            "run.threads=1",
        )
    assert code == 0, err[-2000:]
    assert "1 of 3 rows have an empty completion" in caplog.text


def test_a_huge_prompt_is_truncated_and_said_so(tmp_path, tiny_model, grpo_cli, caplog):
    # 200k characters = 200k tokens of the character tokenizer (the case had 800k)
    rows = [{"prompt": "Q:1+2=", "answer": "3"}, {"prompt": "Q:" + "1+" * 100_000 + "2=", "answer": "3"}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.INFO):
        code, err = grpo_cli(
            "train", *train_args(tmp_path / "run", tiny_model, f"data.train={data}", "data.max_prompt_length=16")
        )
    assert code == 0, err[-2000:]
    assert "truncated 1 of 2 prompts to their last 16 tokens" in caplog.text and "200,00" in caplog.text, caplog.text[
        -3000:
    ]
    assert "indexing errors" not in caplog.text + err


# ---------------------------------------------------------------------------------------- models
def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_damaged_weights_file_is_one_line(tmp_path, tiny_model, grpo_cli, damage):
    model = _copy_model(tiny_model, tmp_path / "model")
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
    assert_one_error(
        *grpo_cli("train", *train_args(tmp_path / "run", model)),
        "model.safetensors is damaged",
        "re-save or re-download",
    )
    assert not (tmp_path / "run").exists()
    from grpo.config import ModelConfig
    from grpo.errors import UserError
    from grpo.modeling import load_model

    with pytest.raises(UserError, match="model.safetensors is damaged"):  # in-process callers (no preflight) too
        load_model(ModelConfig(name_or_path=str(model)))


def test_model_with_nan_weights_is_refused_at_load(tmp_path, tiny_model, grpo_cli):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_model, tmp_path / "nan_model")
    weights = load_file(model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert_one_error(*grpo_cli("train", *train_args(tmp_path / "run", model)), "non-finite weights", name)
    # eval used to print a silent table of zeros for it
    assert_one_error(
        *grpo_cli(
            "eval",
            QUICKSTART,
            "--model",
            model,
            f"run.output_dir={tmp_path / 'run2'}",
            "eval.limit=2",
            "rewards=[{name: accuracy}]",
            "safety.enabled=false",
        ),
        "non-finite weights",
        "nan_model",
    )
    assert not (tmp_path / "run2" / "eval").exists()


def test_hub_id_in_offline_mode_fails_at_once_saying_so(tmp_path, grpo_cli, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("grpo.modeling._HUB_CHECKED", {})
    args = [
        QUICKSTART,
        f"run.output_dir={tmp_path / 'run'}",
        "model.name_or_path=nobody-here/no-such-model-21",
        "safety.enabled=false",
        "rewards=[{name: accuracy}]",
    ]
    assert_one_error(
        *grpo_cli("train", *args),
        "model.name_or_path",
        "nobody-here/no-such-model-21",
        "HF_HUB_OFFLINE",
        "local model folder",
    )


def test_unreachable_hub_fails_fast_saying_what_was_tried(tmp_path, grpo_cli, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        constants, "ENDPOINT", "http://127.0.0.1:9"
    )  # the discard port: nothing listens, refused at once
    monkeypatch.setattr("grpo.modeling._HUB_CHECKED", {})
    args = [
        QUICKSTART,
        f"run.output_dir={tmp_path / 'run'}",
        "model.name_or_path=nobody-here/no-such-model-21",
        "safety.enabled=false",
        "rewards=[{name: accuracy}]",
    ]
    with caplog.at_level(logging.INFO):
        line = assert_one_error(
            *grpo_cli("train", *args), "nobody-here/no-such-model-21", "cannot be reached", "127.0.0.1:9"
        )
    assert "fetching it from the Hugging Face hub (http://127.0.0.1:9)" in caplog.text
    assert "Retrying" not in caplog.text and "Retry" not in line


# ---------------------------------------------------------------------------------------- rewards that misbehave
def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def test_a_reward_that_never_returns_times_out_naming_it(tmp_path, tiny_model, grpo_cli):
    # no timeout existed: the run hung for ever (and a first SIGTERM could not stop it: tests/test_hangs_and_locks.py)
    args = train_args(
        tmp_path / "run",
        tiny_model,
        "rewards=[{name: accuracy}, {name: 'hostile_rewards:never_returns', timeout_s: 0.5}]",
    )
    assert_one_error(
        *grpo_cli("train", *args),
        "reward 'never_returns' did not return within its timeout_s=0.5 s",
        "on_reward_error=skip",
    )


def test_a_reward_that_times_out_is_skipped_when_asked(tmp_path, tiny_model, grpo_cli):
    args = train_args(
        tmp_path / "run",
        tiny_model,
        "grpo.steps=2",
        "grpo.on_reward_error=skip",
        "rewards=[{name: accuracy}, {name: 'hostile_rewards:never_returns', timeout_s: 0.3}]",
    )
    code, err = grpo_cli("train", *args)
    assert code == 0, err[-2000:]
    assert [m["skipped_samples"] for m in _metrics(tmp_path / "run")] == [4.0, 4.0]  # every sample of both steps


def test_reward_timeout_off_the_main_thread(tmp_path):
    """Called from another thread (no SIGALRM there), the call runs in a worker that is abandoned on expiry."""
    import threading

    from grpo.config import RewardSpec
    from grpo.errors import UserError
    from grpo.scoring import build_rewards, score

    rewards = build_rewards([RewardSpec("hostile_rewards:never_returns", timeout_s=0.3)])
    caught = []

    def run():
        try:
            score(rewards, ["p"], ["c"], {})
        except UserError as e:
            caught.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert caught and "did not return within its timeout_s=0.3 s" in caught[0]


def test_a_reward_that_is_never_applicable_stops_the_run(tmp_path, tiny_model, grpo_cli, caplog):
    args = train_args(
        tmp_path / "run",
        tiny_model,
        "grpo.steps=6",
        "grpo.max_steps_without_reward=2",
        "rewards=[{name: 'hostile_rewards:all_none'}]",
    )
    with caplog.at_level(logging.WARNING):
        assert_one_error(
            *grpo_cli("train", *args),
            "no reward applied to any sample in 2 steps in a row (steps 1-2",
            "grpo.max_steps_without_reward",
        )
    assert "no reward applied to any sample at step 1" in caplog.text
    assert "reward 'all_none' returned None (not applicable) for every sample at step 1" in caplog.text
    assert len(_metrics(tmp_path / "run")) == 1  # step 1 was logged, step 2 stopped it


def test_never_applicable_is_only_warned_when_the_limit_is_off(tmp_path, tiny_model, grpo_cli, caplog):
    args = train_args(
        tmp_path / "run",
        tiny_model,
        "grpo.steps=2",
        "grpo.max_steps_without_reward=0",
        "rewards=[{name: 'hostile_rewards:all_none'}]",
    )
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli("train", *args)
    assert code == 0, err[-2000:]
    assert caplog.text.count("no reward applied to any sample at step") == 1  # warned once, not every step


@pytest.mark.parametrize("big", ["huge", "big_spread"])
def test_a_reward_that_swamps_the_others_is_warned(tmp_path, tiny_model, grpo_cli, caplog, big):
    args = train_args(
        tmp_path / "run",
        tiny_model,
        "grpo.steps=2",
        f"rewards=[{{name: 'hostile_rewards:length'}}, {{name: 'hostile_rewards:{big}'}}]",
    )
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli("train", *args)
    assert code == 0, err[-2000:]
    assert caplog.text.count(f"reward '{big}' swamps 'length' in the reward sum") == 1, caplog.text[-3000:]
    assert "normalize_then_sum" in caplog.text


def test_rewards_on_one_scale_are_not_warned(tmp_path, tiny_model, grpo_cli, caplog):
    args = train_args(
        tmp_path / "run", tiny_model, "grpo.steps=2", "rewards=[{name: 'hostile_rewards:length'}, {name: format}]"
    )
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli("train", *args)
    assert code == 0 and "swamps" not in caplog.text


# ---------------------------------------------------------------------------------------- disk full
def _fail_writing(monkeypatch, victim: str, error: BaseException):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if victim in str(f):
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("how", ["ENOSPC", "torch's RuntimeError on a full disk"])
def test_disk_full_during_a_checkpoint(tmp_path, tiny_model, grpo_cli, monkeypatch, how):
    import errno
    import shutil
    from collections import namedtuple

    from grpo import checkpoint

    if how == "ENOSPC":
        _fail_writing(monkeypatch, "ckpt-2.tmp", OSError(errno.ENOSPC, "No space left on device"))
    else:  # what torch.save raises when the disk fills: no errno; the disk itself is then (nearly) full
        _fail_writing(
            monkeypatch,
            "ckpt-2.tmp",
            RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1153: file write failed"),
        )
        usage = namedtuple("usage", "total used free")
        real_usage = shutil.disk_usage
        monkeypatch.setattr(
            shutil,
            "disk_usage",
            lambda p: usage(10**12, 10**12, 0) if "ckpt" in str(p) or "train" in str(p) else real_usage(p),
        )
    out = tmp_path / "run"
    line = assert_one_error(
        *grpo_cli("train", *train_args(out, tiny_model, "grpo.steps=3", "grpo.save_every=1")),
        "no space left on the device while writing",
        "ckpt-2",
        "ckpt-1 intact",
        "grpo.resume=true",
    )
    assert "\n" not in line
    assert checkpoint.list_checkpoints(out / "train") == [out / "train" / "ckpt-1"]
    assert not (out / "train" / "ckpt-2.tmp").exists()
    assert checkpoint.load_state(out / "train" / "ckpt-1")["step"] == 1


def test_disk_preflight_counts_the_kept_checkpoints(tmp_path, tiny_model):
    from grpo.preflight_io import _stage_bytes

    def need(*extra):
        return _stage_bytes(
            load_recipe(QUICKSTART, [f"model.name_or_path={tiny_model}", "grpo.steps=10", *extra]), "train", {}
        )

    one = need("grpo.save_every=0")  # the last step's checkpoint and the final model
    weights = (tiny_model / "model.safetensors").stat().st_size
    ckpt = one - weights
    assert need("grpo.save_every=1", "grpo.keep_last=2") == 3 * ckpt + weights  # 2 kept + the one being written
    assert need("grpo.save_every=1", "grpo.keep_last=0") == 10 * ckpt + weights  # keep_last=0 keeps every one
    assert need("grpo.save_every=4", "grpo.keep_last=5") == 3 * ckpt + weights  # steps 4, 8 and the last


# ---------------------------------------------------------------------------------------- resuming with another recipe
def test_resume_with_a_changed_recipe(tmp_path, tiny_model, grpo_cli, caplog):
    out = tmp_path / "run"
    code, err = grpo_cli("train", *train_args(out, tiny_model, "grpo.steps=2", "grpo.save_every=1"))
    assert code == 0, err[-2000:]
    first_config = (out / "train" / "config.yaml").read_text()
    # the batch geometry and the loss cannot change: the run would not continue exactly (it used to, silently)
    assert_one_error(
        *grpo_cli("train", *train_args(out, tiny_model, "grpo.steps=3", "grpo.resume=true", "grpo.num_generations=4")),
        "grpo.num_generations: 2 -> 4",
        "continue exactly",
    )
    assert_one_error(
        *grpo_cli("train", *train_args(out, tiny_model, "grpo.steps=3", "grpo.resume=true", "grpo.loss_type=dapo")),
        "grpo.loss_type: 'grpo' -> 'dapo'",
    )
    assert (out / "train" / "config.yaml").read_text() == first_config
    # the rest may: warned, and both configs kept
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli("train", *train_args(out, tiny_model, "grpo.steps=3", "grpo.resume=true", "grpo.lr=1e-3"))
    assert code == 0, err[-2000:]
    assert (
        "with a changed recipe" in caplog.text
        and "grpo.lr: 2e-05 -> 0.001" in caplog.text
        and "grpo.steps: 2 -> 3" in caplog.text
    )
    assert (out / "train" / "config.before-resume-2.yaml").read_text() == first_config
    assert "lr: 0.001" in (out / "train" / "config.yaml").read_text()
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------- what a run says it does
def test_a_stand_alone_train_says_which_model_it_starts_from(tmp_path, tiny_model, grpo_cli, caplog):
    out = tmp_path / "run"
    _copy_model(tiny_model, out / "sft" / "final")
    with caplog.at_level(logging.INFO):
        code, err = grpo_cli("train", *train_args(out, tiny_model))
    assert code == 0, err[-2000:]
    first = caplog.messages[0]
    assert first.startswith(f"train: starting from model.name_or_path={tiny_model}"), caplog.messages[:3]
    assert f"add model.name_or_path={out / 'sft' / 'final'}" in first and "grpo pipeline" in first


def test_a_pipeline_without_sft_warns_that_grpo_starts_from_the_base_model(tmp_path, tiny_model, grpo_cli, caplog):
    out = tmp_path / "run"
    _copy_model(tiny_model, out / "sft" / "final")
    with caplog.at_level(logging.INFO):
        code, err = grpo_cli("pipeline", *train_args(out, tiny_model, "run.stages=[train]"))
    assert code == 0, err[-2000:]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and warned[0].startswith(f"train: starting from model.name_or_path={tiny_model}"), warned
    assert f"add model.name_or_path={out / 'sft' / 'final'}" in warned[0] and "put sft in run.stages" in warned[0]
    # with sft among the stages the pipeline feeds its model on: nothing to say
    caplog.clear()
    code, err = grpo_cli(
        "pipeline", *train_args(tmp_path / "run2", tiny_model, "run.stages=[sft,train]", "sft.steps=1")
    )
    assert code == 0, err[-2000:]
    assert not any("starting from" in m for m in caplog.messages), caplog.messages[:3]


def test_eval_says_it_replaces_earlier_results_and_labels_models_alike(tmp_path, tiny_model, grpo_cli, caplog):
    out = tmp_path / "run"
    model = _copy_model(tiny_model, tmp_path / "other" / "sft" / "final")
    common = [
        f"run.output_dir={out}",
        "eval.limit=2",
        "rollout.max_new_tokens=2",
        "rewards=[{name: accuracy}]",
        "run.threads=1",
        "safety.enabled=false",
    ]
    code, err = grpo_cli("eval", QUICKSTART, "--model", model, *common)
    assert code == 0, err[-2000:]
    by_option = json.loads((out / "eval" / "results.json").read_text())["models"]
    with caplog.at_level(logging.WARNING):
        code, err = grpo_cli(
            "eval", QUICKSTART, f"model.name_or_path={tiny_model}", f"eval.checkpoints=[{model}]", *common
        )
    assert code == 0, err[-2000:]
    assert (
        "eval: replacing the results of an earlier eval" in caplog.text
        and "results.json, results.md, samples.jsonl" in caplog.text
    )
    by_recipe = json.loads((out / "eval" / "results.json").read_text())["models"]
    assert by_option == [{"label": "sft/final", "path": str(model)}]
    assert by_recipe[-1] == by_option[0]  # the same column name either way (was "final" for eval.checkpoints)
