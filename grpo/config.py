"""Recipe configuration: one small dataclass per YAML section.

A recipe is a YAML mapping whose top-level keys are the sections below (`run`, `model`, `data`,
`sft`, `rollout`, `grpo`, `safety`, `constraints`, `rewards`, `environment`, `rm`, `eval`, `tracking`); keys inside a
section are the dataclass field names. Unknown or mistyped keys, wrong types and YAML errors raise
`UserError` with one line naming the file, the key path and the valid keys. Command-line overrides
`a.b=value` (value parsed as YAML, so `grpo.lr=1e-5`, `run.stages=[sft,eval]`, `rewards.0.weight=2`)
are applied before validation. Recipes are read with `yaml.safe_load`: YAML tags never execute.

Relative paths in a recipe are relative to the directory you run the command from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from grpo.errors import UserError, first_line
from grpo.recipe_yaml import MAX_DEPTH, apply_override, build, check_size, field_names


# ---------------------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    """Where a run goes and what it runs."""

    output_dir: str = "runs/quickstart"  # each stage writes into output_dir/<stage>
    stages: list[str] = field(default_factory=lambda: ["sft", "train", "eval"])  # for `pipeline`
    seed: int = 0  # seeds python, numpy, torch, data order and sampling
    threads: int | None = None  # torch CPU threads per process; None = torch's default
    # allow writing into a stage folder that already holds a run (its final model and GRPO checkpoints are replaced)
    overwrite: bool = False


@dataclass
class LoraConfig:
    """LoRA through peft. `target_modules` is a list of module names or "all-linear"."""

    enabled: bool = False  # train a LoRA adapter instead of all weights
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling: the update is (alpha / r) * B @ A
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: Union[str, list[str]] = "all-linear"  # module names (e.g. [q_proj, v_proj]) or all-linear
    merge_on_save: bool = False  # also write a merged full model next to the adapter


@dataclass
class ModelConfig:
    """The policy: a local folder or a Hugging Face hub id."""

    name_or_path: str = "data/tiny_base"  # local folder (full model or LoRA adapter) or hub id
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None  # hub branch, tag or commit
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # weights and compute dtype
    trust_remote_code: bool = False  # runs code from the model repo: only for repos you trust
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # bf16/fp16 weights: run the output layer in fp32 (weights stay as they are, upcast per call), for the sampler
    # and the trainer alike: logits and log-probs without bf16 rounding (lower mismatch_kl)
    fp32_lm_head: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    """Datasets: a .jsonl/.json/.parquet file, a folder of them, or a hub dataset name[:split]."""

    sft_train: str | None = "data/toyworld/sft_train.jsonl"
    sft_eval: str | None = "data/toyworld/sft_eval.jsonl"
    train: str | None = "data/toyworld/grpo_train.jsonl"  # GRPO prompts (+ columns for rewards)
    eval: str | None = "data/toyworld/eval.jsonl"  # held-out prompts for `eval`
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat datasets: a list of {role, content}
    apply_chat_template: bool = False  # wrap string prompts as a user message in the tokenizer's chat template
    system_prompt: str | None = None  # with apply_chat_template (or chat data): prepended as a system message
    # SFT on chat `messages` with several assistant turns: all = every assistant turn is a target (user, system and
    # tool messages and the template's scaffolding are context), last = only the final one (the rest is the prompt)
    assistant_turns: Literal["all", "last"] = "all"
    max_prompt_length: int = 256  # in tokens
    prompt_overflow: Literal["truncate_left", "drop", "error"] = "truncate_left"


@dataclass
class SFTConfig:
    """Supervised fine-tuning: loss on completion tokens only."""

    steps: int = 100  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step per process (before accumulation)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay (not on biases and norms)
    # adamw: torch's default AdamW kernel; adamw_fused: one fused kernel per step, no step-sized temporaries
    # (README "Optimizer"; results differ from adamw in the last bits)
    optim: Literal["adamw", "adamw_fused"] = "adamw"
    warmup_steps: int = 0  # linear warmup steps
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    max_length: int = 128  # longer examples are truncated on the right
    packing: bool = False  # concatenate examples into max_length rows (attention stays per example)
    eval_every: int = 50  # steps between eval-loss measurements on data.sft_eval (0 = only after the last step)


@dataclass
class RolloutConfig:
    """Generation during GRPO (and sampling in eval)."""

    backend: str = "engine"  # engine | hf
    max_new_tokens: int = 32  # completion length limit (finish_reason "length" beyond it)
    temperature: float = 1.0  # sampling temperature; logprobs in the loss use the same one
    top_p: float = 1.0  # nucleus sampling (1 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    min_new_tokens: int = 0  # stop tokens are suppressed before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # eos is always a stop token
    # Seed each prompt's group from (seed, step, prompt id) and generate it on its own: samples then do not
    # depend on the process count or batch composition (reproducible across world sizes), at the cost
    # of batching across prompts.
    seed_per_prompt: bool = False
    # engine: a static-shape decode step (bucketed rows, preallocated buffers, no host sync), captured in CUDA
    # graphs on a GPU (4.1x eager tokens/s on an H100, benchmarks/README.md); auto = on with CUDA, off on CPU
    static_decode: Union[bool, str] = "auto"
    # write each step's rollouts (prompts, completion ids and logprobs, rewards, advantages) to this folder, one
    # gzipped JSON per step and process; `grpo train --replay DIR` trains on such a folder without generating
    dump_dir: Optional[str] = None
    replay_dir: Optional[str] = None
    max_batch: int = 128  # engine: sample rows decoded together (prompt slots = max_batch // G)


@dataclass
class GRPOConfig:
    """The GRPO loop. Defaults follow DeepSeekMath's GRPO; variants (DAPO, Dr. GRPO, GSPO) are opt-in."""

    steps: int = 200  # optimizer steps = generation rounds (x num_iterations)
    prompts_per_step: int = 4  # across all processes; each prompt's group stays on one process
    num_generations: int = 8  # G, completions per prompt
    micro_batch_size: int = 32  # sequences per forward/backward
    # instead of micro_batch_size: a budget of packed tokens per forward/backward (each prompt once + completion
    # tokens), groups kept whole where they fit, longest first; not under DeepSpeed (fixed accumulation steps)
    micro_batch_tokens: Optional[int] = None
    # compute each group's prompt once in the training forward/backward (grpo/prefix.py: exact, no padding);
    # false = the plain padded forward, G copies of the prompt
    shared_prefix: bool = True
    num_iterations: int = 1  # passes over each batch (mu); old logprobs are computed only if > 1
    lr: float = 1e-5  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    # adamw: torch's default AdamW kernel; adamw_fused: one fused kernel per step, no step-sized temporaries
    # (README "Optimizer"; results differ from adamw in the last bits)
    optim: Literal["adamw", "adamw_fused"] = "adamw"
    warmup_steps: int = 0  # linear warmup steps
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"  # decay after warmup
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    beta: float = 0.0  # KL to the reference policy; 0 = no reference model at all
    epsilon_low: float = 0.2  # clip ratio below at 1 - epsilon_low
    epsilon_high: float = 0.2  # clip ratio above at 1 + epsilon_high (DAPO clip-higher: 0.28)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    importance_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    scale: str = "group"  # advantage scaling: group | batch | none (Dr. GRPO)
    reward_mode: str = "sum"  # sum | normalize_then_sum (GDPO)
    # with costs (constraints): separate = normalise the reward and each cost per group, then combine
    # (A_r - sum lam_k A_k) / (1 + sum lam_k); active = separate, each group divided by 1 + the lam_k of the costs
    # that vary in it (groups the constraints do not touch keep their full reward advantage); scalarized = combine
    # r - sum lam_k c_k, then normalise once
    constraint_scheme: Literal["separate", "active", "scalarized"] = "separate"
    eps: float = 1e-4  # added to the std when normalising advantages
    # DAPO dynamic sampling: drop groups whose G rewards are all equal (no learning signal) and refill the
    # batch with fresh prompts, at most max_generation_rounds generation rounds per step
    dynamic_sampling: bool = False
    max_generation_rounds: int = 3
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens get no loss (DAPO)
    # rollout/training mismatch (logged every step as mismatch_kl): tis = truncated importance sampling,
    # each token's surrogate weighted by min(pi_train / pi_rollout, rollout_is_cap) (grpo.losses.rollout_correction)
    rollout_is: Literal["none", "tis"] = "none"
    rollout_is_cap: float = 2.0
    on_reward_error: Literal["raise", "skip"] = "raise"  # a failing reward stops the run, or its samples are skipped
    # held-out eval (data.eval, the eval section's settings) on the live policy every N steps (0 = off), logged as
    # eval/<metric> in metrics.jsonl, the trackers and the report; eval_before_train adds step 0
    eval_every: int = 0
    eval_before_train: bool = False
    keep_best: Optional[str] = None  # an eval metric (e.g. eval/accuracy): keep the best model so far in <stage>/best
    keep_best_mode: Literal["max", "min"] = "max"
    final_from: Literal["last", "best"] = "last"  # final/ holds the last model, or the best one (needs keep_best)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    resume: Union[bool, str] = False  # true = latest checkpoint in the stage folder, or a path
    # stop after this many steps in a row in which no reward applied to any sample (every reward returned None:
    # no learning signal); 0 = never stop. The first such step is warned about at once.
    max_steps_without_reward: int = 10


@dataclass
class SafetyConfig:
    """The switch of the constraints, and the one safety constraint of recipes written before `constraints:`
    (Safe-RLHF's Lagrangian on GRPO advantages, critic-free: E[cost] <= cost_threshold on the role: safety reward).
    With a `constraints:` list the keys below `enabled` stay unset: each constraint has its own."""

    # true: the safety constraint is on (a role: safety reward is needed; without a constraints: list the keys below
    # define it); false: every constraint is off (a baseline); null: on when constraints: lists any
    enabled: bool | None = None
    cost_threshold: float = 0.0  # the budget d in E[cost] <= d (0 = the cost model's safety boundary)
    lambda_init: float = 1.0  # initial Lagrange multiplier
    lambda_lr: float = 0.05  # step size of log(lambda) per step: log_lam += lambda_lr * (mean_cost - d)
    lambda_max: float = 20.0  # upper clamp of lambda
    lambda_delay: int = 0  # steps before lambda starts to move
    # what E[.] <= cost_threshold constrains: the mean cost (Safe-RLHF), or the fraction of samples with
    # cost > 0, i.e. judged unsafe by the cost model (a chance constraint; robust to the cost's scale)
    constrain: Literal["mean_cost", "violation_rate"] = "mean_cost"
    # cost advantages are (c - group mean) / (group std + cost_std_floor), in the cost's units: groups whose
    # cost barely varies (all safe) get ~0 instead of amplified noise, groups with a real safe/unsafe
    # split get ~unit scale like the reward advantages
    cost_std_floor: float = 1.0


@dataclass
class ConstraintSpec:
    """One constraint: E[c] <= threshold (kind mean) or P(c > 0) <= threshold (kind rate), c the value of the reward it
    names (a cost: higher is worse; it leaves the reward sum). Each has its own Lagrange multiplier."""

    # the constrained reward: its name in `rewards`, as written or as logged (e.g. safety, completion_tokens)
    reward: str = ""
    threshold: float = 0.0  # the budget d
    kind: Literal["mean", "rate"] = "mean"  # mean: E[c] <= d; rate: P(c > 0) <= d (a chance constraint)
    # what enters the advantage: auto = the indicator c > 0 for kind rate (how far below 0 a safe sample's cost lies
    # then does not matter), the cost itself for kind mean; cost / indicator force one
    signal: Literal["auto", "cost", "indicator"] = "auto"
    lambda_init: float = 1.0  # initial multiplier
    lambda_lr: float = 0.05  # each step: log(lambda) += lambda_lr * (measured - threshold)
    lambda_max: float = 20.0  # upper clamp of lambda
    delay: int = 0  # steps before lambda starts to move
    # lambda follows a moving average of the measure, this weight on the past (0.9: ~10 steps); 0 = each step's own
    smoothing: float = 0.0
    # grpo.constraint_scheme separate: the cost's advantage is (c - group mean) / (group std + std_floor); null = 1.0
    # for the cost (damps a cost model's noise where every sample is safe), 0 for the indicator (exact 0/1: nothing to
    # damp, and a floor of 1 shrank its signal ~3x: too weak to enforce a rate on the quickstart, README)
    std_floor: float | None = None
    name: str | None = None  # in metrics (lambda/<name>), the report and eval; default: the reward's logged name
    # the prompts the constraint is about, by dataset column: {category: harmful} or {category: [a, b]}; the measure
    # is taken over their samples only (a step without one leaves lambda alone), and the cost enters the advantage
    # of their groups only; null = every prompt (a sample whose cost is None counts as 0)
    where: dict[str, Any] | None = None


@dataclass
class RewardSpec:
    """One reward: a registered name or `package.module:function`; other keys are its kwargs."""

    EXTRA_KEYS_ARE_KWARGS: ClassVar[str] = "a registered reward or package.module:function"  # what `name` names
    name: str  # registered name, package.module:function, or a reward-model folder / hf:<hub id>
    weight: float = 1.0  # weight in the reward sum
    role: Literal["reward", "usefulness", "safety"] = "reward"  # safety = a cost (higher is less safe)
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other key of the entry is passed to the reward
    # seconds one call may take before the run stops naming the reward (or, under grpo.on_reward_error: skip, the
    # call's samples are skipped); null = no limit
    timeout_s: float | None = 600.0


@dataclass
class ToolSpec:
    """One tool: a registered name or `package.module:function`; other keys are settings bound to it (not in its
    schema)."""

    EXTRA_KEYS_ARE_KWARGS: ClassVar[str] = "a registered tool or package.module:function"
    SHORTHAND_KEY: ClassVar[str] = "name"  # `tools: [calculator]`
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other key of the entry is passed to the tool


@dataclass
class EnvironmentConfig:
    """Multi-turn rollouts (grpo.environments, grpo.rollout.multiturn); off while `name` is null.

    The whole trajectory (sampled + observation tokens) is limited by rollout.max_new_tokens."""

    EXTRA_KEYS_ARE_KWARGS: ClassVar[str] = "a registered environment or package.module:Class"
    name: Optional[str] = (
        None  # tools (the built-in tool-calling environment), a registered name or package.module:Class
    )
    tools: list[ToolSpec] = field(default_factory=list)  # for name: tools
    max_turns: int = 4  # model turns per episode; an episode still asking for more is truncated
    max_tokens_per_turn: Optional[int] = None  # sampled tokens per turn (null = what is left of the budget)
    max_observation_tokens: int = 256  # an observation's tokens beyond this are cut
    stop_strings: list[str] = field(default_factory=lambda: ["</tool_call>"])  # end a turn (besides the stop tokens)
    tool_timeout_s: Optional[float] = 10.0  # a tool call taking longer answers with a timeout error
    kwargs: dict[str, Any] = field(default_factory=dict)  # any other key is a setting of the environment


@dataclass
class RMConfig:
    """Reward/cost-model training (`grpo rm`, grpo/rm.py). A model whose *_train is null is skipped."""

    usefulness_train: str | None = "data/toyworld/rm_usefulness_train.jsonl"  # prompt, chosen, rejected
    usefulness_eval: str | None = "data/toyworld/rm_usefulness_eval.jsonl"
    safety_train: str | None = "data/toyworld/rm_safety_train.jsonl"  # + chosen_is_safe, rejected_is_safe
    safety_eval: str | None = "data/toyworld/rm_safety_eval.jsonl"
    base: str | None = None  # model to start from; defaults to model.name_or_path
    template: str = "concat"  # classifier input: concat | chat | pair | completion | "...{prompt}...{completion}"
    steps: int = 60  # per model; the toy world's pairs are learned (>95% held out) in ~30-60 steps
    batch_size: int = 32  # preference pairs per optimizer step per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    optim: Literal["adamw", "adamw_fused"] = "adamw"  # as sft.optim
    warmup_steps: int = 0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    margin: float = 0.0  # Bradley-Terry margin (usefulness only)
    max_length: int = 96  # tokens per prompt + response; longer ones are truncated on the left
    eval_every: int = 20  # held-out metrics every N steps (0 = only before and after)


@dataclass
class EvalConfig:
    """Held-out evaluation (`grpo eval`)."""

    checkpoints: list[str] = field(default_factory=list)  # extra models to compare side by side
    max_new_tokens: int | None = None  # defaults to rollout.max_new_tokens
    num_samples: int = 1  # k for pass@k (sampled at rollout.temperature when k > 1)
    batch_size: int = 64  # prompts per generation batch
    limit: int | None = None  # evaluate a seeded random subset of this many prompts


@dataclass
class TrackingConfig:
    """Where metrics go. JSONL and the console are always on."""

    report_to: list[str] = field(default_factory=list)  # wandb, tensorboard
    log_every: int = 1  # steps between console lines (metrics.jsonl gets every step)
    wandb_project: str = "grpo"  # wandb project name
    wandb_mode: Literal["offline", "online", "auto"] = "auto"  # auto = online only if a key is set
    samples_every: int = 50  # table of sample completions every N steps (0 = off)


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    constraints: list[ConstraintSpec] = field(default_factory=list)
    rewards: list[RewardSpec] = field(default_factory=list)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# train_unconstrained: GRPO with safety.enabled=false, for comparison with the constrained `train` run
STAGES = ("sft", "rm", "train_unconstrained", "train", "eval", "rollout")


# ---------------------------------------------------------------------------------------- constraints
def reward_label(name: str) -> str:
    """How a reward is logged: a registered name as is, a dotted path's function, a model folder's last part."""
    name = name.removeprefix("hf:")
    return name.rsplit(":", 1)[1] if ":" in name else name.rstrip("/").rsplit("/", 1)[-1]


def constraint_list(recipe: Recipe) -> list[ConstraintSpec]:
    """The run's constraints: none when safety.enabled is false; else `constraints`, or without that list the `safety`
    section (when enabled) as one constraint named safety on the role: safety reward (constrain: violation_rate = kind
    rate, mean_cost = kind mean; the cost itself enters the advantage in both, as it always did there)."""
    sc = recipe.safety
    if sc.enabled is False:  # every constraint off
        return []
    if recipe.constraints:
        return list(recipe.constraints)
    if not sc.enabled:
        return []
    cost = next((r.name for r in recipe.rewards if r.role == "safety"), "")
    return [
        ConstraintSpec(
            reward=cost,
            threshold=sc.cost_threshold,
            kind="rate" if sc.constrain == "violation_rate" else "mean",
            signal="cost",
            lambda_init=sc.lambda_init,
            lambda_lr=sc.lambda_lr,
            lambda_max=sc.lambda_max,
            delay=sc.lambda_delay,
            std_floor=sc.cost_std_floor,
            name="safety",
        )
    ]


def constraint_rewards(rewards: list[RewardSpec], ref: str) -> list[int]:
    """Indices of the rewards a constraint's `reward` names: by the name as written, else by the logged name."""
    exact = [i for i, r in enumerate(rewards) if r.name == ref]
    return exact or [i for i, r in enumerate(rewards) if reward_label(r.name) == ref]


def cost_signal_of(c: ConstraintSpec) -> str:
    """What a constraint puts into the advantage (grpo.advantages.cost_signal): "cost" or "indicator"."""
    return c.signal if c.signal != "auto" else "indicator" if c.kind == "rate" else "cost"


def std_floor_of(c: ConstraintSpec) -> float:
    """The floor added to a cost's group std in the separate scheme (`ConstraintSpec.std_floor`, null resolved)."""
    return c.std_floor if c.std_floor is not None else 0.0 if cost_signal_of(c) == "indicator" else 1.0


def where_matches(where: dict | None, row: dict) -> bool:
    """Whether a prompt's dataset row is one a constraint's `where` selects (None selects every row): each column's
    value equals the given value, or is one of the given list's."""
    if not where:
        return True
    return all(row.get(col) in (want if isinstance(want, list) else [want]) for col, want in where.items())


def constraint_names(recipe: Recipe) -> list[str]:
    """The names the run's constraints log under (`lambda/<name>`, `constraint/<name>`)."""
    return [name for name, _, _ in resolved_constraints(recipe)]


def resolved_constraints(recipe: Recipe) -> list[tuple[str, ConstraintSpec, int]]:
    """(name, constraint, index of its reward in `rewards`) for every constraint of the run (grpo.rules.constraints
    has checked that each names exactly one reward)."""
    out = []
    for c in constraint_list(recipe):
        hits = constraint_rewards(recipe.rewards, c.reward)
        if len(hits) != 1:
            raise UserError(
                f"constraint on reward {c.reward!r}: it names {len(hits)} rewards, it must name exactly one"
            )
        out.append((c.name or reward_label(recipe.rewards[hits[0]].name), c, hits[0]))
    return out


def unconstrained(recipe: Recipe) -> Recipe:
    """The same recipe without constraints (the pipeline's train_unconstrained baseline): every cost (role: safety or
    a constrained reward) is still scored and logged, with weight 0."""
    costs = {i for c in constraint_list(recipe) for i in constraint_rewards(recipe.rewards, c.reward)}
    return dataclasses.replace(
        recipe,
        safety=dataclasses.replace(recipe.safety, enabled=False),
        constraints=[],
        rewards=[
            dataclasses.replace(r, weight=0.0) if r.role == "safety" or i in costs else r
            for i, r in enumerate(recipe.rewards)
        ],
    )


# ---------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (or start from defaults when path is None), apply overrides, validate."""
    where = str(path) if path is not None else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(
                f"recipe file not found: {where} (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)"
            )
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or first_line(e)
            raise UserError(
                f"{where}:{loc}: invalid YAML: {problem} (fix the syntax; tags like !!python are not allowed)"
            ) from None
        except RecursionError:
            raise UserError(
                f"{where}: invalid YAML: nested too deeply (a recipe value may nest at most {MAX_DEPTH} levels)"
            ) from None
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"{where}: a recipe must be a mapping of sections ({', '.join(field_names(Recipe))}), got "
                f"{type(raw).__name__}"
            )
    for ov in overrides:
        apply_override(raw, ov)
    check_size(raw, where)
    return build(Recipe, raw, where, "")
