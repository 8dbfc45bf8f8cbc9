"""The calculator tool of the toy tool world, and the call syntax the toy tokenizer can write.

The tool is a plain Python function: its name, docstring and type hints are its JSON schema
(`grpo.environments.Tool`), and the recipe names it by dotted path::

    environment:
      name: examples.tools.calculator:ToyToolEnv
      tools: [examples.tools.calculator:calc]
      stop_strings: ["</t>"]

The built-in ``tools`` environment reads Hermes-style ``<tool_call>...</tool_call>`` blocks, which the
toy world's 53-symbol character tokenizer cannot write (no ``_``, ``<``, ``(``, ``{``). `ToyToolEnv` is that
environment with the toy world's syntax instead: a tool call is ``<t>NAME:ARGUMENTS</t>`` (``<t>`` and
``</t>`` are single tokens of the toy vocabulary, so ``</t>`` ends the turn as a stop token), e.g.
``<t>calc:47x38</t>``; the tool's answer is inserted as plain text right after it (``1786``), and the
model then writes its answer ``<a>1786</a>``. A turn without ``<t>`` ends the episode. Everything else
(tool lookup, errors and timeouts as observations, the ``tool_calls`` / ``tool_failures`` counts the
metrics read) is the built-in environment's.
"""

from __future__ import annotations

import re

from grpo.environments import ToolEnv

CALL_OPEN, CALL_CLOSE = "<t>", "</t>"
_CALL_RE = re.compile(re.escape(CALL_OPEN) + r"(.*?)(" + re.escape(CALL_CLOSE) + r"|$)", re.S)
_BODY_RE = re.compile(r"([a-z]+):(.*)", re.S)
_EXPR_RE = re.compile(r"\s*(-?\d+)\s*([-+x])\s*(-?\d+)\s*")


def calc(expression: str) -> str:
    """Adds, subtracts or multiplies two whole numbers.

    Args:
        expression: two whole numbers with +, - or x between them (x multiplies), e.g. "347x582"
    """
    m = _EXPR_RE.fullmatch(expression)
    if not m:
        raise ValueError("expected two whole numbers with + - or x between them, e.g. 347x582")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def parse_toy_calls(text: str) -> list[tuple[str | None, str | None, str | None]]:
    """(name, arguments, error) of every ``<t>name:arguments</t>`` block of `text` (arguments as text)."""
    out = []
    for body, close in _CALL_RE.findall(text):
        m = _BODY_RE.fullmatch(body.strip())
        if not close:
            out.append((None, None, "unterminated call (no </t>)"))
        elif not m:
            out.append((None, None, "expected <t>name:arguments</t>"))
        else:
            out.append((m.group(1), m.group(2), None))
    return out


class ToyToolEnv(ToolEnv):
    """The built-in ``tools`` environment with the toy world's call syntax ``<t>name:arguments</t>``.

    Settings (recipe `environment:` keys): those of `grpo.environments.ToolEnv`; the observation template
    defaults to ``{result}`` (the bare answer, which the toy vocabulary can always write for a number).
    """

    def __init__(self, row: dict, *, observation_template: str = "{result}", **settings):
        super().__init__(row, observation_template=observation_template, **settings)

    def step(self, completion_text: str, completion_ids: list[int]):
        calls = parse_toy_calls(completion_text)
        if not calls:
            return None
        return "".join(self.template.replace("{result}", self._run(*call)) for call in calls)
