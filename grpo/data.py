"""Datasets: loading, validation, and turning rows into token ids.

A dataset spec is a `.jsonl`/`.json`/`.parquet`/`.csv` file, a folder of such files, or a hub dataset
name with an optional split (`openai/gsm8k:train`, config as `name@config:split`). Rows are either
`prompt` + `completion` strings (used verbatim; the tokenizer adds its special tokens, e.g. BOS) or
chat `messages` (a list of `{role, content}`), rendered with the tokenizer's chat template: the
prompt is every message before the last one plus the generation prompt, the completion is the last
(assistant) message; a `prompt` column holding a list of messages (TRL's conversational format) is
read the same way. SFT on a conversation with several assistant turns trains every one of them
(`data.assistant_turns: all`; user, system and tool messages are context), or only the last (`last`).
Field names are configurable in the recipe's `data` section. Every other column travels with the
prompt to the reward functions (e.g. `answer`).
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from grpo.config import DataConfig
from grpo.errors import UserError, first_line

log = logging.getLogger(__name__)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(spec: str, what: str) -> list[dict]:
    """Load a dataset spec into a list of row dicts; one clear error if it cannot be read or is empty.

    Without the optional `datasets` package (e.g. a GPU image without it) local JSONL files still load
    (`_read_jsonl`, same rows); other formats and hub datasets then fail with one line saying to install it.
    """
    try:
        import datasets
    except ImportError:
        datasets = None
    else:
        datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    try:
        if path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FILE_TYPES)
            if not files or files[0].suffix not in FILE_TYPES:
                raise UserError(
                    f"{what} '{spec}': no {'/'.join(FILE_TYPES)} file found "
                    "(convert your data to JSONL, one object per line)"
                )
            if all(f.stat().st_size == 0 or not f.read_text(errors="ignore").strip() for f in files):
                raise UserError(f"{what} '{spec}' is empty (it needs at least one row)")
            if datasets is None:
                return _read_jsonl(files, spec, what)
            try:
                with _quiet("datasets"):  # it logs its own error before raising; ours names the file and line
                    rows = datasets.load_dataset(
                        FILE_TYPES[files[0].suffix], data_files=[str(f) for f in files], split="train"
                    ).to_list()
            except Exception:  # datasets names neither the file nor the line: find them, then fall back to its message
                _locate_jsonl_problem(files, spec, what)
                raise
        elif spec.startswith((".", "/", "~")) or Path(spec).suffix in FILE_TYPES:
            raise UserError(
                f"{what} '{spec}' does not exist (check data.* paths in the recipe; "
                "relative paths start at the current directory)"
            )
        else:
            if datasets is None:
                raise UserError(
                    f"{what} '{spec}': hub datasets need the `datasets` package (pip install datasets), "
                    "or give a local .jsonl file"
                )
            name, _, split = spec.partition(":")
            name, _, config = name.partition("@")
            rows = datasets.load_dataset(name, config or None, split=split or "train").to_list()
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files / unknown hub names
        raise UserError(f"{what} '{spec}' cannot be read: {type(e).__name__}: {first_line(e)}") from None
    if not rows:
        raise UserError(f"{what} '{spec}' is empty (it needs at least one row)")
    return rows


def _read_jsonl(files: list[Path], spec: str, what: str) -> list[dict]:
    """Rows of local .jsonl files without `datasets`, columns unified as `datasets` does (missing = None)."""
    import json

    if any(f.suffix != ".jsonl" for f in files):
        raise UserError(
            f"{what} '{spec}': reading {files[0].suffix} files needs the `datasets` package (pip install datasets), "
            "or convert the data to JSONL"
        )
    _locate_jsonl_problem(files, spec, what)
    rows = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in columns} for r in rows]


@contextlib.contextmanager
def _quiet(logger: str):
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)


def _locate_jsonl_problem(files: list[Path], spec: str, what: str) -> None:
    """Raise a UserError naming the file and line of the first line of .jsonl files that is not UTF-8 or not a
    JSON object; return if there is none."""
    import json

    for f in files:
        if f.suffix != ".jsonl":
            continue
        with open(f, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{what} '{spec}': {f} line {n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{where} is not UTF-8 text (byte {e.start + 1} of the line: {raw[e.start : e.start + 1]!r}); "
                        "save the file as UTF-8 or fix that line"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{where} is not JSON ({e.msg}, column {e.colno}); one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise UserError(
                        f"{where} is a JSON {type(row).__name__}, not an object; "
                        'one {"column": value, ...} object per line'
                    )


def check_columns(rows: list[dict], cfg: DataConfig, spec: str, what: str, need_completion: bool) -> str:
    """Return the row format ('messages' or 'prompt'); fail naming the missing fields."""
    first = rows[0]
    if cfg.messages_field in first and cfg.prompt_field not in first:
        return _check_values(rows, "messages", cfg, spec, what, need_completion)
    if isinstance(first.get(cfg.prompt_field), list):  # TRL-style conversational prompts: a list of messages
        return _check_values(rows, "prompt_messages", cfg, spec, what, need_completion)
    needed = [cfg.prompt_field] + ([cfg.completion_field] if need_completion else [])
    missing = [f for f in needed if f not in first]
    if missing:
        raise UserError(
            f"{what} '{spec}' has no {' / '.join(repr(m) for m in missing)} field (columns: {', '.join(first)}); "
            f"rename the columns or set data.prompt_field / data.completion_field / data.messages_field"
        )
    _check_values(rows, "prompt", cfg, spec, what, need_completion)
    return "prompt"


def _check_values(rows: list[dict], fmt: str, cfg: DataConfig, spec: str, what: str, need_completion: bool) -> str:
    """Every row's prompt (and completion) has the type its format needs; one line naming the first row that
    does not."""

    def bad(i: int, field: str, value, expected: str):
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise UserError(
            f"{what} '{spec}': row {i + 1} has {field!r} = {shown} ({type(value).__name__}); it must be {expected}; "
            "fix or remove that row"
        )

    for i, row in enumerate(rows):
        if fmt == "prompt":
            if not isinstance(row.get(cfg.prompt_field), str):
                bad(i, cfg.prompt_field, row.get(cfg.prompt_field), "a string (or a list of chat messages)")
            if need_completion and not isinstance(row.get(cfg.completion_field), (str, type(None))):
                bad(i, cfg.completion_field, row.get(cfg.completion_field), "a string")
            continue
        field = cfg.messages_field if fmt == "messages" else cfg.prompt_field
        messages = row.get(field)
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), (str, list, type(None)))
                for m in messages
            )
        ):
            bad(i, field, messages, "a non-empty list of {role, content} messages")
    return fmt


def empty_completions(rows: list[dict], fmt: str, cfg: DataConfig) -> int:
    """How many SFT rows have an empty (or whitespace-only, or null) completion: only the eos token would be learned."""

    def completion(row) -> str:
        if fmt == "prompt":
            return row.get(cfg.completion_field) or ""
        messages = row.get(cfg.messages_field if fmt == "messages" else cfg.prompt_field) or []
        last = messages[-1] if messages else {}
        return (last.get("content") or "") if last.get("role") == "assistant" else ""

    return sum(not completion(r).strip() for r in rows)


def empty_completion_problem(rows: list[dict], fmt: str, cfg: DataConfig, what: str) -> str | None:
    """A problem when every SFT completion is empty: SFT would only teach the model to stop at once."""
    n = empty_completions(rows, fmt, cfg)
    if n and n == len(rows):
        field = repr(cfg.completion_field) if fmt == "prompt" else "last (assistant) message"
        return (
            f"{what}: all {n} rows have an empty {field}, so SFT would only teach the model to stop at once; "
            "check data.completion_field / data.messages_field, or the data itself"
        )
    return None


@dataclass
class Example:
    """One tokenized SFT example: labels are -100 on prompt tokens (completion-only loss)."""

    input_ids: list[int]
    labels: list[int]


def apply_template(tokenizer, messages: list[dict], **kwargs) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)`; a template that refuses the messages (a
    role it does not know, say) is one UserError line naming the roles."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        roles = ", ".join(dict.fromkeys(str(m.get("role")) for m in messages if isinstance(m, dict)))
        raise UserError(
            f"the tokenizer's chat template cannot render a conversation with roles {roles}: {first_line(e)}; use a "
            "model or model.tokenizer whose template handles them, or change the data"
        ) from None


def chat_messages(row: dict, fmt: str, cfg: DataConfig, tokenizer, *, with_completion: bool) -> list[dict]:
    """A row as the message list the chat template renders: a string prompt as a user message (and its completion
    as the assistant's), data.system_prompt prepended when the row has no system message of its own."""
    if fmt == "prompt":
        messages = [{"role": "user", "content": row[cfg.prompt_field]}]
        if with_completion and row.get(cfg.completion_field):
            messages.append({"role": "assistant", "content": row[cfg.completion_field]})
    else:
        messages = row[cfg.prompt_field if fmt == "prompt_messages" else cfg.messages_field]
    if cfg.system_prompt and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    if not isinstance(messages, list) or not messages:
        raise UserError(
            f"a '{cfg.messages_field}' entry is not a non-empty list of {{role, content}} messages: "
            f"{str(messages)[:80]}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            "chat-message data needs a tokenizer with a chat_template (set model.tokenizer to one that has it)"
        )
    return messages


def render(
    row: dict, fmt: str, cfg: DataConfig, tokenizer, *, with_completion: bool, tools: list[dict] | None = None
) -> tuple[str, str]:
    """(prompt_text, completion_text) of a row; completion is '' when not requested. `tools`: JSON schemas the chat
    template renders through its ``tools=`` argument (multi-turn tool use, grpo.environments.tool_schemas)."""
    if fmt == "prompt" and not cfg.apply_chat_template:
        return row[cfg.prompt_field], (row.get(cfg.completion_field) or "") if with_completion else ""
    messages = chat_messages(row, fmt, cfg, tokenizer, with_completion=with_completion)
    if messages[-1].get("role") == "assistant":
        history, last = messages[:-1], messages[-1]
    else:
        history, last = messages, None
    extra = {"tools": tools} if tools else {}
    prompt = apply_template(tokenizer, history, add_generation_prompt=True, **extra)
    if not with_completion or last is None:
        return prompt, ""
    full = apply_template(tokenizer, history + [last], **extra)
    if not full.startswith(prompt):  # templates that rewrite history: fall back to the raw content
        return prompt, last["content"]
    return prompt, full[len(prompt) :].rstrip()  # templates often end a turn with "<eos>\n": end on the eos


def prompt_tokens(
    row: dict, fmt: str, cfg: DataConfig, tokenizer, tools: list[dict] | None = None
) -> tuple[str, list[int]]:
    """A row's prompt text and token ids, exactly as every stage (and preflight's length checks) sees them.

    Chat-rendered text already holds the template's special tokens, so the tokenizer adds none there.
    """
    text, _ = render(row, fmt, cfg, tokenizer, with_completion=False, tools=tools)
    return text, tokenizer(text, add_special_tokens=(fmt == "prompt" and not cfg.apply_chat_template))["input_ids"]


def example_tokens(
    row: dict, fmt: str, cfg: DataConfig, tokenizer, tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """An SFT row's (prompt ids, completion ids ending in eos), untruncated."""
    prompt, completion = render(row, fmt, cfg, tokenizer, with_completion=True, tools=tools)
    p_ids = tokenizer(prompt, add_special_tokens=(fmt == "prompt" and not cfg.apply_chat_template))["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return p_ids, c_ids if c_ids and c_ids[-1] == eos else c_ids + [eos]


def conversation_tokens(
    messages: list[dict], tokenizer, tools: list[dict] | None = None
) -> tuple[list[int], list[int]] | None:
    """Every assistant turn of a conversation as a target: (input ids, labels), labels -100 on everything else
    (system, user and tool messages, and the template's own scaffolding such as the generation prompt), eos appended
    when the last turn does not end in it. Each turn's span is found by rendering the conversation up to it: the text
    of messages[:i] with the generation prompt, then of messages[:i + 1]; the difference is turn i, trailing
    whitespace left to the context (as for a single completion). None when the template rewrites earlier turns
    (a later rendering does not extend the earlier one, e.g. templates that drop past reasoning): the caller then
    trains the last turn only. `tools`: the JSON schemas the template renders (as GRPO's prompts render them)."""
    extra = {"tools": tools} if tools else {}
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens

    def add(text: str, train: bool) -> None:
        if text:
            t = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(t)
            labels.extend(t if train else [-100] * len(t))

    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = apply_template(tokenizer, messages[:i], add_generation_prompt=True, **extra)
        upto = apply_template(tokenizer, messages[: i + 1], **extra)
        if not before.startswith(done) or not upto.startswith(before):
            return None
        turn = upto[len(before) :].rstrip()
        add(before[len(done) :], train=False)
        add(turn, train=True)
        done = before + turn
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def sft_tokens(
    row: dict, fmt: str, cfg: DataConfig, tokenizer, tools: list[dict] | None = None
) -> tuple[list[int], list[int], bool]:
    """An SFT row's (input ids, labels, every turn), untruncated: the completion is the target (labels -100 on the
    prompt); chat rows with several assistant turns train every one of them (`data.assistant_turns: all`, the
    default); `every turn` is False when such a row could only train its last turn (`conversation_tokens`).
    `tools`: the recipe's tool schemas (grpo.environments.tool_schemas), rendered by chat templates as in GRPO's
    prompts, so SFT and GRPO see the same prompt."""
    every = True
    if fmt != "prompt" and cfg.assistant_turns == "all":
        messages = chat_messages(row, fmt, cfg, tokenizer, with_completion=True)
        if sum(m.get("role") == "assistant" for m in messages) > 1:
            both = conversation_tokens(messages, tokenizer, tools)
            if both is not None:
                return (*both, True)
            every = False
    p_ids, c_ids = example_tokens(row, fmt, cfg, tokenizer, tools)
    return p_ids + c_ids, [-100] * len(p_ids) + c_ids, every


def sft_examples(
    rows: list[dict], fmt: str, cfg: DataConfig, tokenizer, max_length: int, tools: list[dict] | None = None
) -> list[Example]:
    """Tokenize rows into completion-only examples, eos appended, truncated to max_length.

    Rows with an empty completion teach only the eos token: some are warned about (with the count), all is an error.
    """
    problem = empty_completion_problem(rows, fmt, cfg, "the SFT data")
    if problem:
        raise UserError(problem)
    n_empty = empty_completions(rows, fmt, cfg)
    if n_empty:
        log.warning(
            "the SFT data: %d of %d rows have an empty completion "
            "(only the end-of-sequence token is learned from them)",
            n_empty,
            len(rows),
        )
    out, last_only = [], 0
    for row in rows:
        ids, labels, every = sft_tokens(row, fmt, cfg, tokenizer, tools)
        last_only += not every
        ids, labels = ids[:max_length], labels[:max_length]
        if any(l != -100 for l in labels):
            out.append(Example(ids, labels))
    if last_only:
        log.warning(
            "the SFT data: %d conversation(s) train their last assistant turn only: the chat template rewrites "
            "earlier turns when a conversation continues (e.g. drops their reasoning), so their spans cannot be found",
            last_only,
        )
    if not out:
        raise UserError(
            f"no SFT example has completion tokens within sft.max_length={max_length}; raise sft.max_length"
        )
    return out


def prompt_records(
    rows: list[dict], fmt: str, cfg: DataConfig, tokenizer, tools: list[dict] | None = None
) -> tuple[list[dict], int]:
    """GRPO/eval prompts: each row gains `prompt_text` and `prompt_ids`; returns (records, n_dropped).

    Prompts longer than data.max_prompt_length are truncated on the left, dropped, or an error, per
    data.prompt_overflow; what was done is logged (count, longest), in place of the tokenizer's own
    warning about sequences longer than the model's maximum (it does not know about the truncation).
    """
    from grpo.rules import prompt_length, raise_first

    raise_first(prompt_length(cfg))
    out, dropped, truncated, longest = [], 0, 0, 0
    limit = cfg.max_prompt_length
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    for i, row in enumerate(rows):
        text, ids = prompt_tokens(row, fmt, cfg, tokenizer, tools)
        if len(ids) > limit:
            if cfg.prompt_overflow == "error":
                raise UserError(
                    f"prompt {i} has {len(ids)} tokens > data.max_prompt_length={limit}; raise it or set "
                    "data.prompt_overflow=truncate_left|drop"
                )
            longest = max(longest, len(ids))
            if cfg.prompt_overflow == "drop":
                dropped += 1
                continue
            truncated += 1
            ids = ids[-limit:]
        out.append({**row, "prompt_text": text, "prompt_ids": ids})
    if not out:
        raise UserError(f"every prompt is longer than data.max_prompt_length={limit}; raise it")
    if truncated:
        log.warning(
            "truncated %d of %d prompts to their last %d tokens "
            "(data.max_prompt_length=%d, data.prompt_overflow=truncate_left; "
            "the longest had %s tokens)",
            truncated,
            len(rows),
            limit,
            limit,
            f"{longest:,}",
        )
    return out, dropped


class Sampler:
    """Endless, seeded, epoch-wise shuffled indices; each process takes every world_size-th one."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.rng, self.rank, self.world = n, random.Random(seed), rank, world
        self.order: list[int] = []
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        need = k * self.world
        while len(self.order) < need:
            perm = list(range(self.n))
            self.rng.shuffle(perm)
            self.order += perm
            self.epoch += 1
        chunk, self.order = self.order[:need], self.order[need:]
        return chunk[self.rank :: self.world]
