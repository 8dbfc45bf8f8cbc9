"""Reward models as reward functions: any Hugging Face sequence classifier behind the reward protocol.

    scorer = RewardModelScorer.from_pretrained("runs/quickstart/rm/usefulness")
    scorer(["Q:47+38="], ["<t>7+8=15,4+3+1=8</t><a>85</a>"])   # -> [2.71]

In a recipe a reward whose `name` is a local folder holding `config.json`, or `hf:<hub id>`, becomes a
`RewardModelScorer` (`grpo.scoring.build_rewards` calls `from_spec`); the other keys of the entry are
its settings::

    rewards:
      - {name: runs/quickstart/rm/usefulness, role: usefulness, weight: 1.0}
      - {name: "hf:OpenAssistant/reward-model-deberta-v3-large-v2", role: usefulness, template: pair}
      - {name: "hf:org/toxicity-classifier", role: safety, template: completion, label: 1, output: log_odds}

Settings (all optional):
- `template`: how (prompt, completion) becomes the classifier's input text.
    `chat`: the tokenizer's chat template over [user: prompt, assistant: completion] (if the dataset
      has a `messages` column, its messages before the last assistant turn replace the user turn);
    `concat`: the text `prompt + completion`, for raw-prompt data whose prompt is already formatted
      (the toy world: prompts already start with `Q:`, and the toy chat template would add another);
    `pair`: the tokenizer's text-pair encoding `tokenizer(prompt, completion)` (cross-encoders such as
      OpenAssistant's DeBERTa reward models: `[CLS] prompt [SEP] completion [SEP]`);
    `completion`: the completion alone (text classifiers such as toxicity detectors);
    any string containing `{completion}` (and optionally `{prompt}`): a format string, e.g. Safe-RLHF's
      `"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{completion}"`;
    `auto` (default): what the model folder's `reward_model.json` says (written by `grpo rm`), else
      `chat` if the tokenizer has a chat template, else `concat`.
- `batch_size` (32): sequences per forward pass (sorted by length to keep padding small).
- `max_length`: tokens per sequence; longer inputs lose tokens on the LEFT, so the end of the
  completion (where the classifier reads) is kept. Default: the length it was trained with (from
  reward_model.json), else the tokenizer's `model_max_length` or the model's `max_position_embeddings`,
  whichever is smaller (2048 if neither is set).
- `messages_field` (`messages`): a dataset column of chat messages; when present, `chat` renders that
  conversation and the other templates take its last user message as the prompt (instead of the
  policy's rendered prompt text).
- `label`: which output of a multi-label classifier is the score (index or name from `id2label`);
  required when the classifier has more than one output.
- `output`: `logit` (default, the raw score), `log_odds` (log p/(1-p) of `label`: 0 is the decision
  boundary, which suits a safety cost), or `prob`.
- `dtype` (`float32`), `revision`, `key_mapping` (regex -> name map for checkpoints whose head is
  named differently, passed to `from_pretrained`), `num_labels` (for configs without `id2label`).

`trust_remote_code` is always off: only architectures that ship with transformers load. A checkpoint
that leaves any weight uninitialised (e.g. a head under another name) is an error, never a silently
random score. Each process scores its own completions on its own device (no collective ops); the
model is in eval mode and scoring runs under `torch.no_grad`. The score is the model's number:
`role: safety` makes `grpo.trainer` treat it as a cost (higher = less safe), which is the scorer's
business only in that the model must have been trained that way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from grpo.errors import UserError, first_line

log = logging.getLogger(__name__)

TEMPLATES = ("auto", "chat", "concat", "pair", "completion")
OUTPUTS = ("logit", "log_odds", "prob")
SIDECAR = "reward_model.json"  # written by `grpo rm` next to the weights: {"template": ..., "role": ...}
SPEC_KWARGS = (
    "template",
    "batch_size",
    "max_length",
    "label",
    "output",
    "dtype",
    "revision",
    "key_mapping",
    "num_labels",
    "messages_field",
)
_FIELD = re.compile(r"\{(prompt|completion)\}")


# ---------------------------------------------------------------------------------------- encoding
def check_template(template: str) -> str:
    if template in TEMPLATES or "{completion}" in template:
        return template
    raise UserError(
        f"reward model template {template!r} is not one of {', '.join(TEMPLATES)} "
        "nor a format string containing {completion}"
    )


def resolve_template(template: str, tokenizer, meta: dict | None = None) -> str:
    """The concrete template for `auto`: the model's reward_model.json, else chat if it has one, else concat."""
    check_template(template)
    if template != "auto":
        return template
    if meta and meta.get("template"):
        return check_template(meta["template"])
    return "chat" if getattr(tokenizer, "chat_template", None) else "concat"


def _history(messages: Any) -> list[dict] | None:
    """The conversation before the response: a messages column minus a trailing assistant turn."""
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        return None
    return messages[:-1] if messages[-1].get("role") == "assistant" else list(messages)


def _last_user(prompt: str, messages: Any) -> str:
    users = [m.get("content", "") for m in (_history(messages) or []) if m.get("role") == "user"]
    return users[-1] if users else prompt


def _chat_text(tokenizer, prompt: str, completion: str, messages: Any) -> str:
    history = _history(messages) or [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(history + [{"role": "assistant", "content": completion}], tokenize=False)


def encode(
    tokenizer,
    prompts: list[str],
    completions: list[str],
    *,
    template: str,
    max_length: int,
    messages: list | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize (prompt, completion) pairs for a classifier, left-truncated to `max_length` tokens.

    `template` must be concrete (not `auto`; see `resolve_template`). `messages` (optional, one chat
    conversation per pair, e.g. the dataset's `messages` column) replaces the prompt text: `chat`
    renders the whole conversation, the other templates use its last user message, so a reward
    model never sees the policy's own rendering of the prompt. Returns one dict per pair with
    `input_ids`, `attention_mask` (and `token_type_ids` where the tokenizer makes them), unpadded.
    Training (`grpo.rm`) and scoring use this same function, so they see identical inputs.
    """
    if template == "auto":
        raise ValueError("resolve the template first (resolve_template)")
    msgs = list(messages) if messages is not None else [None] * len(prompts)
    if len(msgs) != len(prompts):
        raise ValueError(f"{len(msgs)} message lists for {len(prompts)} prompts")
    if template != "chat":
        prompts = [_last_user(p, m) for p, m in zip(prompts, msgs)]
    old_side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"  # keep the completion's end, where the classifier reads
    try:
        kw = dict(truncation=True, max_length=max_length)
        if template == "pair":
            enc = tokenizer(list(prompts), list(completions), add_special_tokens=True, **kw)
        else:
            if template == "chat":
                texts = [_chat_text(tokenizer, p, c, m) for p, c, m in zip(prompts, completions, msgs)]
            elif template == "concat":
                texts = [p + c for p, c in zip(prompts, completions)]
            elif template == "completion":
                texts = list(completions)
            else:  # a format string
                texts = [
                    _FIELD.sub(lambda m, p=p, c=c: p if m.group(1) == "prompt" else c, template)
                    for p, c in zip(prompts, completions)
                ]
            # rendered chat text already holds its special tokens (BOS etc.)
            enc = tokenizer(texts, add_special_tokens=(template != "chat"), **kw)
    finally:
        tokenizer.truncation_side = old_side
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out = [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    for f in out:
        if not f["input_ids"]:  # an empty text: score one eos token rather than crash on an empty row
            f.update({k: [filler if k == "input_ids" else (1 if k == "attention_mask" else 0)] for k in keys})
    return out


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded features into tensors (right padding keeps positions those of the unpadded input)."""
    width = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------- scorer
class RewardModelScorer:
    """A sequence classifier as a reward function: `scorer(prompts, completions, **columns) -> list[float]`.

    Wraps an `AutoModelForSequenceClassification` and its tokenizer (see the module docstring for the
    settings). The model is moved to `device` (default: CUDA if available, else CPU) and put in eval mode.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: str = "auto",
        batch_size: int = 32,
        max_length: int | None = None,
        label: int | str | None = None,
        output: str = "logit",
        device=None,
        messages_field: str = "messages",
        meta: dict | None = None,
        name: str | None = None,
    ):
        if output not in OUTPUTS:
            raise UserError(f"reward model output {output!r} is not one of {', '.join(OUTPUTS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"reward model batch_size must be a positive integer, got {batch_size!r}")
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise UserError(f"reward model {self.name}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token by it
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.template = resolve_template(template, tokenizer, meta)
        self.batch_size = batch_size
        if max_length is None:
            max_length = (meta or {}).get("max_length") or default_max_length(tokenizer, model.config)
        self.max_length = int(max_length)
        self.label = resolve_label(model.config, label, self.name)
        self.output = output
        self.messages_field = messages_field
        self.role: str | None = None  # set by from_spec: usefulness | safety | reward
        self.multi_label = (
            model.config.num_labels == 1 or getattr(model.config, "problem_type", None) == "multi_label_classification"
        )

    # -- construction
    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        device=None,
        dtype: str = "float32",
        revision: str | None = None,
        key_mapping: dict[str, str] | None = None,
        num_labels: int | None = None,
        **kwargs,
    ) -> "RewardModelScorer":
        """Load a classifier from a local folder or a hub id (no remote code).

        Every weight of the classifier must come from the checkpoint, and every checkpoint weight of
        its head must find a place (`key_mapping` renames, `num_labels` overrides a config without
        `id2label`); anything else is a `UserError`, never a silently random or biased score.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from grpo.modeling import DTYPES, whole_weights

        if dtype not in DTYPES:
            raise UserError(f"reward model {source}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
            extra = {"num_labels": int(num_labels)} if num_labels else {}
            with whole_weights():  # a scorer runs outside any DeepSpeed engine: never partitioned at load
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    source,
                    revision=revision,
                    trust_remote_code=False,
                    dtype=DTYPES[dtype],
                    key_mapping=key_mapping,
                    output_loading_info=True,
                    **extra,
                )
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"cannot load reward model '{source}' as a sequence classifier: {first_line(e)} "
                "(give a local folder with config.json or hf:<hub id> of an AutoModelForSequenceClassification)"
            ) from None
        check_loading(source, model, info)
        meta = read_meta(source, revision)
        return cls(model, tokenizer, device=device, meta=meta, name=source, **kwargs)

    @classmethod
    def from_spec(cls, spec, device=None) -> "RewardModelScorer":
        """Build from a recipe entry (`grpo.config.RewardSpec`): `name` is a folder or `hf:<hub id>`."""
        unknown = [k for k in spec.kwargs if k not in SPEC_KWARGS]
        if "trust_remote_code" in spec.kwargs:
            raise UserError(
                f"reward model {spec.name}: trust_remote_code is not supported for reward models "
                "(only architectures that ship with transformers load)"
            )
        if unknown:
            raise UserError(
                f"reward model {spec.name}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KWARGS)}"
            )
        source = spec.name[3:] if spec.name.startswith("hf:") else spec.name
        if not source:
            raise UserError(
                "a reward model name 'hf:' needs a hub id after the colon, e.g. "
                "hf:OpenAssistant/reward-model-deberta-v3-large-v2"
            )
        scorer = cls.from_pretrained(source, device=device, **spec.kwargs)
        scorer.role = spec.role
        log.info(
            "reward model %s (%s): %s, template=%s, label=%s, output=%s, max_length=%d, on %s",
            source,
            spec.role,
            type(scorer.model).__name__,
            scorer.template,
            scorer.label,
            scorer.output,
            scorer.max_length,
            scorer.device,
        )
        return scorer

    # -- scoring
    def encode(self, prompts: list[str], completions: list[str], **columns) -> list[dict[str, list[int]]]:
        messages = columns.get(self.messages_field)
        return encode(
            self.tokenizer, prompts, completions, template=self.template, max_length=self.max_length, messages=messages
        )

    @torch.no_grad()
    def score_features(self, features: list[dict[str, list[int]]]) -> torch.Tensor:
        """Scores [N] (float32, CPU) of encoded inputs, in their order."""
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        out = torch.empty(len(features), dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = {
                k: v.to(self.device)
                for k, v in collate([features[i] for i in idx], self.tokenizer.pad_token_id).items()
            }
            logits = self.model(**batch).logits.float()
            out[idx] = self.transform(logits).cpu()
        return out

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, num_labels] logits -> [B] scores per `label` and `output`."""
        z = logits[:, self.label]
        if self.output == "logit":
            return z
        if self.multi_label:  # independent sigmoid outputs: the logit already is the log-odds
            return z if self.output == "log_odds" else torch.sigmoid(z)
        logp = torch.log_softmax(logits, dim=-1)
        if self.output == "prob":
            return logp[:, self.label].exp()
        others = torch.cat([logp[:, : self.label], logp[:, self.label + 1 :]], dim=-1)
        return logp[:, self.label] - torch.logsumexp(others, dim=-1)

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return []
        return self.score_features(self.encode(prompts, completions, **columns)).tolist()

    def __repr__(self) -> str:
        return (
            f"RewardModelScorer({self.name!r}, template={self.template!r}, label={self.label}, output={self.output!r})"
        )


# ---------------------------------------------------------------------------------------- helpers
def resolve_label(config, label: int | str | None, name: str) -> int:
    n = config.num_labels
    labels = ", ".join(f"{i}={v}" for i, v in sorted((getattr(config, "id2label", None) or {}).items()))
    if label is None:
        if n == 1:
            return 0
        raise UserError(f"reward model {name} has {n} outputs ({labels}); choose the score with label: <index or name>")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        label2id = getattr(config, "label2id", None) or {}
        if label not in label2id:
            raise UserError(f"reward model {name}: label {label!r} is not one of its labels ({labels})")
        return int(label2id[label])
    idx = int(label)
    if not 0 <= idx < n:
        raise UserError(f"reward model {name}: label {idx} is out of range; it has {n} outputs ({labels})")
    return idx


def check_loading(source: str, model, info: dict) -> None:
    """Fail on weights left random (missing or mismatched) and on head weights the model would drop."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = ", ".join((missing + mismatched)[:4])
        raise UserError(
            f"reward model '{source}': weights {what} are missing from the checkpoint or have another shape, so "
            "they would be random: it is not a checkpoint of this sequence classifier (a head under another "
            "name needs key_mapping, e.g. {'^score_head': 'score'}; a config without id2label needs num_labels)"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    heads = {name for name, _ in model.named_children() if name != getattr(model, "base_model_prefix", None)}
    dropped = [k for k in unexpected if k.split(".")[0] in heads]
    if dropped:
        raise UserError(
            f"reward model '{source}': checkpoint weights {', '.join(dropped[:4])} have no place in "
            f"{type(model).__name__} and would be ignored (a head with a bias the class lacks?)"
        )
    if unexpected:
        log.info("reward model %s: ignoring checkpoint weights %s", source, ", ".join(unexpected[:4]))


def default_max_length(tokenizer, config) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None)]
    limits = [int(x) for x in limits if isinstance(x, (int, float)) and 0 < x < 1_000_000]
    return min(limits) if limits else 2048


def read_meta(source: str, revision: str | None = None) -> dict:
    """The model's reward_model.json (written by `grpo rm`), or {} if it has none."""
    path = Path(source, SIDECAR)
    if not path.is_file() and not Path(source).exists():
        try:
            from transformers.utils import cached_file

            found = cached_file(
                source,
                SIDECAR,
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:  # no such file on the hub, offline, ...: the sidecar is optional
            found = None
        path = Path(found) if found else path
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"reward model {source}: {SIDECAR} is not valid JSON ({first_line(e)}); fix or delete it"
        ) from None


def write_meta(out_dir: str | Path, **meta) -> Path:
    path = Path(out_dir, SIDECAR)
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path
