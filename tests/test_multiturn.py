"""Multi-turn rollouts (grpo/rollout/multiturn.py, grpo/environments.py): token-exact trajectories, the loss mask,
the episode limits, tools and their failures, and the recipe's `environment` section checked before a run.

Token-exactness is the point: the ids the trainer scores are the ids the rollout sampled plus the observation ids
the environment inserted (never text tokenised again), and the sampler's logprobs of the sampled tokens equal a
fresh forward over prompt + trajectory.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TINY_BASE
from grpo.batch import Rollouts, loss_mask, micro_batches, split_rows
from grpo.config import EnvironmentConfig, ToolSpec, load_recipe
from grpo.environments import Tool, ToolEnv, environment_factory, parse_calls
from grpo.preflight import preflight
from grpo.rollout import Completion, SamplingParams, make_rollout
from grpo.rollout.multiturn import (
    EnvironmentContractError,
    TurnLimits,
    cut_at_stop_string,
    episode_metrics,
    run_episodes,
)

sys.path.insert(0, str(ROOT / "tests"))
import envs_for_tests as envs  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TINY_BASE).float().eval()
    return model, tok


def prompt_rows(tok, texts=("Q:12+34=", "Q:5+7=")):
    return [
        {"prompt_text": t, "prompt_ids": tok(t, add_special_tokens=False)["input_ids"], "answer": ""} for t in texts
    ]


def runs_of(c: Completion) -> list[tuple[int, list[int]]]:
    """(sampled?, ids) of each maximal run of sampled / inserted ids of a trajectory."""
    runs = []
    for t, m in zip(c.token_ids, c.sampled_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def params(tok, max_new_tokens=40, seed=3):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=(tok.eos_token_id,), seed=seed)


# ------------------------------------------------------------------------------------- token-exactness
# engine: continuation on the KV cache (the default); engine-reprefill: the history prefilled again every turn
BACKENDS = {"engine": ("engine", None), "engine-reprefill": ("engine", False), "hf": ("hf", None)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_trainer_scores_exactly_the_sampled_and_inserted_ids(toy, backend, shared_prefix):
    model, tok = toy
    rows, G, obs = prompt_rows(tok), 3, [7, 8, 9]
    made = []

    def make_env(row):
        made.append(envs.ScriptedEnv(row, obs=obs, answers=2))
        return made[-1]

    name, kv = BACKENDS[backend]
    comps, episodes = run_episodes(
        make_rollout(name, model, tok),
        tok,
        rows,
        [r["prompt_ids"] for r in rows],
        G,
        params(tok, 54),
        make_env,
        TurnLimits(max_turns=4),
        kv_continuation=kv,
    )
    assert len(comps) == len(rows) * G and [c.prompt_index for c in comps] == [0, 0, 0, 1, 1, 1]
    for c, env, ep in zip(comps, made, episodes):
        # the trajectory is: turn | obs | turn | obs | turn, each turn the ids the env was shown (the last one is not
        # shown when the token budget cut it), each obs the ids the env returned
        runs = runs_of(c)
        turns, inserted = [ids for m, ids in runs if m], [ids for m, ids in runs if not m]
        assert [m for m, _ in runs] == [1, 0] * len(inserted) + [1] and all(ids == obs for ids in inserted)
        assert env.steps == turns or (ep.truncated == "budget" and env.steps == turns[:-1])
        assert len(c.logprobs) == len(c.token_ids) and all(
            lp == 0.0 for lp, m in zip(c.logprobs, c.sampled_mask) if not m
        )
        assert ep.turns == len(turns) and ep.observation_tokens == len(obs) * len(inserted)
        if ep.truncated is None:
            assert ep.turns == 3 and ep.env_reward == 3.0
    # the trainer's view: the fed ids are prompt + trajectory, the loss covers the sampled ids only
    scores = torch.zeros(len(comps), 0)
    r = Rollouts(rows, comps, [""] * len(comps), scores, torch.ones(len(comps), dtype=torch.bool), episodes=episodes)
    mask = loss_mask(comps, r.ok, mask_truncated=False)
    for i, c in enumerate(comps):
        assert (
            mask[i, : len(c.token_ids)].tolist() == [float(m) for m in c.sampled_mask]
            and not mask[i, len(c.token_ids) :].any()
        )
    (mb,) = micro_batches(
        r,
        mask,
        torch.zeros(len(comps)),
        split_rows(r, size=len(comps)),
        shared_prefix=shared_prefix,
        pad_id=tok.pad_token_id,
        device="cpu",
    )
    if shared_prefix:
        fed = mb.layout.input_ids[0].tolist()
        assert fed == rows[0]["prompt_ids"] + sum((c.token_ids for c in comps[:G]), []) + rows[1]["prompt_ids"] + sum(
            (c.token_ids for c in comps[G:]), []
        )
    else:
        for i, c in enumerate(comps):
            assert mb.layout.completion_ids[i, : len(c.token_ids)].tolist() == c.token_ids
    with torch.no_grad():
        trained = mb.logprobs(model, 1.0)
    for i, c in enumerate(comps):
        # a fresh forward over prompt + trajectory, nothing shared with the rollout or the packed layout
        ids = torch.tensor([rows[c.prompt_index]["prompt_ids"] + c.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, -len(c.token_ids) - 1 : -1].float()
        fresh = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        sampled = torch.tensor(c.sampled_mask, dtype=torch.bool)
        assert torch.allclose(torch.tensor(c.logprobs)[sampled], fresh[sampled], atol=1e-4)
        assert torch.allclose(trained[i, : len(c.token_ids)][sampled], fresh[sampled], atol=1e-4)


@pytest.mark.parametrize("stop_strings", [(), ("+1",)], ids=["stop-ids", "stop-string-cuts"])
def test_greedy_trajectories_are_the_same_on_every_path(toy, stop_strings):
    """Continuing on the KV cache samples what prefilling the whole history samples (engine and hf), with a first
    observation from reset, turns cut at a multi-token stop string (the engine rewinds the row's KV) and samples
    that end at different turns."""
    model, tok = toy
    rows = prompt_rows(tok, ("Q:12+34=", "Q:5+7=", "Q:99+1="))

    def make_env(row):  # prompt i takes i + 1 turns
        return envs.ScriptedEnv(row, obs=[7, 8, 9], answers=rows.index(row), first=[5, 6])

    out, logprobs, texts = {}, {}, {}
    for backend, (name, kv) in BACKENDS.items():
        p = SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
        limits = TurnLimits(max_turns=4, stop_strings=stop_strings)
        comps, eps = run_episodes(
            make_rollout(name, model, tok),
            tok,
            rows,
            [r["prompt_ids"] for r in rows],
            2,
            p,
            make_env,
            limits,
            kv_continuation=kv,
        )
        out[backend] = [
            (c.token_ids, c.sampled_mask, c.finish_reason, e.turns, e.truncated) for c, e in zip(comps, eps)
        ]
        logprobs[backend] = torch.tensor(sum((c.logprobs for c in comps), []))
        texts[backend] = [e.turn_texts for e in eps]
    assert out["engine"] == out["engine-reprefill"] == out["hf"]
    assert torch.allclose(logprobs["engine"], logprobs["hf"], atol=1e-4)
    assert sorted({turns for *_, turns, _ in out["engine"]}) == [1, 2, 3]
    if stop_strings:  # some turn was cut at the stop string and the episode went on after it
        assert any(t.endswith("+1") for turns in texts["engine"] for t in turns[:-1])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_same_seed_same_trajectories_and_groups_may_take_different_turns(toy, backend):
    model, tok = toy
    rows = prompt_rows(tok)

    class Coin(envs.ScriptedEnv):  # a second turn only when the first turn's length is even
        def step(self, text, ids):
            self.steps.append(list(ids))
            return [11, 12] if len(self.steps) == 1 and len(ids) % 2 == 0 else None

    def run(rows, seeds):
        name, kv = BACKENDS[backend]
        return run_episodes(
            make_rollout(name, model, tok),
            tok,
            rows,
            [r["prompt_ids"] for r in rows],
            8,
            params(tok),
            Coin,
            TurnLimits(max_turns=3),
            seeds=seeds,
            kv_continuation=kv,
        )

    (a, ea), (b, _) = run(rows, [5, 6]), run(rows, [5, 6])
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert {e.turns for e in ea} == {1, 2}  # samples of one step took different numbers of turns
    # rollout.seed_per_prompt: a group samples the same alone as beside other prompts (so any process count does)
    alone, _ = run(rows[1:], [6])
    assert [c.token_ids for c in alone] == [c.token_ids for c in a[8:]]


def test_stop_string_cuts_the_turn_after_the_token_that_completes_it(toy):
    _, tok = toy
    ids = tok("7+8=15,4+3+1=8", add_special_tokens=False)["input_ids"]
    k = cut_at_stop_string(tok, ids, ["=8", "1=8"])
    assert tok.decode(ids[:k]) == "7+8=15,4+3+1=8"  # the first prefix holding any of them
    assert tok.decode(ids[: cut_at_stop_string(tok, ids, ["15,"])]) == "7+8=15,"
    assert cut_at_stop_string(tok, ids, ["zz"]) is None


# ------------------------------------------------------------------------------------- the loss mask
def test_loss_mask_excludes_observation_tokens_by_hand():
    comps = [
        Completion(0, [5, 6, 7, 8, 9], [0.0] * 5, "stop", sampled_mask=[1, 1, 0, 0, 1]),
        Completion(0, [5, 6], [0.0] * 2, "stop"),  # single-turn: all sampled
        Completion(1, [1, 2, 3], [0.0] * 3, "length", sampled_mask=[1, 0, 1]),
        Completion(1, [4, 4, 4, 4], [0.0] * 4, "stop", sampled_mask=[0, 1, 1, 1]),
    ]
    ok = torch.tensor([True, True, True, False])
    assert loss_mask(comps, ok, mask_truncated=False).tolist() == [
        [1, 1, 0, 0, 1],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0] * 5,
    ]
    assert loss_mask(comps, ok, mask_truncated=True)[2].tolist() == [0] * 5


def test_observation_tokens_carry_no_gradient(toy):
    from grpo.losses import policy_loss

    model, tok = toy
    c = Completion(0, [10, 11, 12, 13, 14, 15], [0.0] * 6, "stop", sampled_mask=[1, 1, 0, 0, 0, 1])
    r = Rollouts(prompt_rows(tok, ["Q:1+1="]), [c], [""], torch.zeros(1, 0), torch.ones(1, dtype=torch.bool))
    mask = loss_mask([c], r.ok, False)
    (mb,) = micro_batches(r, mask, torch.ones(1), [[0]], shared_prefix=True, pad_id=0, device="cpu")
    logp = mb.logprobs(model, 1.0)
    probe = torch.zeros_like(logp, requires_grad=True)
    loss, _ = policy_loss(
        logp.detach() + probe, None, mb.advantages, mb.mask, loss_type="grpo", beta=0.04, ref_logp=logp.detach() - 0.3
    )
    loss.backward()
    assert probe.grad[0, 2:5].abs().sum() == 0 and probe.grad[0, [0, 1, 5]].abs().min() > 0


# ------------------------------------------------------------------------------------- limits
def test_max_turns_truncates_an_episode_that_still_asks_for_more(toy):
    model, tok = toy
    rows = prompt_rows(tok)
    comps, eps = run_episodes(
        make_rollout("hf", model, tok),
        tok,
        rows,
        [r["prompt_ids"] for r in rows],
        2,
        params(tok, 60),
        lambda row: envs.ScriptedEnv(row, obs=[7, 8], answers=99),
        TurnLimits(max_turns=2),
    )
    for c, e in zip(comps, eps):
        assert e.turns == 2 and e.truncated == "max_turns" and c.finish_reason == "length"
        assert (
            c.sampled_mask[-1] == 1 and sum(1 for m in c.sampled_mask if m == 0) == 2
        )  # one observation, none at the end
    assert episode_metrics(eps, comps)["episode/truncated_frac"] == 1.0


def test_token_budget_and_observation_cap(toy):
    model, tok = toy
    rows, budget = prompt_rows(tok), 30
    comps, eps = run_episodes(
        make_rollout("engine", model, tok),
        tok,
        rows,
        [r["prompt_ids"] for r in rows],
        4,
        params(tok, budget),
        lambda row: envs.ScriptedEnv(row, obs=list(range(10, 30)), answers=99),
        TurnLimits(max_turns=10, max_observation_tokens=6, max_tokens_per_turn=5),
    )
    for c, e in zip(comps, eps):
        assert len(c.token_ids) <= budget and e.truncated == "budget" and c.finish_reason == "length"
        runs = "".join(map(str, c.sampled_mask)).split("1")
        assert max(len(x) for x in runs) == 6  # every observation cut to 6 tokens
        assert max(len(x) for x in "".join(map(str, c.sampled_mask)).split("0")) <= 5  # turns of at most 5 tokens
        assert e.observation_cut == e.turns - 1 or e.observation_cut == e.turns


# ------------------------------------------------------------------------------------- tools
def tool_env(*specs, timeout_s=5.0, **settings):
    cfg = EnvironmentConfig(
        name="tools", tools=[ToolSpec(n, k) for n, k in specs], tool_timeout_s=timeout_s, kwargs=settings
    )
    return environment_factory(cfg)({})


def test_tool_calls_are_parsed_in_both_formats():
    text = (
        'x<tool_call>{"name": "divide", "arguments": {"a": 6, "b": 3}}</tool_call>'
        "<tool_call>divide(8, b=2)</tool_call><tool_call>calculator(12*(3+4))</tool_call><tool_call>oops"
    )
    assert parse_calls(text) == [
        ("divide", {"a": 6, "b": 3}, None),
        ("divide", {"__args__": [8], "b": 2}, None),
        ("calculator", "12*(3+4)", None),
        (None, None, "unterminated <tool_call> (no </tool_call>)"),
    ]
    env = tool_env(("envs_for_tests:divide", {}), ("calculator", {}))
    assert env.step(text, []) == (
        "<tool_response>2.0</tool_response><tool_response>4.0</tool_response>"
        "<tool_response>84</tool_response><tool_response>error: unterminated <tool_call> "
        "(no </tool_call>)</tool_response>"
    )
    assert (env.tool_calls, env.tool_failures) == (4, 1)
    assert env.step("the answer is 4", []) is None  # no tool call: the episode is done


def test_a_raising_or_slow_tool_becomes_an_observation():
    env = tool_env(("envs_for_tests:divide", {}), ("envs_for_tests:slow", {}), timeout_s=0.2)
    obs = env.step(
        "<tool_call>divide(1, 0)</tool_call><tool_call>slow('x')</tool_call><tool_call>nope()</tool_call>", []
    )
    assert obs == (
        "<tool_response>error: ZeroDivisionError: division by zero</tool_response>"
        "<tool_response>error: TimeoutError: tool 'slow' timed out after 0.2 s</tool_response>"
        "<tool_response>error: unknown tool 'nope'; tools: divide, slow</tool_response>"
    )
    assert (env.tool_calls, env.tool_failures) == (3, 3)


def test_a_raising_tool_inside_a_rollout_is_seen_by_the_model(toy):
    model, tok = toy

    class Caller(ToolEnv):  # the tiny model cannot write tool calls: the turn's text is replaced by one
        def step(self, text, ids):
            return super().step("<tool_call>divide(1, 0)</tool_call>", ids) if self.tool_calls == 0 else None

    factory = environment_factory(EnvironmentConfig(name="tools", tools=[ToolSpec("envs_for_tests:divide")]))
    rows = prompt_rows(tok)
    comps, eps = run_episodes(
        make_rollout("hf", model, tok),
        tok,
        rows,
        [r["prompt_ids"] for r in rows],
        2,
        params(tok, 50),
        lambda row: Caller(row, tools=factory.keywords["tools"], observation_template="{result}"),
        TurnLimits(max_observation_tokens=8),
    )
    seen = tok.encode("error: ZeroDivisionError: division by zero", add_special_tokens=False)[:8]  # cut to 8 tokens
    for c, e in zip(comps, eps):
        assert [ids for m, ids in runs_of(c) if not m] == [seen] and e.observation_cut == 1
        assert e.turns == 2 and e.tool_failures == 1
    assert episode_metrics(eps, comps)["episode/tool_failure_rate"] == 1.0


def test_tool_schema_from_docstring_and_hints_without_bound_settings():
    t = Tool(envs.search, {"top_k": 2})
    fn = t.schema["function"]
    assert fn["name"] == "search" and list(fn["parameters"]["properties"]) == ["query"]
    assert fn["parameters"]["properties"]["query"] == {"type": "string", "description": "what to look for"}
    assert t.fn("q") == ["q-0", "q-1"]


def test_an_environment_that_breaks_its_contract_stops_the_run_naming_it(toy):
    model, tok = toy
    rows = prompt_rows(tok)
    for env, message in [
        (envs.RaisingEnv, "environment RaisingEnv.step raised KeyError: 'boom'"),
        (envs.BadObservationEnv, "environment BadObservationEnv.step returned dict"),
    ]:
        with pytest.raises(EnvironmentContractError) as e:
            run_episodes(
                make_rollout("hf", model, tok),
                tok,
                rows,
                [r["prompt_ids"] for r in rows],
                2,
                params(tok),
                env,
                TurnLimits(),
            )
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_chat_message_observations_are_rendered_by_the_template():
    from grpo.rollout.multiturn import render_messages

    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    tok.chat_template = (
        "{%- for m in messages -%}<{{ m['role'] }}>{{ m['content'] }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
    )
    assert render_messages(tok, [{"role": "tool", "content": "42"}]) == "<tool>42<assistant>"


def test_tools_reach_the_prompt_through_the_chat_templates_tools_argument():
    from grpo.config import DataConfig
    from grpo.data import prompt_records
    from grpo.environments import tool_schemas

    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    tok.chat_template = (
        "{%- if tools -%}[{%- for t in tools -%}{{ t['function']['name'] }}({{ t['function']['parameters']"
        "['properties'] | list | join(',') }});{%- endfor -%}]{%- endif -%}"
        "{%- for m in messages -%}Q:{{ m['content'] }}{%- endfor -%}"
    )
    cfg = EnvironmentConfig(
        name="tools", tools=[ToolSpec("calculator"), ToolSpec("envs_for_tests:search", {"top_k": 2})]
    )
    (rec,), _ = prompt_records(
        [{"prompt": "1+1="}], "prompt", DataConfig(apply_chat_template=True), tok, tools=tool_schemas(cfg)
    )
    assert rec["prompt_text"] == "[calculator(expression);search(query);]Q:1+1="
    assert tool_schemas(EnvironmentConfig()) is None


# ------------------------------------------------------------------------------------- the recipe
def quick(tmp_path, *overrides):
    return load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.threads=1",
            "safety.enabled=false",
            "rewards=[{name: accuracy}]",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["environment.name=tools", "environment.tools=[nope]"],
            "environment.tools.0: unknown tool 'nope'; valid: calculator",
        ),
        (
            ["environment.name=tools", "environment.tools=[envs_for_tests:missing]"],
            "environment.tools.0: tool 'envs_for_tests:missing': 'envs_for_tests' has no attribute 'missing'",
        ),
        (
            ["environment.name=tools", "environment.tools=[envs_for_tests:no_docstring]"],
            "environment.tools.0 (envs_for_tests:no_docstring): cannot build its JSON schema",
        ),
        (
            ["environment.name=tools", "environment.tools=[{name: calculator, precision: 2}]"],
            "environment.tools.0 (calculator): unknown setting(s) precision; it accepts expression",
        ),
        (
            ["environment.name=tools", "environment.obsevation_template={result}"],
            "environment.name='tools': unknown environment setting(s) obsevation_template; it accepts "
            "observation_template, chat besides",
        ),
        (
            ["environment.name=examples.tools.calculator:ToyToolEnv", "environment.chatt=true"],
            "environment.name='examples.tools.calculator:ToyToolEnv': unknown environment setting(s) chatt; it "
            "accepts observation_template, chat besides",
        ),
        (["environment.name=nowhere"], "environment: unknown environment 'nowhere'; valid: tools"),
        (["environment.name=tools", "environment.max_turns=0"], "environment.max_turns=0 must be >= 1"),
        (["environment.tools=[calculator]"], "environment.tools is set but environment.name is not"),
    ],
)
def test_bad_environment_fails_in_preflight_with_one_line(tmp_path, overrides, message):
    problems = preflight(quick(tmp_path, *overrides), "train", 1)
    assert any(p.startswith(message) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_environment_section_round_trips_and_episode_columns_pass_preflight(tmp_path):
    r = quick(
        tmp_path,
        "environment.name=tools",
        "environment.tools=[calculator, {name: 'envs_for_tests:search', top_k: 2}]",
        "environment.chat=true",
        "rewards=[{name: environment}, {name: accuracy}]",
    )
    assert r.environment.tools[1].kwargs == {"top_k": 2} and r.environment.kwargs == {"chat": True}
    assert preflight(r, "train", 1) == []
    from grpo.recipe_yaml import recipe_to_dict

    assert recipe_to_dict(r)["environment"]["tools"][1] == {"name": "envs_for_tests:search", "top_k": 2}


def test_grpo_trains_on_multi_turn_trajectories(tmp_path):
    from grpo.trainer import run_grpo

    r = quick(
        tmp_path,
        f"model.name_or_path={TINY_BASE}",
        "grpo.steps=2",
        "grpo.prompts_per_step=2",
        "grpo.num_generations=4",
        "rollout.max_new_tokens=40",
        "grpo.beta=0.04",
        "grpo.num_iterations=2",
        "environment.name=envs_for_tests:ScriptedEnv",
        "environment.obs='<a>1</a>'",
        "environment.answers=1",
        "environment.stop_strings=[]",
        f"rollout.dump_dir={tmp_path}/dump",
        "rewards=[{name: environment}, {name: accuracy}]",
    )
    run_grpo(r)
    h = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(h) == 2
    for key in ("episode/turns", "episode/tool_calls", "episode/truncated_frac", "episode/observation_token_share"):
        assert key in h[-1]
    assert 1.0 <= h[-1]["environment"] <= 2.0 and h[-1]["episode/observation_token_share"] > 0
    from grpo.batch import load_rollouts

    _, comps = load_rollouts(f"{tmp_path}/dump", 1, 0)
    assert all(c.sampled_mask is not None for c in comps) and any(0 in c.sampled_mask for c in comps)


def test_eval_runs_the_same_environment(tmp_path, toy):
    from grpo.evaluate import eval_records, evaluate_policy
    from grpo.scoring import build_rewards

    model, tok = toy
    r = quick(
        tmp_path,
        "environment.name=envs_for_tests:ScriptedEnv",
        "environment.obs=[7, 8]",
        "environment.answers=1",
        "eval.limit=6",
        "eval.max_new_tokens=40",
        "rewards=[{name: environment}, {name: accuracy}]",
    )
    records = eval_records(r, tok)
    m, samples = evaluate_policy(r, make_rollout("hf", model, tok), tok, records, build_rewards(r.rewards))
    assert m["n"] == 6 and len(samples) == 6
    assert 1.0 < m["episode/turns"] <= 2.0 and m["episode/observation_token_share"] > 0
