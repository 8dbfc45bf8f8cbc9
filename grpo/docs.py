"""The recipe reference, generated from the dataclasses in `grpo/config.py`.

    python -m grpo.docs                       # print the reference (markdown)
    python -m grpo.docs --check README.md     # exit 1 if README's reference is out of date
    python -m grpo.docs --write README.md     # rewrite README's reference in place

Every section and key with its type, default and description. Descriptions come from the source:
the class docstring for a section, and for a field the comment lines right above it plus its trailing
`# ...` comment (read with `inspect.getsource` + `tokenize`), so documenting a new key is writing
the comment next to it. In README.md the reference lives between the markers below.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Literal, Union

from grpo import config

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"


# ------------------------------------------------------------------------------------- reading the source
def field_comments(cls) -> dict[str, str]:
    """{field name: comment text} from the comments above each field and the one trailing it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0].body
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        text = " ".join(above + trailing).strip()
        if text:
            out[node.target.id] = text
    return out


def type_name(hint) -> str:
    """`int`, `str | None`, `"constant" | "linear"`, `list[str]` ..., as a reader would write it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    if dataclasses.is_dataclass(hint):
        return "section"
    if hint is typing.Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{_yaml(value)}`"


def _yaml(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


# ------------------------------------------------------------------------------------- rendering
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_table(cls, prefix: str) -> tuple[list[str], list[tuple[str, type]]]:
    """Markdown table rows of one dataclass, and its nested dataclass fields (rendered as their own sections)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = ["| key | type | default | description |", "|---|---|---|---|"], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((f"{prefix}.{f.name}", hint))
            desc = f"see [`{prefix}.{f.name}`](#{_anchor(prefix + '.' + f.name)})"
            if f.name in comments:
                desc = f"{comments[f.name]}; {desc}"
        else:
            desc = comments.get(f.name, "")
        rows.append(f"| `{f.name}` | {_cell(type_name(hint))} | {_cell(default_text(f))} | {_cell(desc)} |")
    return rows, nested


def _anchor(name: str) -> str:
    """GitHub's heading anchor for `### `name``: lowercase, dots and backticks dropped."""
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def _doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split()) if doc and not doc.startswith(f"{cls.__name__}(") else ""


def recipe_reference() -> str:
    """Markdown: one table per recipe section (and nested section), in the order of `config.Recipe`."""
    out = [
        "Generated from `grpo/config.py` by `python -m grpo.docs --write README.md` (a test checks it is current). "
        "Every key has a default except a reward's `name`; unknown keys are an error. Override any key on the command "
        "line with "
        "`section.key=value` (YAML value), list items by index: `rewards.0.weight=2`.",
        "",
    ]
    hints = typing.get_type_hints(config.Recipe)
    queue = [(f.name, hints[f.name]) for f in dataclasses.fields(config.Recipe)]
    while queue:
        name, hint = queue.pop(0)
        if typing.get_origin(hint) is list:  # `rewards`, `constraints`: lists of entries
            (cls,) = typing.get_args(hint)
            intro = (
                f"A list; each entry is one reward. {_doc(cls)} Keys of an entry other than the ones below are passed "
                f"to the reward function as keyword arguments."
                if cls is config.RewardSpec
                else f"A list; each entry: {_doc(cls)}"
            )
        else:
            cls, intro = hint, _doc(hint)
        rows, nested = section_table(cls, name)
        out += [f"### `{name}`", ""] + ([intro, ""] if intro else []) + rows + [""]
        queue = nested + queue
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------- README
def replace_between_markers(text: str, content: str) -> str:
    """`text` with what lies between START and END replaced by `content`; ValueError if the markers are missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found")
    return text[: start + len(START)] + "\n" + content.strip() + "\n" + text[end:]


def current_reference(text: str) -> str | None:
    start, end = text.find(START), text.find(END)
    return None if start < 0 or end < start else text[start + len(START) : end].strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m grpo.docs", description="Recipe reference generated from grpo/config.py."
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE's reference (between the markers) is out of date"
    )
    group.add_argument("--write", metavar="FILE", help="rewrite FILE's reference (between the markers)")
    args = p.parse_args(argv)
    ref = recipe_reference()
    target = args.check or args.write
    if target is None:
        sys.stdout.write(ref)
        return 0
    path = Path(target)
    text = path.read_text() if path.is_file() else ""
    current = current_reference(text)
    if current is None:
        print(
            f"error: {path} has no recipe reference section: add the lines {START} and {END} where it should go",
            file=sys.stderr,
        )
        return 2
    if args.check:
        if current.strip() != ref.strip():
            print(
                f"{path}: the recipe reference is out of date; run `python -m grpo.docs --write {path}`",
                file=sys.stderr,
            )
            return 1
        return 0
    if current.strip() != ref.strip():
        path.write_text(replace_between_markers(text, ref))
        print(f"updated the recipe reference in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
