"""Preflight checks on what a stage reads and writes: the model, the output folder, free disk, the
datasets and their lengths. Read-only and cheap: config.json and safetensors headers, never weights;
datasets are tokenized only when the declared length budget exceeds the model's context.
Called by grpo/preflight.py; every function returns one-line problems (what, where, how to fix).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from grpo.checkpoint import earlier_run_problem
from grpo.config import STAGES
from grpo.errors import UserError

log = logging.getLogger(__name__)

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
TRAIN_STAGES = ("train", "train_unconstrained")  # GRPO runs; train_unconstrained = the same with safety.enabled=false


# ---------------------------------------------------------------------------------------- model, output, disk
def model_problems(recipe, earlier, cache) -> list[str]:
    """The starting model exists, unless an earlier pipeline stage writes it."""
    p = []
    if not any(s in ("sft", "train") for s in earlier):
        p += source_problems(recipe.model.name_or_path, "model.name_or_path", recipe.model.revision)
    if recipe.model.tokenizer:
        from grpo.modeling import _check_source, hub_problem

        try:
            _check_source(recipe.model.tokenizer, "tokenizer")
            problem = hub_problem(recipe.model.tokenizer, recipe.model.revision)
            p += [f"model.tokenizer: {problem}"] if problem else []
        except UserError as e:
            p.append(f"model.tokenizer: {e}")
    return p


def source_problems(source: str, key: str, revision: str | None = None) -> list[str]:
    """A model folder that exists, holds config.json and undamaged weights; or a hub id the hub (or its cache) can
    give."""
    from grpo.modeling import _check_source, hub_problem, safetensors_problem

    try:
        _check_source(source, "model")
    except UserError as e:
        return [f"{key}: {e}"]
    path = Path(source).expanduser()
    if path.is_file():
        return [f"{key}: '{source}' is a file; give the model folder (the one holding config.json)"]
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        return [
            f"{key}: '{source}' has no config.json, so it is not a Hugging Face model folder; point it at the folder "
            "save_pretrained wrote (e.g. runs/x/sft/final)"
        ]
    problem = safetensors_problem(path) if path.is_dir() else hub_problem(source, revision)
    return [f"{key}: {problem}"] if problem else []


def _model_config(recipe, cache) -> dict | None:
    """config.json of the recipe's model (the base of a LoRA adapter folder); None if it cannot be read."""
    if "model_config" not in cache:
        cache["model_config"] = _read_config(recipe.model.name_or_path, recipe.model.revision, depth=0)
    return cache["model_config"]


def _read_config(source: str, revision: str | None, depth: int) -> dict | None:
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if (path / "config.json").is_file():
                return {**json.loads((path / "config.json").read_text()), "_folder": str(path)}
            if (path / "adapter_config.json").is_file() and depth == 0:
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
                return _read_config(base, None, depth + 1) if base else None
            return None
        from grpo.modeling import hub_problem

        if hub_problem(source, revision):  # offline or unreachable: reported by model_problems, never waited on
            return None
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "config.json", revision=revision)).read_text())
    except Exception as e:  # offline, private repo, malformed file: the stage itself reports it when it loads
        log.debug("preflight: cannot read config.json of %s: %s", source, e)
        return None


def context_length(recipe, cache) -> int | None:
    cfg = _model_config(recipe, cache)
    for c in (cfg, (cfg or {}).get("text_config")):
        for key in CONTEXT_KEYS:
            if isinstance(c, dict) and isinstance(c.get(key), int) and c[key] > 0:
                return c[key]
    return None


def context_where(recipe) -> str:
    return f"from {recipe.model.name_or_path}/config.json"


def _writable(output_dir: str) -> tuple[Path, str | None]:
    """(nearest existing folder of output_dir, the problem writing there or None)."""
    anc = Path(output_dir).expanduser()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    key = f"run.output_dir={output_dir}"
    if not anc.is_dir():
        return anc, f"{key}: '{anc}' is a file, not a folder; choose another run.output_dir"
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        return anc, f"cannot write to {anc} ({key}: {e.strerror or type(e).__name__}); choose a writable folder"
    return anc, None


def output_problems(recipe, stage: str) -> list[str]:
    _, problem = _writable(recipe.run.output_dir)
    if problem:
        return [problem]
    stage_dir = Path(recipe.run.output_dir).expanduser() / stage
    if stage_dir.exists() and not stage_dir.is_dir():
        return [
            f"run.output_dir={recipe.run.output_dir}: '{stage_dir}' is a file, not a folder; remove it or choose "
            "another run.output_dir"
        ]
    from grpo.runtime import lock_holder

    holder = lock_holder(stage_dir)
    if holder:  # the stage takes the lock itself (grpo.runtime.lock_stage); this only says so before anything loads
        return [
            f"{stage_dir} is in use by another run ({holder}); wait for it to finish (or stop it), or choose another "
            "run.output_dir: two runs writing one stage folder would mix their checkpoints and metrics"
        ]
    resume = stage in TRAIN_STAGES and bool(recipe.grpo.resume)
    if stage != "eval" and (stage_dir / "DONE").exists() and not recipe.run.overwrite and not resume:
        return [
            f"{stage_dir} already holds a finished '{stage}' run; set run.overwrite=true or choose another "
            "run.output_dir"
        ]
    problem = (
        earlier_run_problem(stage_dir, overwrite=recipe.run.overwrite, resume=resume) if stage in TRAIN_STAGES else None
    )
    return [problem] if problem else []


def disk_problems(recipe, stages, cache) -> list[str]:
    """Free space for the stages' checkpoints and final models (an estimate; never blocks when unknown)."""
    need = sum(_stage_bytes(recipe, s, cache) for s in stages if s in STAGES)
    if not need:
        return []
    anc, problem = _writable(recipe.run.output_dir)
    if problem:  # reported by _output_problems
        return []
    try:
        free = shutil.disk_usage(anc).free
    except OSError:
        return []
    if free >= need:
        return []
    return [
        f"run.output_dir={recipe.run.output_dir}: its disk has {_gb(free)} free but {', '.join(stages)} need about "
        f"{_gb(need)} "
        "(checkpoint = weights + 2 fp32 Adam moments per trainable parameter, up to grpo.keep_last + 1 of them at "
        "once, "
        "plus the final model); "
        "free some space or choose another run.output_dir"
    ]


def _stage_bytes(recipe, stage: str, cache) -> int:
    n = _parameter_count(recipe, cache)
    if not n or stage == "eval":
        return 0
    cfg = _model_config(recipe, cache) or {}
    dtype = (
        recipe.model.dtype
        if recipe.model.dtype != "auto"
        else str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    )
    weights = n * DTYPE_BYTES.get(dtype, 4)
    lora = recipe.model.lora.enabled
    if stage == "rm":
        return 2 * weights  # usefulness and safety models
    if lora:  # adapters are small; a merged copy is a full model
        return weights if recipe.model.lora.merge_on_save else 0
    if stage == "sft":
        return weights  # the final model
    return (
        _checkpoints_at_once(recipe.grpo) * (weights + 8 * n) + weights
    )  # ckpt-N (weights + Adam moments), the final model


def _checkpoints_at_once(g) -> int:
    """Most GRPO checkpoints on disk at one time: every save_every steps plus the last step, the grpo.keep_last
    newest kept, and one more while the next is written (the oldest goes only once it is complete)."""
    saves = ((g.steps - 1) // g.save_every if g.save_every else 0) + 1
    return min(saves, g.keep_last + 1) if g.keep_last > 0 else saves


def _parameter_count(recipe, cache) -> int | None:
    """From the safetensors sizes of a local model folder, else a Llama-shaped estimate from config.json."""
    if "params" in cache:
        return cache["params"]
    cfg = _model_config(recipe, cache)
    n = None
    if cfg and cfg.get("_folder"):
        files = list(Path(cfg["_folder"]).glob("*.safetensors"))
        stored = DTYPE_BYTES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), 4)
        if files:
            n = sum(f.stat().st_size for f in files) // stored
    if n is None and cfg:
        c = cfg.get("text_config", cfg)
        h, v, L = c.get("hidden_size"), c.get("vocab_size"), c.get("num_hidden_layers")
        if all(isinstance(x, int) for x in (h, v, L)):
            ffn = c.get("intermediate_size") or 4 * h
            n = v * h * (1 if c.get("tie_word_embeddings", True) else 2) + L * (4 * h * h + 3 * h * ffn)
    cache["params"] = n
    return n


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------- data and lengths
def dataset(recipe, spec: str, what: str, need_completion: bool, cache) -> tuple[list | None, str | None, list[str]]:
    """(rows, format, problems) of one dataset spec; loaded once per check."""
    from grpo.data import check_columns, load_rows

    key = ("rows", spec)
    if key not in cache:
        try:
            cache[key] = load_rows(spec, what)
        except UserError as e:
            cache[key] = e
    rows = cache[key]
    if isinstance(rows, UserError):
        return None, None, [str(rows)]
    try:
        return rows, check_columns(rows, recipe.data, spec, what, need_completion), []
    except UserError as e:
        return rows, None, [str(e)]


def length_problems(recipe, spec: str, what: str, new_tokens: int, new_key: str, cache) -> list[str]:
    """Prompt (up to data.max_prompt_length, or the longest real one) + new tokens within the context."""
    ctx = context_length(recipe, cache)
    limit = recipe.data.max_prompt_length
    if not ctx or limit + new_tokens <= ctx:
        return []
    longest = longest_tokens(recipe, spec, what, cache, with_completion=False)
    if isinstance(longest, str):
        return [longest]
    prompt = min(longest, limit) if longest is not None else limit
    if prompt + new_tokens <= ctx:
        return []
    return [
        f"{what}: prompts of up to {prompt} tokens (data.max_prompt_length={limit}) + {new_key}={new_tokens} exceed "
        "the "
        f"model's context of {ctx} tokens ({context_where(recipe)}); lower {new_key} or data.max_prompt_length "
        f"so that they sum to <= {ctx}"
    ]


def longest_tokens(recipe, spec, what, cache, *, with_completion: bool):
    """Longest tokenized prompt (or prompt + completion + eos) of a dataset; a str is a problem, None unknown."""
    from grpo.data import prompt_tokens, sft_tokens
    from grpo.environments import tool_schemas
    from grpo.modeling import load_tokenizer

    rows, fmt, bad = dataset(recipe, spec, what, with_completion, cache)
    if bad or not rows:
        return None
    try:
        tok = cache.get("tokenizer") or load_tokenizer(recipe.model)
    except UserError as e:
        return str(e)
    cache["tokenizer"] = tok
    try:  # the stages render chat prompts with the recipe's tool schemas; a broken tool is reported elsewhere
        tools = tool_schemas(recipe.environment)
    except UserError:
        tools = None
    longest = 0
    for row in rows:
        if with_completion:  # the stages' own tokenization (grpo.data), chat-template flag included
            n = len(sft_tokens(row, fmt, recipe.data, tok, tools)[0])
        else:
            n = len(prompt_tokens(row, fmt, recipe.data, tok, tools)[1])
        longest = max(longest, n)
    return longest
