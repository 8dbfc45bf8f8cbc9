"""Environments and tools for multi-turn rollouts (DESIGN.md, "Multi-turn: tools and environments").

An environment is plain Python, one object per sample, made from the dataset row::

    class MyEnv:
        def __init__(self, row: dict, **settings): ...
        def reset(self, row) -> Observation: ...            # first observation (None: nothing to add)
        def step(self, completion_text, completion_ids) -> Observation: ...   # None = the episode is done
        def reward(self) -> float | None: ...              # optional: the `environment` reward reads it

An observation is text (tokenised without special tokens), a list of token ids (inserted verbatim), or
a list of chat messages (rendered by the tokenizer's chat template as the continuation of a conversation,
`render_messages`). The rollout driver (`grpo.rollout.multiturn`) inserts the observation's token ids
into the trajectory, masked out of the loss.

A tool is a plain Python function; its name, docstring and type hints give its JSON schema
(`transformers.utils.get_json_schema`, what chat templates' ``tools=`` take). The built-in environment
``tools`` runs the tool calls a turn makes, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(Hermes / Qwen2.5 format) or ``<tool_call>name(args)</tool_call>``, and answers with each result in
``<tool_response>...</tool_response>``; a turn without a tool call ends the episode. A tool that raises,
times out or is called wrongly answers with an error the model sees; an environment that raises or
returns something else than an observation stops the run (`EnvironmentContractError`, one line).

Recipe (settings beside the name, as for rewards)::

    environment:
      name: tools                       # a registered environment or package.module:Class
      tools: [calculator, {name: mypkg.tools:search, top_k: 3}]   # settings are bound, not in the schema
      max_turns: 4
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import importlib
import inspect
import json
import math
import operator
import re
from typing import Any, Callable

from grpo.errors import UserError, first_line
from grpo.registry import Registry
from grpo.rollout.multiturn import EnvironmentContractError, TurnLimits, run_episodes

ENVIRONMENTS: Registry = Registry("environment")
TOOLS: Registry = Registry("tool")

CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


# ------------------------------------------------------------------------------------- resolution
def resolve(spec: str, registry: Registry, kind: str) -> Callable:
    """The object a recipe names: a registered name or ``package.module:attr`` (one-line UserError otherwise)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{kind} must be a registered name or 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec in registry:
            return registry.get(spec)
        raise UserError(
            f"unknown {kind} {spec!r}; valid: {', '.join(registry.names()) or '(none)'}; "
            "or give a dotted path 'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"{kind} {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {first_line(e)}); "
            "install it or add its folder to PYTHONPATH"
        ) from e
    except Exception as e:
        raise UserError(
            f"{kind} {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {first_line(e)}; "
            "fix the module"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(
                f"{kind} {spec!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}; "
                "check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{kind} {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


class Tool:
    """A tool function with its recipe settings bound; `schema` is its JSON schema minus the bound settings."""

    def __init__(self, fn: Callable, settings: dict | None = None, where: str = "tool"):
        from transformers.utils import get_json_schema

        settings = dict(settings or {})
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        unknown = [k for k in settings if k not in params]
        if unknown:
            raise UserError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; it accepts {', '.join(params) or '(none)'}"
            )
        try:
            schema = get_json_schema(fn)
        except Exception as e:
            raise UserError(
                f"{where}: cannot build its JSON schema ({type(e).__name__}: {first_line(e)}); a tool needs type "
                "hints on every argument and a docstring with an Args: section"
            ) from e
        fn_schema = schema["function"]
        for k in settings:
            fn_schema.get("parameters", {}).get("properties", {}).pop(k, None)
            if k in fn_schema.get("parameters", {}).get("required", []):
                fn_schema["parameters"]["required"].remove(k)
        self.name, self.schema, self.where = fn_schema["name"], schema, where
        self.fn = functools.partial(fn, **settings) if settings else fn
        self.params = [p for p in fn_schema.get("parameters", {}).get("properties", {})]


def build_tools(specs: list) -> list[Tool]:
    """Resolve the recipe's `environment.tools` entries (`ToolSpec`: name + settings); names must be distinct."""
    tools, seen = [], set()
    for i, spec in enumerate(specs):
        where = f"environment.tools.{i} ({spec.name})"
        try:
            fn = resolve(spec.name, TOOLS, "tool")
        except UserError as e:
            raise UserError(f"environment.tools.{i}: {e}") from None
        tool = Tool(fn, spec.kwargs, where)
        if tool.name in seen:
            raise UserError(f"{where}: two tools are named {tool.name!r}; tool names must be distinct")
        seen.add(tool.name)
        tools.append(tool)
    return tools


def environment_factory(cfg) -> Callable[[dict], Any]:
    """`row -> environment` for the recipe's `environment` section (the tools resolved once)."""
    where = f"environment.name={cfg.name!r}"
    try:
        factory = resolve(cfg.name, ENVIRONMENTS, "environment")
    except UserError as e:
        raise UserError(f"environment: {e}") from None
    tools = build_tools(cfg.tools)
    if isinstance(factory, type) and issubclass(factory, ToolEnv):  # the built-in, or a subclass (another call syntax)
        _check_tool_env_settings(factory, cfg.kwargs, where)
        return functools.partial(factory, tools=tools, timeout_s=cfg.tool_timeout_s, **cfg.kwargs)
    if tools:
        raise UserError(
            f"{where}: environment.tools is read by the built-in 'tools' environment only; "
            "your environment makes its own tool calls"
        )
    try:
        inspect.signature(factory).bind({}, **cfg.kwargs)
    except TypeError as e:
        raise UserError(
            f"{where}: its settings {sorted(cfg.kwargs)} do not fit {factory.__name__}(row, **settings): {e}"
        ) from None
    return functools.partial(factory, **cfg.kwargs)


def _check_tool_env_settings(factory: type, settings: dict, where: str) -> None:
    """The built-in tools environment (or a subclass) takes every extra `environment:` key: each must be a keyword
    of some `__init__` along the class chain down to `ToolEnv` (a subclass passes the rest on with **settings), else
    the first rollout would fail inside the environment; one line naming what is accepted instead."""
    known: list[str] = []
    for klass in factory.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, ToolEnv)) or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        known += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("tools", "timeout_s")]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(
            f"{where}: unknown environment setting(s) {', '.join(unknown)}; it accepts "
            f"{', '.join(dict.fromkeys(known))} besides environment.max_turns, max_tokens_per_turn, "
            "max_observation_tokens, stop_strings, tool_timeout_s and tools (a subclass that reads more settings must "
            "name them in its __init__)"
        )


def tool_schemas(cfg) -> list[dict] | None:
    """The JSON schemas of the recipe's tools, for the chat template's ``tools=`` (None without tools)."""
    return [t.schema for t in build_tools(cfg.tools)] if cfg.name and cfg.tools else None


def environment_problems(cfg) -> list[str]:
    """Preflight: the environment and its tools resolve and fit their contracts (one line per problem)."""
    if not cfg.name:
        return ["environment.tools is set but environment.name is not: add environment.name=tools"] if cfg.tools else []
    try:
        environment_factory(cfg)
    except UserError as e:
        return [str(e)]
    return []


# ------------------------------------------------------------------------------------- the stage's entry point
# what rewards see of an episode, beside the dataset columns and the whole trajectory's text
EPISODE_COLUMNS = ("turns", "observations", "num_turns", "tool_calls", "env_reward")


def rollout_episodes(cfg, rollout, tokenizer, rows: list[dict], n: int, params, seeds: list[int] | None = None):
    """`grpo.rollout.multiturn.run_episodes` for the recipe's `environment` section: (completions, episodes)."""
    limits = TurnLimits(
        max_turns=cfg.max_turns,
        max_tokens_per_turn=cfg.max_tokens_per_turn,
        max_observation_tokens=cfg.max_observation_tokens,
        stop_strings=tuple(cfg.stop_strings),
    )
    return run_episodes(
        rollout,
        tokenizer,
        rows,
        [row["prompt_ids"] for row in rows],
        n,
        params,
        environment_factory(cfg),
        limits,
        seeds=seeds,
        vocab_size=len(tokenizer),
    )


def episode_columns(episodes) -> dict[str, list]:
    """The reward columns of `EPISODE_COLUMNS`, one value per sample ({} without episodes)."""
    if not episodes:
        return {}
    return {
        "turns": [e.turn_texts for e in episodes],
        "observations": [e.observations for e in episodes],
        "num_turns": [e.turns for e in episodes],
        "tool_calls": [e.tool_calls for e in episodes],
        "env_reward": [e.env_reward for e in episodes],
    }


# ------------------------------------------------------------------------------------- the tools environment
def parse_calls(text: str) -> list[tuple[str | None, dict | str | None, str | None]]:
    """(name, arguments, error) of every ``<tool_call>`` block of `text`.

    Accepted bodies: JSON ``{"name": ..., "arguments": {...}}``, or ``name(args)`` with Python literal
    arguments (``f(1, x="a")``), or ``name(free text)`` (the text is the tool's one argument).
    """
    out = []
    for body, close in CALL_RE.findall(text):
        body = body.strip()
        if not close:
            out.append((None, None, "unterminated <tool_call> (no </tool_call>)"))
            continue
        if body.startswith("{"):
            try:
                call = json.loads(body)
            except json.JSONDecodeError as e:
                out.append((None, None, f"the tool call is not valid JSON ({e.msg})"))
                continue
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                out.append((None, None, 'a JSON tool call needs {"name": ..., "arguments": {...}}'))
                continue
            args = call.get("arguments", {})
            if isinstance(args, str):  # some models emit the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            out.append(
                (
                    call["name"],
                    args if isinstance(args, dict) else None,
                    None if isinstance(args, dict) else "arguments must be a JSON object",
                )
            )
            continue
        m = re.fullmatch(r"([A-Za-z_]\w*)\((.*)\)", body, re.S)
        if not m:
            out.append((None, None, "expected name(arguments) or a JSON object"))
            continue
        out.append((m.group(1), _python_args(m.group(2)), None))
    return out


def _python_args(text: str) -> dict | str:
    """Keyword/positional literal arguments as {"__args__": [...], **kwargs}, or the raw text."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
        return {"__args__": args, **kwargs}
    except (SyntaxError, ValueError):
        return text


class ToolEnv:
    """The built-in ``tools`` environment: each turn's tool calls are run and answered; no call = done.

    Settings: observation_template (``{result}`` is replaced by the tool's answer, one per call) or
    chat=true (answers as ``tool`` messages through the tokenizer's chat template, see `render_messages`).
    """

    def __init__(
        self,
        row: dict,
        *,
        tools: list[Tool],
        timeout_s: float | None = 10.0,
        observation_template: str = "<tool_response>{result}</tool_response>",
        chat: bool = False,
    ):
        self.tools = {t.name: t for t in tools}
        self.timeout_s, self.template, self.chat = timeout_s, observation_template, chat
        self.tool_calls = self.tool_failures = 0

    def reset(self, row: dict):
        return None

    def step(self, completion_text: str, completion_ids: list[int]):
        calls = parse_calls(completion_text)
        if not calls:
            return None
        results = [self._run(*call) for call in calls]
        if self.chat:
            return [{"role": "tool", "content": r} for r in results]
        return "".join(self.template.replace("{result}", r) for r in results)

    def _run(self, name, args, error) -> str:
        self.tool_calls += 1
        if error is None and name not in self.tools:
            error = f"unknown tool {name!r}; tools: {', '.join(self.tools)}"
        if error is None:
            try:
                value = call_with_timeout(self.tools[name], args, self.timeout_s)
            except Exception as e:  # the tool's failure is the model's observation
                error = f"{type(e).__name__}: {first_line(e)}"
            else:
                return _as_text(value, self.tools[name].where)
        self.tool_failures += 1
        return f"error: {error}"


def call_with_timeout(tool: Tool, args: dict | str, timeout_s: float | None):
    """Run `tool` with parsed `args`; TimeoutError after timeout_s (the thread is left to finish on its own)."""
    if isinstance(args, str):
        if len(tool.params) != 1:
            raise TypeError(f"{tool.name} takes {len(tool.params)} arguments; call it with JSON or name(a, b=...)")
        pos, kw = [args], {}
    else:
        kw = dict(args)
        pos = kw.pop("__args__", [])
    if timeout_s is None:
        return tool.fn(*pos, **kw)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(tool.fn, *pos, **kw).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"tool {tool.name!r} timed out after {timeout_s:g} s") from None
    finally:
        pool.shutdown(wait=False)


def _as_text(value, where: str = "a tool") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        raise EnvironmentContractError(
            f"{where} returned a {type(value).__name__}: tools must return text, a number, or "
            "JSON-serialisable lists/dicts"
        ) from None


ENVIRONMENTS.add("tools", ToolEnv)


# ------------------------------------------------------------------------------------- built-in tools
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


@TOOLS.register("calculator")
def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "123*456+7"
    """

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    if len(expression) > 200:
        raise ValueError("expression longer than 200 characters")
    value = ev(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        value = int(value)
    return str(value)
