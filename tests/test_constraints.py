"""Several constraints (recipe section `constraints:`): config and rules, the old `safety:` section as one
constraint, both advantage schemes end to end against a hand computation from the logged samples, each
multiplier's dual step (mean and rate, delay, clamp), and exact resume of several multipliers (old checkpoints too)."""

import dataclasses
import json
import math
import sys

import pytest
import torch

from conftest import ROOT
from grpo import checkpoint, rules
from grpo.config import constraint_list, load_recipe, resolved_constraints, std_floor_of, unconstrained
from grpo.errors import Interrupted, UserError
from grpo.trainer import run_grpo
from helpers_common import read_jsonl as history

sys.path.insert(0, str(ROOT / "tests"))

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
REWARDS = (
    "rewards=[{name: 'rewards_for_tests:even_tokens'}, {name: 'rewards_for_tests:odd_first_token_cost', role: safety}, "
    "{name: completion_tokens}]"
)
# a rate constraint on the safety cost (delayed one step) and a length budget that the first steps exceed (lambda hits
# its cap)
TWO = (
    "constraints=[{reward: odd_first_token_cost, kind: rate, threshold: 0.3, lambda_init: 0.5, lambda_lr: 1.0, "
    "lambda_max: 4.0, "
    "delay: 1, name: unsafe}, {reward: completion_tokens, kind: mean, threshold: 6.0, lambda_init: 1.0, lambda_lr: "
    "0.5, "
    "lambda_max: 3.0, std_floor: 2.0, name: length}]"
)


def recipe(tmp_path, model=None, *extra):
    base = [
        f"run.output_dir={tmp_path}",
        "run.threads=1",
        "tracking.log_every=1",
        "safety.enabled=null",  # the constraints: a test gives are on
        "constraints=[]",
        "grpo.constraint_scheme=separate",  # the library default (the quickstart names scalarized)
        "grpo.prompts_per_step=4",
        "grpo.num_generations=2",
        "rollout.max_new_tokens=8",
    ]
    return load_recipe(QUICKSTART, base + ([f"model.name_or_path={model}"] if model else []) + list(extra))


def problems(tmp_path, *extra):
    return rules.constraints(recipe(tmp_path, None, *extra))


# ------------------------------------------------------------------------------------- config and rules
def test_constraints_section_loads(tmp_path):
    r = recipe(tmp_path, None, REWARDS, TWO)
    assert [(c.reward, c.kind, c.threshold, c.name) for c in r.constraints] == [
        ("odd_first_token_cost", "rate", 0.3, "unsafe"),
        ("completion_tokens", "mean", 6.0, "length"),
    ]
    assert r.constraints[1].std_floor == 2.0 and r.constraints[0].delay == 1 and r.constraints[0].signal == "auto"
    assert [(name, col) for name, _, col in resolved_constraints(r)] == [("unsafe", 1), ("length", 2)]
    # the separate scheme's std floor: as given, else 0 for the 0/1 indicator of a rate, 1 for a cost itself
    assert [std_floor_of(c) for c in r.constraints] == [0.0, 2.0]
    both = "constraints=[{reward: completion_tokens}, {reward: odd_first_token_cost, kind: rate, signal: cost}]"
    r2 = recipe(tmp_path, None, REWARDS, both)
    assert [std_floor_of(c) for c in r2.constraints] == [1.0, 1.0]
    assert problems(tmp_path, REWARDS, TWO) == []
    with pytest.raises(
        UserError, match=r"unknown key 'constraints.0.lamda_lr'; valid keys in constraints.0: reward, threshold"
    ):
        recipe(tmp_path, None, "constraints=[{reward: safety, lamda_lr: 0.1}]")


def test_old_safety_section_is_one_constraint(tmp_path):
    """A recipe written before constraints: (its safety section's settings): one constraint named safety on the role:
    safety reward; the cost itself enters the advantage (as it always did there), whatever it constrains."""
    old = [
        "constraints=[]",
        "safety.enabled=true",
        "safety.constrain=violation_rate",
        "safety.cost_threshold=0.02",
        "safety.lambda_lr=0.2",
        "safety.lambda_max=10.0",
    ]
    r = load_recipe(QUICKSTART, [f"run.output_dir={tmp_path}", *old])
    (c,) = constraint_list(r)
    assert (c.reward, c.kind, c.signal, c.threshold, c.lambda_lr, c.lambda_max, c.name) == (
        "{output_dir}/rm/safety",
        "rate",
        "cost",
        0.02,
        0.2,
        10.0,
        "safety",
    )
    assert [(name, col) for name, _, col in resolved_constraints(r)] == [("safety", 3)]
    mean = load_recipe(QUICKSTART, [*old, "safety.constrain=mean_cost", "safety.lambda_delay=3"])
    assert [(c.kind, c.delay) for c in constraint_list(mean)] == [("mean", 3)]
    assert rules.constraints(r) == []


def test_safety_enabled_switches_every_constraint(tmp_path):
    """safety.enabled: false turns every constraint off (a baseline); null (unset) leaves a constraints: list on; the
    old section's settings next to a constraints: list are refused (they would be ignored)."""
    quick = load_recipe(QUICKSTART, [f"run.output_dir={tmp_path}"])
    assert [c.name or c.reward for c in constraint_list(quick)] == ["safety"] and quick.safety.enabled
    assert constraint_list(load_recipe(QUICKSTART, ["safety.enabled=false"])) == []
    assert [c.reward for c in constraint_list(recipe(tmp_path, None, REWARDS, TWO, "safety.enabled=null"))] == [
        "odd_first_token_cost",
        "completion_tokens",
    ]
    assert constraint_list(recipe(tmp_path, None, REWARDS, "safety.enabled=null")) == []
    mixed = rules.constraints(load_recipe(QUICKSTART, ["safety.cost_threshold=0.1"]))
    assert mixed == [
        "safety.cost_threshold is set and a constraints: list is given: the safety section's settings define "
        "the one constraint of recipes without constraints:; set them on the constraint instead, e.g. "
        "constraints: [{reward: safety, kind: rate, threshold: 0.02, lambda_lr: 0.2}]"
    ]
    assert rules.constraints(load_recipe(QUICKSTART, ["safety.cost_threshold=0.1", "safety.enabled=false"])) == []


def test_unconstrained_baseline_drops_every_constraint(tmp_path):
    r = recipe(tmp_path, None, REWARDS, TWO, "rewards.2.weight=0.7")
    base = unconstrained(r)
    assert base.constraints == [] and not base.safety.enabled
    assert [x.weight for x in base.rewards] == [1.0, 0.0, 0.0]  # the costs are scored and logged, weight 0
    assert [x.weight for x in r.rewards] == [1.0, 1.0, 0.7]  # the recipe itself is unchanged


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "constraints=[{kind: rate}]",
            "constraints.0 needs reward: the name of the constrained entry of rewards (rewards: even_tokens, "
            "odd_first_token_cost, completion_tokens)",
        ),
        (
            "constraints=[{reward: safety}]",
            "constraints.0.reward='safety' names no reward of the recipe; rewards: even_tokens,",
        ),
        (
            "constraints=[{reward: completion_tokens, kind: rate, threshold: 2}]",
            "constraints.0: threshold=2.0 bounds a rate P(cost > 0): give a fraction in [0, 1]",
        ),
        (
            "constraints=[{reward: completion_tokens, lambda_init: 30}]",
            "constraints.0: lambda_init=30.0 must be > 0 and <= lambda_max=20.0",
        ),
        ("constraints=[{reward: completion_tokens, lambda_lr: -1}]", "constraints.0: lambda_lr=-1.0 must be >= 0"),
        ("constraints=[{reward: completion_tokens, delay: -2}]", "constraints.0: delay=-2 must be >= 0"),
        (
            "constraints=[{reward: completion_tokens, smoothing: 1}]",
            "constraints.0: smoothing=1.0 must be in [0, 1) (the moving average's weight on the past)",
        ),
        (
            "constraints=[{reward: completion_tokens, signal: indicator}]",
            "constraints.0: signal=indicator puts P(cost > 0) into the advantage",
        ),
        (
            "constraints=[{reward: completion_tokens}, {reward: completion_tokens, kind: rate}]",
            "constraints: the name 'completion_tokens' is used twice; give each constraint a distinct name",
        ),
    ],
)
def test_constraint_rules(tmp_path, override, needle):
    found = problems(tmp_path, REWARDS, override)
    assert len(found) == 1 and found[0].startswith(needle), found


def test_constraint_rules_ambiguous_reward_and_scheme(tmp_path):
    two_models = "rewards=[{name: accuracy}, {name: a/rm/safety, role: safety}, {name: b/rm/safety}]"
    found = problems(tmp_path, two_models, "constraints=[{reward: safety}]")
    assert found == [
        "constraints.0.reward='safety' names 2 rewards (rewards.1, rewards.2); use the name as written in rewards, or "
        "make the rewards' names distinct"
    ]
    assert problems(tmp_path, two_models, "constraints=[{reward: b/rm/safety}]") == []  # the name as written
    found = problems(tmp_path, REWARDS, TWO, "grpo.constraint_scheme=scalarized", "grpo.reward_mode=normalize_then_sum")
    assert found == [
        "grpo.constraint_scheme=scalarized combines raw rewards and costs before one normalisation: it needs "
        "grpo.reward_mode=sum (got normalize_then_sum); or use constraint_scheme=separate"
    ]


def test_train_stage_refuses_a_bad_constraint_with_one_line(tmp_path, tiny_model):
    with pytest.raises(UserError, match=r"^constraints.0.reward='lenght' names no reward of the recipe"):
        run_grpo(recipe(tmp_path, tiny_model, REWARDS, "constraints=[{reward: lenght}]"))


def test_completion_tokens_reward():
    from rewards import resolve_reward

    fn = resolve_reward("completion_tokens")
    assert fn(["p"] * 3, ["a", "bc", ""], completion_ids=[[5, 1], [7, 8, 1], []]) == [2.0, 3.0, 0.0]


# ------------------------------------------------------------------------------------- end to end
def _by_hand(rows: list[dict], G: int, lam: list[float], scheme: str) -> list[float]:
    """Each sample's advantage from its logged rewards: A = (A_r - l1 A_1 - l2 A_2) / (1 + l1 + l2) (separate; A_1 from
    the indicator cost > 0 with the indicator's default std floor 0, A_2 from the token count with std floor 2) or the
    group-normalised (r - l1 [c > 0] - l2 tokens) / (1 + l1 + l2) (scalarized)."""
    out = []
    for g in range(0, len(rows), G):
        col = lambda k: torch.tensor([x[k] for x in rows[g : g + G]], dtype=torch.float64)  # noqa: E731
        r, unsafe, tokens = col("even_tokens"), (col("odd_first_token_cost") > 0).double(), col("completion_tokens")
        norm = lambda x, floor: (x - x.mean()) / (x.std() + floor) if x.std() + floor > 0 else 0 * x  # noqa: E731
        if scheme == "separate":
            a = (norm(r, 1e-4) - lam[0] * norm(unsafe, 0.0) - lam[1] * norm(tokens, 2.0)) / (1 + sum(lam))
        else:
            a = norm((r - lam[0] * unsafe - lam[1] * tokens) / (1 + sum(lam)), 1e-4)
        out += a.tolist()
    return out


@pytest.mark.parametrize("scheme", ["separate", "scalarized"])
def test_two_constraints_end_to_end(tmp_path, tiny_model, scheme):
    """Two multipliers at once: each follows log(lam) += lr * (measured - threshold) from its own measure (the rate of
    cost > 0, the mean token count), after its delay, clamped at its lambda_max; every sample's advantage is the
    scheme's formula with that step's multipliers; the unconstrained baseline trains on the reward alone."""
    from grpo.pipeline import run_stage

    G, steps = 2, 5
    r = recipe(
        tmp_path,
        tiny_model,
        f"grpo.steps={steps}",
        "grpo.lr=1e-2",
        "tracking.samples_every=1",
        REWARDS,
        TWO,
        f"grpo.constraint_scheme={scheme}",
    )
    run_stage(r, "train")
    h = history(tmp_path / "train" / "metrics.jsonl")
    unsafe, length = [x["lambda/unsafe"] for x in h], [x["lambda/length"] for x in h]
    assert unsafe[:2] == pytest.approx([0.5, 0.5])  # lambda_init; delay 1: the first update only counts
    assert length[0] == 1.0
    for t in range(len(h) - 1):
        rate, tokens = h[t]["constraint/unsafe"], h[t]["constraint/length"]
        if t >= 1:
            assert unsafe[t + 1] == pytest.approx(min(unsafe[t] * math.exp(1.0 * (rate - 0.3)), 4.0), rel=1e-6), t
        assert length[t + 1] == pytest.approx(min(length[t] * math.exp(0.5 * (tokens - 6.0)), 3.0), rel=1e-6), t
        assert h[t]["violation/unsafe"] == float(rate > 0.3) and h[t]["violation/length"] == float(tokens > 6.0)
    assert h[0]["constraint/length"] == h[0]["completion_len"] and h[0]["constraint/unsafe"] == h[0]["unsafe_rate"]
    assert (
        max(length) == pytest.approx(3.0) and max(unsafe) > 0.5
    )  # the length budget is exceeded: its lambda reaches the cap
    assert "lambda" not in h[0] and h[0]["reward"] == pytest.approx(
        h[0]["even_tokens"]
    )  # the costs leave the reward sum
    from grpo.config import constraint_names
    from grpo.metrics import curves

    drawn = curves(r.rewards, constraint_names(r))["reward_curves"]  # the tracker's reward_curves.png
    per_constraint = [k for k in h[0] if k.startswith(("lambda/", "constraint/"))]
    assert sorted(per_constraint) == ["constraint/length", "constraint/unsafe", "lambda/length", "lambda/unsafe"]
    assert set(per_constraint) <= set(drawn), drawn
    assert (tmp_path / "train" / "reward_curves.png").is_file()
    samples = history(tmp_path / "train" / "samples.jsonl")
    assert len(samples) == steps * 4 * G
    for step in range(1, steps + 1):
        rows = [x for x in samples if x["step"] == step]
        got = [x["advantage"] for x in rows]
        assert got == pytest.approx(_by_hand(rows, G, [unsafe[step - 1], length[step - 1]], scheme), abs=1e-4), step

    run_stage(r, "train_unconstrained")
    h0 = history(tmp_path / "train_unconstrained" / "metrics.jsonl")
    assert not any(k.startswith("lambda") for k in h0[0]) and "unsafe_rate" in h0[0]
    base = history(tmp_path / "train_unconstrained" / "samples.jsonl")
    rows = [x for x in base if x["step"] == 1]
    assert [x["advantage"] for x in rows] == pytest.approx(_by_hand(rows, G, [0.0, 0.0], "separate"), abs=1e-4)


def _run(tmp_path, tiny_model, at_call: int, *extra):
    stopper = f"{{name: 'rewards_for_tests:signal_self', weight: 0.0, key: '{tmp_path}', at_call: {at_call}}}"
    rewards = REWARDS.replace("completion_tokens}]", f"completion_tokens}}, {stopper}]")
    return recipe(
        tmp_path, tiny_model, "grpo.steps=5", "grpo.lr=1e-2", "grpo.save_every=1", "grpo.keep_last=5", rewards, *extra
    )


@pytest.mark.slow
def test_resume_restores_every_multiplier_exactly(tmp_path, tiny_model):
    """A run stopped mid-way and resumed ends with every multiplier, metric and weight of the run never stopped;
    a checkpoint written before constraints: (one multiplier's state) resumes a one-constraint run; changing the
    constraints between stop and resume is one clear error."""
    from safetensors.torch import load_file

    full = _run(tmp_path / "full", tiny_model, 0, TWO)
    run_grpo(full)
    part = _run(tmp_path / "part", tiny_model, 3, TWO)
    with pytest.raises(Interrupted):
        run_grpo(part)
    wrong = _run(tmp_path / "part", tiny_model, 0, TWO.replace("name: length", "name: tokens"), "grpo.resume=true")
    with pytest.raises(
        UserError,
        match=r"holds multipliers for constraints \['length', 'unsafe'\]; this run has \['tokens', 'unsafe'\]",
    ):
        run_grpo(wrong)
    run_grpo(dataclasses.replace(part, grpo=dataclasses.replace(part.grpo, resume=True)))
    a, b = (
        history(tmp_path / "full" / "train" / "metrics.jsonl"),
        history(tmp_path / "part" / "train" / "metrics.jsonl"),
    )
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("lambda/unsafe", "lambda/length", "constraint/unsafe", "constraint/length", "loss", "grad_norm"):
            assert x[key] == y[key], (x["step"], key)
    last = checkpoint.load_state(tmp_path / "full" / "train" / "ckpt-5")["lagrange"]
    assert set(last) == {"unsafe", "length"} and last["length"]["step"] == 5
    wa, wb = (load_file(tmp_path / d / "train" / "final" / "model.safetensors") for d in ("full", "part"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # an old checkpoint (one multiplier's state, as written before constraints:) resumes the old safety section
    old_args = [
        "safety.enabled=true",
        "safety.constrain=violation_rate",
        "safety.cost_threshold=0.3",
        "safety.lambda_lr=1.0",
        "safety.lambda_init=0.5",
    ]
    one = _run(tmp_path / "one", tiny_model, 0, *old_args)
    run_grpo(one)
    cut = _run(tmp_path / "cut", tiny_model, 3, *old_args)
    with pytest.raises(Interrupted):
        run_grpo(cut)
    ckpt = tmp_path / "cut" / "train" / "ckpt-3"
    state = checkpoint.load_state(ckpt)
    state["lagrange"] = state["lagrange"]["safety"]  # the old format: LagrangeMultiplier.state_dict() itself
    torch.save(state, ckpt / "state.pt")
    run_grpo(dataclasses.replace(cut, grpo=dataclasses.replace(cut.grpo, resume=True)))
    a, b = history(tmp_path / "one" / "train" / "metrics.jsonl"), history(tmp_path / "cut" / "train" / "metrics.jsonl")
    assert [x["lambda"] for x in a] == [x["lambda"] for x in b] and len({x["lambda"] for x in a}) > 2


@pytest.mark.slow
def test_two_processes_move_every_multiplier_identically(tmp_path, tiny_model):
    """DDP on 2 CPU processes: each constraint's measure is averaged over the ranks before the dual step, so both
    ranks hold the same multipliers (the trainer compares them every step and stops on a mismatch) and they equal
    a one-process run of the same global batch (rollout.seed_per_prompt: the same samples). The unsafe constraint has
    a `where`: its measure is a sum and a count over both ranks' selected samples (their counts differ)."""
    import os
    import subprocess

    with_where = TWO.replace("delay: 1, name: unsafe}", "delay: 1, name: unsafe, where: {category: [math, benign]}}")
    assert with_where != TWO

    args = [
        str(QUICKSTART),
        "run.threads=1",
        "tracking.log_every=1",
        "safety.enabled=null",
        "grpo.steps=3",
        "grpo.prompts_per_step=4",
        "grpo.num_generations=4",
        "grpo.micro_batch_size=8",
        "grpo.lr=1e-2",
        "rollout.max_new_tokens=8",
        "rollout.seed_per_prompt=true",
        "rollout.backend=hf",
        f"model.name_or_path={tiny_model}",
        REWARDS,
        with_where,
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / str(n)
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"] if n == 2 else []
        proc = subprocess.run(
            [sys.executable, *launcher, "-m", "grpo", "train", *args, f"run.output_dir={out}"],
            env={**env, "ACCELERATE_USE_CPU": "true"} if n == 2 else env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "train" / "run_info.json").read_text())["world_size"] == n
        runs[n] = history(out / "train" / "metrics.jsonl")
    for one, two in zip(runs[1], runs[2]):
        for key in ("lambda/unsafe", "lambda/length", "constraint/unsafe", "constraint/length"):
            assert key in one and two[key] == pytest.approx(one[key], rel=1e-9), (one["step"], key)
    assert len({x["lambda/length"] for x in runs[2]}) == 3  # the multipliers moved


def test_report_has_a_panel_and_a_summary_line_per_constraint(tmp_path):
    """report.md: each constraint's measure against its threshold and lambda first -> last with the steps at its cap;
    report_constraints.png holds one panel per constraint plus the multipliers."""
    from grpo.report import constraint_figures, write_report

    (tmp_path / "train").mkdir()
    rows = [
        {
            "step": s,
            "reward": 0.1,
            "lambda/unsafe": min(0.5 * 1.2**s, 4.0),
            "constraint/unsafe": 0.5 - s / 40,
            "lambda/length": 1.0 / s,
            "constraint/length": 7.0 - s / 10,
        }
        for s in range(1, 21)
    ]
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train" / "config.yaml").write_text(
        "constraints:\n- {reward: odd_first_token_cost, kind: rate, threshold: 0.3, lambda_max: 4.0, name: unsafe, "
        "where: {category: harmful}}\n"
        "- {reward: completion_tokens, kind: mean, threshold: 6.0}\n"
    )
    rows_cfg = {
        "constraints": [
            {"reward": "x", "kind": "rate", "threshold": 0.3, "lambda_max": 4.0, "name": "unsafe"},
            {"reward": "rewards_for_tests:completion_tokens", "threshold": 6.0, "name": "length"},
        ]
    }
    assert len(constraint_figures(tmp_path, rows, rows_cfg)) == 1 and (tmp_path / "report_constraints.png").is_file()
    text = write_report(tmp_path).read_text()
    capped = sum(min(0.5 * 1.2**s, 4.0) >= 4.0 for s in range(1, 21))
    # first and last tenth of the steps: (.475 + .45) / 2 and (.025 + 0) / 2
    assert (
        "constraint **unsafe** (P(cost > 0) over category=harmful <= 0.300): measured 0.463 → 0.013; λ 0.600 → "
        "4.000, at its cap 4.000 in "
        f"{capped} of 20 steps" in text
    )
    # a constraint with no name is called after its reward (the name it is logged under); here nothing was logged for it
    assert "constraint **completion_tokens**" not in text and "report_constraints.png" in text


# ------------------------------------------------------------------------------------- where: the prompts it is about
def test_where_selects_rows_by_column():
    from grpo.config import where_matches

    assert where_matches(None, {"category": "math"})
    assert where_matches({"category": "harmful"}, {"category": "harmful", "x": 1})
    assert not where_matches({"category": "harmful"}, {"category": "benign"})
    assert where_matches({"category": ["benign", "harmful"]}, {"category": "benign"})
    assert not where_matches({"category": "harmful"}, {})  # a row without the column is not selected
    assert not where_matches({"category": "harmful", "split": 1}, {"category": "harmful", "split": 2})


@pytest.mark.parametrize(
    "where, needle",
    [
        ("{}", "constraints.0.where={}: give the prompts the constraint is about as dataset column: value"),
        ("{category: []}", "constraints.0.where={'category': []}: give the prompts"),
        ("{category: {a: 1}}", "constraints.0.where={'category': {'a': 1}}: give the prompts"),
    ],
)
def test_where_rules(tmp_path, where, needle):
    found = problems(tmp_path, REWARDS, f"constraints=[{{reward: completion_tokens, where: {where}}}]")
    assert len(found) == 1 and found[0].startswith(needle), found


def test_preflight_refuses_a_where_that_selects_no_training_prompt(tmp_path, tiny_model):
    from grpo.preflight import check

    r = recipe(tmp_path, tiny_model, REWARDS, "constraints=[{reward: completion_tokens, where: {category: harmfull}}]")
    with pytest.raises(UserError) as e:
        check(r, ["train"], 1)
    assert (
        "constraints.0.where={'category': 'harmfull'} selects none of the 2000 rows of data.train ('category' there: "
        "'benign', 'harmful', 'math'); fix the column or its values, or drop where to measure every prompt"
        in str(e.value)
    ), str(e.value)
    check(recipe(tmp_path, tiny_model, REWARDS, "constraints=[{reward: completion_tokens, where: {category: math}}]"),
          ["train"], 1)  # fmt: skip


def test_a_constraint_with_where_is_measured_and_applied_on_its_prompts_only(tmp_path, tiny_model):
    """`where: {category: harmful}`: the rate is over those prompts' samples only, a step without one
    leaves lambda alone and logs no measure, the cost enters no other group's advantage, and unsafe_rate stays the
    rate over every sample."""
    from grpo.pipeline import run_stage

    G, steps = 2, 8
    cats = {row["prompt"]: row["category"] for row in history(ROOT / "data" / "toyworld" / "grpo_train.jsonl")}
    con = (
        "constraints=[{reward: odd_first_token_cost, kind: rate, threshold: 0.3, lambda_init: 0.5, lambda_lr: 1.0, "
        "lambda_max: 4.0, name: unsafe, where: {category: harmful}}]"
    )
    r = recipe(tmp_path, tiny_model, f"grpo.steps={steps}", "grpo.lr=1e-2", "tracking.samples_every=1", REWARDS, con)
    run_stage(r, "train")
    h = history(tmp_path / "train" / "metrics.jsonl")
    samples = history(tmp_path / "train" / "samples.jsonl")
    lam = [x["lambda/unsafe"] for x in h]
    seen = {"measured": 0, "none": 0}
    for t in range(steps):
        rows = [x for x in samples if x["step"] == t + 1]
        mine = [x for x in rows if cats[x["prompt"]] == "harmful"]
        assert h[t]["unsafe_rate"] == pytest.approx(sum(x["odd_first_token_cost"] > 0 for x in rows) / len(rows))
        nxt = lam[t + 1] if t + 1 < steps else None
        if mine:
            seen["measured"] += 1
            rate = sum(x["odd_first_token_cost"] > 0 for x in mine) / len(mine)
            assert h[t]["constraint/unsafe"] == pytest.approx(rate), t
            if nxt is not None:
                assert nxt == pytest.approx(min(lam[t] * math.exp(rate - 0.3), 4.0), rel=1e-6), t
        else:
            seen["none"] += 1
            assert "constraint/unsafe" not in h[t] and "violation/unsafe" not in h[t], h[t]
            if nxt is not None:
                assert nxt == lam[t], t
        for g in range(0, len(rows), G):  # separate: A = (A_r - lam A_c) / (1 + lam), A_c = 0 outside the where
            grp = rows[g : g + G]
            col = lambda k: torch.tensor([x[k] for x in grp], dtype=torch.float64)  # noqa: E731
            norm = lambda x, floor: (x - x.mean()) / (x.std() + floor) if x.std() + floor > 0 else 0 * x  # noqa: E731
            unsafe = (col("odd_first_token_cost") > 0).double() * (cats[grp[0]["prompt"]] == "harmful")
            reward = col("even_tokens") + col("completion_tokens")  # the length is a plain reward here (weight 1)
            want = (norm(reward, 1e-4) - lam[t] * norm(unsafe, 0.0)) / (1 + lam[t])
            assert [x["advantage"] for x in grp] == pytest.approx(want.tolist(), abs=1e-4), (t, g)
    assert seen["measured"] and seen["none"], seen  # both kinds of step happened (else: change steps or seed)
    assert any(x.get("constraint/unsafe", x["unsafe_rate"]) != x["unsafe_rate"] for x in h)  # not the overall rate


def test_eval_measures_a_constraint_with_where_on_its_prompts_only(tmp_path):
    from grpo.evaluate import constraint_metrics

    con = (
        "constraints=[{reward: odd_first_token_cost, kind: rate, threshold: 0.3, name: unsafe, where: {category: "
        "harmful}}, {reward: completion_tokens, threshold: 5.0, name: length}]"
    )
    r = recipe(tmp_path, None, REWARDS, con)
    # columns: even_tokens, odd_first_token_cost, completion_tokens; two samples per prompt (the first one counts)
    R = torch.tensor([[0, 1.0, 4], [0, -1.0, 9], [0, 2.0, 6], [0, 1.0, 1], [0, -1.0, 2], [0, 1.0, 2]])
    rows = [{"category": "harmful"}, {"category": "math"}, {"category": "harmful"}]
    m = constraint_metrics(r, R, [0, 2, 4], rows)
    # unsafe over the two harmful prompts' first samples (costs 1.0 and -1.0); length over all three (4, 6, 2)
    assert m == {"constraint/unsafe": 0.5, "constraint/unsafe_ok": False, "constraint/length": 4.0,
                 "constraint/length_ok": True}  # fmt: skip
    m = constraint_metrics(r, R, [0, 2, 4], [{"category": "math"}] * 3)
    assert math.isnan(m["constraint/unsafe"]) and m["constraint/unsafe_ok"] is False
