"""Two CPU processes through `accelerate launch`: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2.

Each run asserts world size 2, identical parameters on both ranks (the trainer all-gathers a
checksum and refuses to finish otherwise), and per-step metrics equal to a single-process run of
the same global batch: rewards, KL, the loss and the gradient norm (a gradient summed instead of
averaged over ranks, or a `dapo` token count not all-reduced, changes both; Adam and clipping would
hide it in the weights). `rollout.seed_per_prompt=true` makes the samples independent of the
process count, so the runs see the same completions. The configs split the variants between them:
`dapo` under DDP and ZeRO-3, LoRA under ZeRO-2 and FSDP2 (and in the ZeRO-3 resume).
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import ROOT
from grpo import checkpoint

pytestmark = pytest.mark.slow

ARGS = [
    "grpo.steps=3",
    "grpo.prompts_per_step=4",
    "grpo.num_generations=4",
    "grpo.micro_batch_size=8",
    "grpo.lr=1e-2",
    "grpo.beta=0.1",
    "rollout.max_new_tokens=8",
    "rollout.seed_per_prompt=true",
    "rollout.backend=hf",
    "run.threads=1",
    "rewards=[{name: 'rewards_for_tests:sevens'}]",
    "safety.enabled=false",
    "tracking.log_every=1",
]


def launch(out: Path, model: Path, config: str | None, *extra) -> "Run":
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }
    recipe = [
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"run.output_dir={out}",
        f"model.name_or_path={model}",
        *ARGS,
        *extra,
    ]
    if config is None:
        cmd = [sys.executable, "-m", "grpo", "train", *recipe]
    else:
        if (
            config == "cpu_ddp.yaml"
        ):  # DDP on CPU needs it; DeepSpeed must NOT have it (it would silently fall back to DDP)
            env["ACCELERATE_USE_CPU"] = "true"
        else:
            env.pop("ACCELERATE_USE_CPU", None)
        # fsdp.yaml's bf16 mixed precision is for GPUs; fp32 here, to compare with one process
        precision = ["--mixed_precision", "no"] if config == "fsdp.yaml" else []
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "recipes" / "accelerate_configs" / config),
            "--num_processes",
            "2",
            *precision,
            "-m",
            "grpo",
            "train",
            *recipe,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((out / "train" / "run_info.json").read_text())
    metrics = [json.loads(l) for l in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    return Run(info, metrics, proc.stderr)


class Run(NamedTuple):
    info: dict
    metrics: list[dict]
    stderr: str


LORA = [
    "model.lora.enabled=true",
    "model.lora.r=4",
    "model.lora.dropout=0",
]  # dropout would draw per-rank random numbers
COMPARED = ("sevens", "completion_len", "loss", "zero_std_frac", "kl", "grad_norm")


def assert_same_steps(a: list[dict], b: list[dict], keys, what, rel=1e-3, abs_=1e-5):
    for x, y in zip(a, b):
        for key in keys:
            assert x[key] is not None and y[key] is not None, (what, x["step"], key)  # logged, and finite
            assert x[key] == pytest.approx(y[key], rel=rel, abs=abs_), (what, x["step"], key)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model):
    """One-process runs, one per (loss type, LoRA), made when a test first asks for them."""
    runs = {}

    def get(loss_type: str, lora: bool) -> Run:
        if (loss_type, lora) not in runs:
            runs[loss_type, lora] = launch(
                tmp_path_factory.mktemp(f"single_{loss_type}_{lora}"),
                tiny_model,
                None,
                f"grpo.loss_type={loss_type}",
                *(LORA if lora else []),
            )
        return runs[loss_type, lora]

    return get


@pytest.mark.parametrize(
    "config,loss_type,lora",
    [
        ("cpu_ddp.yaml", "dapo", False),
        ("zero2.yaml", "grpo", True),
        ("zero3.yaml", "dapo", False),
        ("fsdp.yaml", "grpo", True),
    ],
)
def test_two_processes_match_one(tmp_path, tiny_model, single, config, loss_type, lora):
    info1, m1, _ = single(loss_type, lora)
    info2, m2, _ = launch(tmp_path, tiny_model, config, f"grpo.loss_type={loss_type}", *(LORA if lora else []))
    assert info1["world_size"] == 1 and info2["world_size"] == 2
    assert info2["zero_stage"] == {"cpu_ddp.yaml": 0, "zero2.yaml": 2, "zero3.yaml": 3, "fsdp.yaml": 0}[config]
    assert info2["distributed_type"] == {"cpu_ddp.yaml": "MULTI_CPU", "fsdp.yaml": "FSDP"}.get(config, "DEEPSPEED")
    a, b = info2["param_checksums"]
    assert a == pytest.approx(b, rel=1e-9)  # both ranks hold the same parameters
    assert a == pytest.approx(info1["param_checksums"][0], rel=1e-4)  # and the same as one process
    assert len(m1) == len(m2) == 3
    # the frozen reference (beta > 0): a full copy per rank, except under ZeRO-3, where it is sharded like the
    # policy, and under LoRA, where there is none (the adapter disabled is the reference)
    if lora:
        assert info1["reference_local_params"] == info2["reference_local_params"] == 0
    else:
        assert info1["reference_local_params"] == info1["params_total"]
        if config == "zero3.yaml":
            assert 0 < info2["reference_local_params"] < info2["params_total"] * 0.75
        else:
            assert info2["reference_local_params"] == info2["params_total"]
    if config == "fsdp.yaml":  # the policy is sharded (each rank holds about half)
        assert 0 < info2["policy_local_params"] < info2["params_total"] * 0.75
    assert m1[0]["grad_norm"] > 0
    assert_same_steps(m1, m2, COMPARED, config)


def test_a_signal_to_one_process_stops_every_process(tmp_path, tiny_model):
    """SIGTERM reaches only rank 1 (in step 2): both ranks agree to stop after that step, write one checkpoint and
    exit; none runs on alone (it would wait forever in the next step's collectives)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    stopper = "{name: 'rewards_for_tests:signal_self', weight: 0.0, key: stop, at_call: 2, sig: SIGTERM, rank: 1}"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate_configs" / "cpu_ddp.yaml"),
        "--num_processes",
        "2",
        "-m",
        "grpo",
        "train",
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"run.output_dir={out}",
        f"model.name_or_path={tiny_model}",
        *ARGS,
        "grpo.steps=5",
        f"rewards=[{{name: 'rewards_for_tests:sevens'}}, {stopper}]",
    ]
    # ranks that disagree would wait in each other's collectives: end the launcher and its workers at the timeout
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as launcher:
        try:
            _, stderr = launcher.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            launcher.terminate()  # torch's launcher passes SIGTERM on to its workers, then kills them
            try:
                launcher.communicate(timeout=120)
            finally:
                os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail("the processes did not all stop (a rank kept training, waiting for the other)")
    proc = subprocess.CompletedProcess(cmd, launcher.returncode, "", stderr)
    assert proc.returncode != 0
    assert proc.stderr.count("received SIGTERM") == 1, proc.stderr[-4000:]  # rank 1 only
    # every rank that prints says the same (the launcher may end rank 0 once rank 1 has exited)
    stopped = re.findall(r"stopped: signal received; checkpoint saved at (\S+);", proc.stderr)
    assert stopped and set(stopped) == {f"{out / 'train'}/ckpt-2"}, proc.stderr[-4000:]
    # rank 0 stopped too: it wrote ckpt-2 with rank 1 (a collective save) and logged no step after it
    assert [p.name for p in checkpoint.list_checkpoints(out / "train")] == ["ckpt-2"]
    assert checkpoint.load_state(out / "train" / "ckpt-2")["step"] == 2
    assert [json.loads(l)["step"] for l in (out / "train" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "train" / "DONE").exists()


@pytest.mark.parametrize(
    "config,use_cpu,command,expect",
    [
        (
            "zero2.yaml",
            True,
            "train",
            "asks for DeepSpeed but accelerate set up MULTI_CPU (ACCELERATE_USE_CPU=true overrides it: unset it)",
        ),
        ("fsdp_v1.yaml", False, "train", "asks for FSDP version 1; grpo runs FSDP2: set fsdp_version: 2"),
        (
            None,
            False,
            "train",
            "2 processes were launched but accelerate set up no distributed backend (each would train alone)",
        ),
        (
            "fsdp.yaml",
            False,
            "rm",
            "the rm stage with model.lora under ZeRO-3 / FSDP is not supported (the LoRA merge needs whole weights)",
        ),
    ],
    ids=["deepspeed_as_ddp", "fsdp_v1", "no_backend", "rm_lora_fsdp"],
)
def test_launch_that_accelerate_would_quietly_change_is_refused(tmp_path, tiny_model, config, use_cpu, command, expect):
    """Refused with one line, on every rank: a DeepSpeed config that ACCELERATE_USE_CPU turns into DDP, FSDP1, two
    processes without a distributed backend (`--multi_gpu` on CPU without ACCELERATE_USE_CPU: each would train
    alone), and reward-model LoRA under FSDP (the merge needs whole weights)."""
    if config == "fsdp_v1.yaml":
        text = (
            (ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml")
            .read_text()
            .replace("fsdp_version: 2", "fsdp_version: 1")
        )
        (tmp_path / config).write_text(text)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if config is None:
        setup = ["--multi_gpu"]
    else:
        setup = [
            "--config_file",
            str(tmp_path / config if config == "fsdp_v1.yaml" else ROOT / "recipes" / "accelerate_configs" / config),
        ]
    extra = [*LORA, "rm.steps=2"] if command == "rm" else []
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *setup,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "grpo",
        command,
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"run.output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tiny_model}",
        *ARGS,
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors and all(expect in l for l in errors), proc.stderr[-3000:]
    if command == "train":
        assert not (tmp_path / "run" / "train").exists()  # nothing was trained or written
    else:
        assert not list((tmp_path / "run").rglob("*.safetensors"))  # no reward model trained or saved


ADAM_RESTARTS = "Adam's moments restart"


@pytest.mark.parametrize("config,lora", [("zero2.yaml", False), ("zero3.yaml", True), ("fsdp.yaml", False)])
def test_sharded_resume_continues_exactly(tmp_path, tiny_model, config, lora):
    """The sharded optimizer state is checkpointed: steps after a resume match the uninterrupted run (ZeRO-3 with a
    LoRA adapter: its shards hold the adapter's optimizer state only). Resumed by one process: FSDP's whole
    optimizer state continues exactly; a DeepSpeed checkpoint restores weights and counters and says Adam restarts."""
    extra = LORA if lora else []
    info_full, full, _ = launch(
        tmp_path / "full", tiny_model, config, "grpo.steps=4", "grpo.save_every=2", "grpo.keep_last=2", *extra
    )
    ckpt = tmp_path / "full" / "train" / "ckpt-2"
    if config != "fsdp.yaml":  # DeepSpeed: one shard per rank in its own format; FSDP: gathered whole into state.pt
        assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if "optim_states" in p.name) == [
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
        ]
    info, resumed, stderr = launch(
        tmp_path / "resumed", tiny_model, config, "grpo.steps=4", f"grpo.resume={ckpt}", *extra
    )
    assert ADAM_RESTARTS not in stderr and "no optimizer state" not in stderr
    assert [m["step"] for m in resumed] == [m["step"] for m in full[2:]] == [3, 4]
    assert_same_steps(
        full[2:], resumed, ("sevens", "completion_len", "loss", "kl", "grad_norm"), config, rel=1e-4, abs_=1e-6
    )
    assert info["param_checksums"][0] == pytest.approx(info_full["param_checksums"][0], rel=1e-7)
    if config == "zero2.yaml":  # one process, no DeepSpeed: weights and counters restored, Adam restarts (logged)
        _, other, stderr = launch(tmp_path / "one", tiny_model, None, "grpo.steps=4", f"grpo.resume={ckpt}")
        assert "holds no optimizer state this run can load" in stderr and ADAM_RESTARTS in stderr
        assert [m["step"] for m in other] == [3, 4]
        assert_same_steps(
            full[2:3], other[:1], ("sevens", "completion_len"), "zero2 -> 1 process"
        )  # the restored weights
    if config == "fsdp.yaml":  # the FSDP checkpoint's optimizer state is whole: one process continues exactly too
        _, other, stderr = launch(tmp_path / "one", tiny_model, None, "grpo.steps=4", f"grpo.resume={ckpt}")
        assert ADAM_RESTARTS not in stderr
        assert_same_steps(
            full[2:], other, ("sevens", "loss", "kl", "grad_norm"), "fsdp -> 1 process", rel=1e-4, abs_=1e-6
        )


def test_whole_pipeline_under_zero3_and_fsdp(tmp_path):
    """`accelerate launch -m grpo pipeline`: every stage (SFT, reward models, both GRPO runs, eval) runs with
    its weights sharded, saves whole models, and ZeRO-3 and FSDP give the same held-out results. Against one
    process: the reward models equal a one-process rm stage of the same global batch, and `grpo eval` in one
    process on the ZeRO-3 run's saved models gives its eval table exactly (sharded eval = plain eval; the saved
    models are whole). (SFT is not compared: its loss is a token mean per process, averaged over processes.)"""
    from grpo.config import load_recipe
    from grpo.evaluate import run_eval
    from grpo.pipeline import run_stage

    overrides = ["sft.steps=6", "rm.steps=6", "grpo.steps=3", "grpo.beta=0.04", "run.threads=1", "eval.limit=40"]
    results = {}
    for config in ("zero3.yaml", "fsdp.yaml"):
        out = tmp_path / config.split(".")[0]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
            ),
        }
        env.pop("ACCELERATE_USE_CPU", None)
        precision = ["--mixed_precision", "no"] if config == "fsdp.yaml" else []
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "recipes" / "accelerate_configs" / config),
            "--num_processes",
            "2",
            *precision,
            "-m",
            "grpo",
            "pipeline",
            str(ROOT / "recipes" / "quickstart.yaml"),
            f"run.output_dir={out}",
            *overrides,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads((out / "train" / "run_info.json").read_text())["world_size"] == 2
        rm = json.loads((out / "rm" / "results.json").read_text())
        results[config] = (
            json.loads((out / "eval" / "results.json").read_text())["results"],
            {k: v["after"] for k, v in rm.items()},
        )
    (eval3, rm3), (evalf, rmf) = results["zero3.yaml"], results["fsdp.yaml"]
    assert rm3.keys() == {"usefulness", "safety"} and rm3["usefulness"]["pair_accuracy"] > 0.6  # it learned, and saved
    for kind in rm3:
        assert rm3[kind] == pytest.approx(rmf[kind], rel=1e-4), kind
    assert list(eval3) == list(evalf) == ["base", "sft", "grpo_unconstrained", "grpo"]
    for label in eval3:
        assert eval3[label]["accuracy"] == pytest.approx(evalf[label]["accuracy"]), label

    # one process: the rm stage with the 2 processes' global batch (2 x rm.batch_size pairs a step)
    one = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", [f"run.output_dir={tmp_path / 'one'}", *overrides, "rm.batch_size=64"]
    )
    run_stage(one, "rm")
    rm1 = {k: v["after"] for k, v in json.loads((tmp_path / "one" / "rm" / "results.json").read_text()).items()}
    for kind in rm3:
        assert rm1[kind] == pytest.approx(rm3[kind], rel=1e-4, abs=1e-6), kind
    # one process: eval of the ZeRO-3 run's saved models (base, sft, both GRPO finals; its reward models score)
    again = run_eval(
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"run.output_dir={tmp_path / 'zero3'}", *overrides])
    )["results"]
    assert again == eval3
