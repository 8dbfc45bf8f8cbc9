"""Loading the policy, its tokenizer, LoRA, and the reference policy.

- `name_or_path` is a local folder or a hub id (hub ids need network the first time).
- `trust_remote_code` is off unless the recipe turns it on; weights load from safetensors.
- LoRA goes through peft. Under LoRA the reference policy is the same model with the adapter
  disabled (`reference_logits_context`), so no second copy of the weights exists.
- Without LoRA and with beta > 0 the reference is a frozen second copy loaded from the stage's
  starting model (also when resuming from a checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path

import torch

from grpo.config import LoraConfig, ModelConfig
from grpo.errors import UserError, first_line

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _check_source(path: str, what: str) -> None:
    """An existing folder is local; otherwise it must look like a hub id (`org/name`)."""
    if Path(path).expanduser().exists():
        return
    # our own folders (data/tiny_base run from outside the repo) and folders whose parent exists are local
    local = "/" in path and (
        Path(path).parent.is_dir() or Path(path).parts[0] in ("data", "runs", "examples", "outputs")
    )
    if (
        local
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)
    ):
        raise UserError(
            f"{what} '{path}' does not exist (relative paths start at the current directory: {Path.cwd()}; "
            f"give a local model folder or a hub id like Qwen/Qwen2.5-0.5B-Instruct)"
        )


_HUB_CHECKED: dict[str, str | None] = {}


def hub_problem(source: str, revision: str | None = None) -> str | None:
    """For a source that is not a local folder (a hub id): say at once that the hub is used, and fail fast
    (a problem line) instead of minutes of silent retries when offline mode is set or the hub cannot be reached.

    A model already in the local Hugging Face cache is used from there (the rest of the process then runs in
    offline mode, so nothing else waits on the network). Checked once per source and process.
    """
    if Path(source).expanduser().exists():
        return None
    key = f"{source}@{revision}"
    if key in _HUB_CHECKED:
        return _HUB_CHECKED[key]
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str)
    except Exception:  # a malformed id: transformers reports it when it loads
        cached = False
    problem = None
    if constants.HF_HUB_OFFLINE:
        if cached:
            log.info("'%s' is not a local folder: using its copy in the Hugging Face cache (offline mode)", source)
        else:
            problem = (
                f"'{source}' is not a local folder and is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                "and "
                "offline mode (HF_HUB_OFFLINE=1) forbids downloading it; give a local model folder, or unset "
                "HF_HUB_OFFLINE "
                "where there is network"
            )
    else:
        log.info("'%s' is not a local folder: fetching it from the Hugging Face hub (%s)", source, constants.ENDPOINT)
        reason = _hub_unreachable(constants.ENDPOINT)
        if reason and cached:
            log.warning(
                "the Hugging Face hub (%s) cannot be reached (%s): using the cached copy of '%s' (offline mode from "
                "here on)",
                constants.ENDPOINT,
                reason,
                source,
            )
            constants.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
        elif reason:
            problem = (
                f"'{source}' is not a local folder, and the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
                f"({reason}); check the network (a proxy: HTTPS_PROXY, a mirror: HF_ENDPOINT), download the model "
                "where "
                "there is network, or give a local model folder"
            )
    _HUB_CHECKED[key] = problem
    return problem


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if `endpoint` answers an HTTP request within `timeout` seconds (any status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # DNS failure, refused, timed out, proxy error: all mean "no hub"
        return f"{type(e).__name__}: {first_line(e, 120)}"
    return None


def _check_hub(source: str, revision: str | None, what: str) -> None:
    problem = hub_problem(source, revision)
    if problem:
        raise UserError(f"{what} {problem}")


def safetensors_problem(folder: str | Path) -> str | None:
    """A damaged weights file in a local model folder (truncated, bad header), read from the headers only; None if fine.

    A safetensors file is an 8-byte header length N, N bytes of JSON (each tensor's byte range), then the data,
    which must end exactly where the file ends.
    """
    import json
    import struct

    for f in sorted(Path(folder).expanduser().glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8)) if size >= 8 else (None,)
                if n is None or n > size - 8:
                    why = (
                        f"its header claims {n} bytes but the file has {size}"
                        if n is not None
                        else f"only {size} bytes"
                    )
                else:
                    header = json.loads(fh.read(n))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                    why = (
                        None
                        if 8 + n + end == size
                        else f"it has {size:,} bytes, its header describes {8 + n + end:,} (truncated?)"
                    )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            why = f"its header is not valid ({type(e).__name__})"
        except OSError as e:
            why = f"it cannot be read ({e.strerror or type(e).__name__})"
        if why:
            return f"{f} is damaged: {why}; re-save or re-download the model (or point at an intact copy)"
    return None


def check_finite(model, source: str) -> None:
    """Refuse weights holding NaN/inf (checked once, at load): such a model samples garbage token ids and scores
    zero."""
    bad, total = [], 0
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and p.device.type != "meta":
            total += 1
            if not bool(torch.isfinite(p).all()):
                bad.append(name)
    if bad:
        raise UserError(
            f"model '{source}' holds non-finite weights (NaN or inf) in {len(bad)} of {total} tensors, e.g. {bad[0]}; "
            "it "
            "cannot generate or train: use an earlier checkpoint, or retrain it (a NaN loss usually comes from a too "
            "high learning rate)"
        )


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token (falls back to eos) and left padding for generation."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    _check_source(source, "tokenizer")
    _check_hub(source, cfg.revision, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{source}': {first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(
                f"tokenizer '{source}' has neither a pad nor an eos token; set one in its tokenizer_config.json"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, *, for_training: bool = True, continue_adapter: bool = False):
    """AutoModelForCausalLM from `path` (default cfg.name_or_path), LoRA applied if enabled.

    A folder holding a LoRA adapter (adapter_config.json) is loaded as its base (recursively) with
    the adapter merged in. Training with LoRA then starts a FRESH adapter on that merged model, so
    the GRPO reference (adapter disabled) is the model the stage started from (e.g. the SFT model),
    not the original base; the new adapter records the folder it applies to. `continue_adapter`
    keeps training the folder's own adapter instead (resuming a LoRA run from a checkpoint).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source = path or cfg.name_or_path
    _check_source(source, "model")
    _check_hub(source, cfg.revision, "model")
    damaged = safetensors_problem(source) if Path(source).expanduser().is_dir() else None
    if damaged:
        raise UserError(f"cannot load model '{source}': {damaged}")
    adapter = Path(source, "adapter_config.json").is_file()
    kwargs = dict(
        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=DTYPES[cfg.dtype], use_safetensors=None
    )
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    keep_adapter = adapter and continue_adapter and for_training and cfg.lora.enabled
    try:
        if adapter:
            model = _load_adapter_model(source, kwargs, trainable=keep_adapter)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise UserError(
                f"model '{source}' contains custom code (its own architecture); set model.trust_remote_code=true "
                "only if you trust that code: it runs with your rights"
            ) from None
        where = "a local folder" if Path(source).exists() else "not a local folder, and not loadable from the hub"
        raise UserError(f"cannot load model '{source}' ({where}): {first_line(e)}") from None
    check_finite(model, source)
    if cfg.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled and for_training and not keep_adapter:
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.gradient_checkpointing)
        if adapter:  # the new adapter applies on top of the merged adapter folder it started from
            model.peft_config["default"].base_model_name_or_path = str(Path(source).resolve())
    return model


def _load_adapter_model(source: str, kwargs: dict, trainable: bool):
    """Base (itself possibly an adapter folder, merged) + the adapter in `source`; merged unless trainable."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_path = PeftConfig.from_pretrained(source).base_model_name_or_path
    if Path(base_path, "adapter_config.json").is_file():
        base = _load_adapter_model(base_path, kwargs, trainable=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    model = PeftModel.from_pretrained(base, source, is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


def apply_lora(model, cfg: LoraConfig, gradient_checkpointing: bool = False):
    """Wrap `model` with a peft LoRA adapter; only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        hint = (
            " (MoE expert weights are wrapped as parameters: set model.lora.dropout=0)" if "dropout" in str(e) else ""
        )
        raise UserError(f"model.lora.target_modules={targets!r}: {first_line(e)}{hint}") from None
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


@contextlib.contextmanager
def whole_weights():
    """Load models whole (eval models, reward models) even under DeepSpeed ZeRO-3 or after a ZeRO-3 stage ran in
    this process (a pipeline): transformers would otherwise partition them at load, since its global ZeRO-3
    config outlives that stage's engine, and a partitioned model only runs inside a DeepSpeed engine."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def make_reference(model, beta: float, load=None):
    """The reference policy for the KL term: None when beta == 0 or under LoRA (adapter disabled).

    `load()` returns the model the stage started from; without it the reference is a deep copy of
    `model`. The trainer always loads: when resuming, `model` holds the checkpoint's weights, not the
    reference's, and under DeepSpeed ZeRO-3 it is already partitioned (a copy would be empty).
    """
    if beta == 0 or is_peft(model):
        return None
    ref = (load() if load is not None else copy.deepcopy(model)).eval()
    ref.requires_grad_(False)
    return ref


def reference_config(cfg: ModelConfig) -> ModelConfig:
    """The model section for loading a frozen reference: no LoRA, no gradient checkpointing."""
    import dataclasses

    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False), gradient_checkpointing=False)


def reference_context(model, ref):
    """Context in which `ref or model` computes reference logits (disables the LoRA adapter)."""
    if ref is None and is_peft(model):
        return model.disable_adapter()
    return contextlib.nullcontext()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes, also when DeepSpeed ZeRO-3 has partitioned them)."""
    numel = lambda p: getattr(p, "ds_numel", p.numel())
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total


def local_parameter_count(model) -> int:
    """Parameter elements this process stores: its shards under ZeRO-3 (plus parameters kept whole) and FSDP,
    else all."""

    def local(p):
        if hasattr(p, "to_local"):  # FSDP2 DTensor
            return p.to_local().numel()
        return p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)

    return sum(local(p) for p in model.parameters())


def save_model(model, tokenizer, out_dir: str | Path, *, merge: bool = False, state_dict: dict | None = None) -> Path:
    """Save an HF-loadable checkpoint (full model, or adapter + optional merged copy in out/merged).

    `state_dict` overrides the model's own (weights gathered from ZeRO-3 / FSDP shards). The live
    weights are then sharded, so a merged copy is built from the adapter just written and its base.
    """
    from grpo.checkpoint import atomic_folder

    with atomic_folder(out_dir) as tmp:  # replaces out_dir whole: no stale files from an earlier run's save
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(tmp)
        if is_peft(model) and merge:
            merged = (
                copy.deepcopy(model).merge_and_unload()
                if state_dict is None
                else _load_adapter_model(str(tmp), {}, trainable=False)
            )
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
    return Path(out_dir)


def fp32_output_layer(model) -> None:
    """Run the model's output layer in fp32 (its weight keeps its dtype and stays shared with a tied
    embedding; it is upcast on each call). The rollout engine, `hf` generate and the trainer's chunked
    log-probs all call that module, so sampler and trainer see the same fp32 logits. Needs a plain
    `nn.Linear` output layer (not a LoRA'd one)."""
    import types

    import torch.nn.functional as F
    from torch import nn

    hf = model.get_base_model() if is_peft(model) else model
    head = hf.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise UserError(
            f"model.fp32_lm_head: the output layer of {type(hf).__name__} is a {type(head).__name__}, not a plain "
            "Linear layer (a LoRA'd lm_head?); set model.fp32_lm_head=false"
        )

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())

    head.forward = types.MethodType(forward, head)
