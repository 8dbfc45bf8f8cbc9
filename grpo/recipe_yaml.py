"""How a recipe's YAML becomes the dataclasses of grpo/config.py: command-line overrides (`a.b=value`), size
limits, and type checking against the dataclasses' annotations, each problem one `UserError` line that names the key
path and what would be valid; and the way back: a resolved recipe as a plain dict or YAML file, secrets redacted.

A dataclass may set two class attributes: `SHORTHAND_KEY` (a lone string stands for `{key: string}`, e.g.
`tools: [calculator]`) and `EXTRA_KEYS_ARE_KWARGS` (keys that are not fields are collected into its `kwargs` field;
the value says what its `name` names, for the error when it is missing).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from grpo.errors import UserError

MAX_VALUES = 100_000  # values in a whole recipe, aliases expanded (a reward's word list fits; an alias bomb does not)
MAX_DEPTH = 50  # nesting levels of a recipe value


def check_size(raw: Any, where: str) -> None:
    """Refuse a recipe whose values, with YAML aliases expanded, exceed MAX_VALUES or nest deeper than MAX_DEPTH.

    `yaml.safe_load` shares an aliased node instead of copying it, so nine nested lists of nine aliases
    (a "billion laughs" alias bomb) load instantly, then take minutes and gigabytes in anything that walks
    the recipe (saving it, comparing it, passing kwargs on). Counting stops at the limit, so this is fast.
    """
    count, stack = 0, [(raw, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise UserError(
                f"{where}: the recipe holds more than {MAX_VALUES:,} values once its YAML aliases (*name) are expanded "
                f"(at '{path or '<top>'}'); an alias nested in aliases multiplies: write the values out, or read big "
                "data from a file in your reward instead"
            )
        if depth > MAX_DEPTH:
            raise UserError(f"{where}: '{path}' nests more than {MAX_DEPTH} levels deep; flatten it")
        if isinstance(node, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(node)]


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise UserError(f"override '{override}' is not of the form key.sub=value (e.g. grpo.lr=1e-5)")
    key, _, value = override.partition("=")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    except RecursionError:
        raise UserError(f"override '{key}=...': its value nests too deeply (at most {MAX_DEPTH} levels)") from None
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override '{override}': empty key part in '{key}'")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, override)
            continue
        if not isinstance(node.get(part, {}), (dict, list)):
            raise UserError(f"override '{override}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = node.setdefault(part, [] if parts[i + 1].isdigit() else {})
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(last, override, len(node) + 1)
        if idx == len(node):
            node.append(parsed)
        else:
            node[idx] = parsed
    else:
        node[last] = parsed


def _index(part: str, override: str, n: int) -> int:
    if not part.isdigit() or int(part) >= n:
        raise UserError(f"override '{override}': '{part}' is not a valid list index (0..{n - 1})")
    return int(part)


def _list_item(node: list, part: str, override: str):
    return node[_index(part, override, len(node))]


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls, raw: Any, where: str, path: str):
    if raw is None:
        raw = {}
    shorthand = getattr(cls, "SHORTHAND_KEY", None)  # a lone string stands for this one key
    if shorthand and isinstance(raw, str):
        raw = {shorthand: raw}
    names_what = getattr(cls, "EXTRA_KEYS_ARE_KWARGS", None)  # extra keys are settings, passed on as `kwargs`
    if not isinstance(raw, dict):
        raise UserError(
            f"{where}: '{path or '<top>'}' must be a mapping with keys {', '.join(field_names(cls))}; got {_show(raw)}"
        )
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in raw.items():
        shown = str(key).encode("unicode_escape").decode()  # keys may hold newlines or control chars
        key_path = f"{path}.{shown}" if path else shown
        if key not in names:
            if names_what:  # the reward's (tool's, environment's) kwargs, checked against its signature later
                continue
            raise UserError(
                f"{where}: unknown key '{key_path}'; valid keys{' in ' + path if path else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], where, key_path)
    if names_what:
        extra = {k: v for k, v in raw.items() if k not in names}
        kwargs["kwargs"] = {**kwargs.get("kwargs", {}), **extra}
    for f in dataclasses.fields(cls):  # a field without a default must be given
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise UserError(f"{where}: '{path}' needs a '{f.name}'" + (f" ({names_what})" if names_what else ""))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, path: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where, path)
            except UserError as e:
                errors.append(e)
        raise (
            errors[-1]
            if len(errors) == 1
            else UserError(f"{where}: '{path}' must be {_type_name(hint)}; got {_show(value)}")
        )
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where}: '{path}' must be one of {', '.join(map(str, args))}; got {_show(value)}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[0] is not dict:
            value = [value]  # a lone value where a list is expected: `report_to: wandb`
        if not isinstance(value, list):
            raise UserError(f"{where}: '{path}' must be a list; got {_show(value)}")
        return [_coerce(v, args[0], where, f"{path}.{i}") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{path}' must be a mapping; got {_show(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: '{path}' must be true or false; got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: '{path}' must be an integer; got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: '{path}' must be a number; got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: '{path}' must be a string; got {_show(value)}")
        return value
    raise TypeError(f"config field {path} has an unsupported type {hint}")  # a bug in this file


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


# ---------------------------------------------------------------------------------------- saving
def recipe_to_dict(recipe: Any) -> dict:
    """Plain dict of the resolved recipe (a `grpo.config.Recipe`; not imported here: config imports this module);
    reward kwargs are flattened back into their entry."""
    d = dataclasses.asdict(recipe)
    d["rewards"] = [{**{k: v for k, v in r.items() if k != "kwargs"}, **r["kwargs"]} for r in d["rewards"]]
    env = d["environment"]
    env["tools"] = [{"name": t["name"], **t["kwargs"]} for t in env["tools"]]
    d["environment"] = {**{k: v for k, v in env.items() if k != "kwargs"}, **env["kwargs"]}
    return d


SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "auth", "credential", "credentials"}


def is_secret_name(name: str) -> bool:
    """The one redaction rule (saved recipes, trackers): a name with a secret-looking WORD.

    `api_key`, `hf_token`, `wandbApiKey`, `PASSWORD` are; `max_new_tokens`, `tokenizer` are not.
    """
    words = re.sub(r"([a-z])([A-Z])", r"\1_\2", str(name)).lower()
    return any(p in SECRET_PARTS for p in re.split(r"[^a-z0-9]+", words))


def redact(obj, _key: str = ""):
    """A copy of a (nested) config with secret-looking string values (by key, `is_secret_name`, or holding
    the wandb API key) replaced by `<redacted>`."""
    api_key = os.environ.get("WANDB_API_KEY")
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, _key) for v in obj]
    if isinstance(obj, str) and ((_key and is_secret_name(_key)) or (api_key and api_key in obj)):
        return "<redacted>"
    return obj


def save_recipe(recipe: Any, path: str | Path) -> None:
    """Write the resolved recipe as YAML, secrets redacted (`redact`)."""
    Path(path).write_text(yaml.safe_dump(redact(recipe_to_dict(recipe)), sort_keys=False))
