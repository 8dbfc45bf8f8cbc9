"""Reward-function protocol, registry and output checks.

Protocol (DESIGN.md, "Reward functions"; the open-r1 / TRL convention)::

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

One float per completion; ``None`` means "not applicable to this sample" and is excluded from
that reward's statistics (it becomes NaN in the ``[N, K]`` reward matrix, see
`grpo.advantages.combine_rewards`). ``columns`` carries every dataset column of the sample
(e.g. ``answer``), repeated per generation, plus ``completion_ids`` (list of token-id lists);
a reward's own settings from the recipe arrive as keyword arguments too, so every reward must
accept ``**kwargs``.

A recipe names a reward either by its registered name (``accuracy``) or by a dotted path
``package.module:function`` (`resolve_reward`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from typing import Any, Callable, Sequence

from grpo.registry import Registry

RewardFn = Callable[..., Sequence["float | None"]]

REWARDS: Registry = Registry("reward")


class RewardError(Exception):
    """A reward could not be resolved, raised, or returned invalid values (one-line message)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under ``name`` (duplicates are an error)."""
    return REWARDS.register(name)


def resolve_reward(name_or_path: str | RewardFn) -> RewardFn:
    """Returns the reward function for a registered name or a ``package.module:function`` path.

    ``package.module:Class.attr`` (nested attributes after the colon) also works. A callable is
    returned unchanged.

    Raises:
      RewardError: unknown name, module not importable, attribute missing, or not callable;
        the message names the spec and how to fix it.
    """
    if callable(name_or_path):
        return name_or_path
    spec = name_or_path
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"reward must be a registered name or 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec in REWARDS:
            return REWARDS.get(spec)
        hint = (
            "; for your own function write 'package.module:function' (colon before the function)"
            if "." in spec
            else "; or give a dotted path 'package.module:function'"
        )
        raise RewardError(f"unknown reward {spec!r}; valid: {', '.join(REWARDS.names())}{hint}")
    return _import_path(spec)


def _import_path(spec: str) -> RewardFn:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward {spec!r}: expected 'package.module:function' with both parts non-empty")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardError(
            f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
            "install it or add its folder to PYTHONPATH"
        ) from e
    except SyntaxError as e:  # the module's own code does not parse
        raise RewardError(
            f"reward {spec!r}: module {module_name!r} has a syntax error ({e.msg}) at {e.filename}, line {e.lineno}; "
            "fix the module"
        ) from e
    except Exception as e:  # the module's top-level code raised while importing
        raise RewardError(
            f"reward {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {_first_line(e)}"
            f"{_where_raised(e)}; fix the module (its top-level code runs at import)"
        ) from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardError(
                f"reward {spec!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {part!r}; "
                f"check the name after ':'"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(
            f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable; point it at a "
            "function f(prompts, completions, **columns) -> list[float | None]"
        )
    return obj


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else "(no message)"


def _where_raised(e: BaseException) -> str:
    """' (at file:line)' of the innermost frame of a traceback, '' when unknown."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def check_reward_output(name: str, values: Any, n: int) -> list[float]:
    """Validates one reward's output and maps ``None`` to ``float('nan')``.

    Args:
      name: the reward's name, used in error messages.
      values: what the reward returned: a sequence of ``n`` numbers or ``None`` (numpy arrays
        and torch tensors are accepted via ``.tolist()``).
      n: number of completions it was called with.

    Returns:
      ``n`` python floats, NaN where the reward returned ``None`` (not applicable).

    Raises:
      RewardError: wrong container or length; a value that is not a real number or ``None``;
        a NaN or infinite value (naming the reward and the sample index).
    """
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; expected a list of {n} floats (or None)")
    if len(values) != n:
        raise RewardError(
            f"reward {name!r} returned {len(values)} values for {n} completions; "
            "it must return one float (or None) per completion"
        )
    out: list[float] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {name!r} returned {type(v).__name__} {v!r} for sample {i}; expected a float or None"
            )
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(
                f"reward {name!r} returned {f} for sample {i}; rewards must be finite "
                "(return None for 'not applicable')"
            )
        out.append(f)
    return out


def call_reward(name: str, fn: RewardFn, prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Calls ``fn`` and checks its output; any exception becomes a `RewardError` naming ``name``.

    Returns:
      ``len(completions)`` floats, NaN for "not applicable".
    """
    try:
        values = fn(prompts, completions, **columns)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
    return check_reward_output(name, values, len(completions))


def signature_problems(
    fn, settings_given: dict, *, where: str, registered: bool, columns: set | None = None, data_key: str = "the dataset"
) -> list[str]:
    """Whether `fn` fits the protocol for its recipe entry: one line per problem, [] if it fits.

    Its recipe settings (`settings_given`) are parameters it names (a built-in's misspelt setting is
    an error even with ``**columns``, which would swallow it; a user function's ``**columns`` may take
    them); with the dataset's `columns` known: it accepts them all (``**columns``) and the columns it
    reads exist. Used by grpo's preflight and when the run builds its rewards: one rule, one wording.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    named = [n for n, q in params.items() if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
    var_kw = any(q.kind == q.VAR_KEYWORD for q in params.values())
    settings = [n for n, q in params.items() if q.kind == q.KEYWORD_ONLY]
    unknown = [k for k in settings_given if k not in named[2:]]  # prompts, completions come first
    if unknown and (not var_kw or registered):
        valid = ", ".join(settings if var_kw else named[2:]) or "(none)"
        return [
            f"{where}: unknown setting(s) {', '.join(unknown)} in its recipe entry; it accepts {valid}; fix the "
            "spelling or remove them"
        ]
    p = []
    if not var_kw and columns is not None:
        refused = sorted(c for c in columns if c not in named[2:] and c not in settings_given)
        if refused:
            p.append(
                f"{where} does not accept the columns it is called with ({', '.join(refused)}): every dataset column "
                "and "
                "completion_ids arrive as keyword arguments; give it a **columns parameter"
            )
    if columns is not None:
        reads = [
            n
            for n in named[2:]
            if params[n].kind == params[n].POSITIONAL_OR_KEYWORD
            and n not in settings_given
            and (registered or params[n].default is params[n].empty)
        ]
        missing = [n for n in reads if n not in columns]
        if missing:
            have = ", ".join(sorted(columns - {"completion_ids"}))
            p.append(
                f"{where} reads the column(s) {', '.join(missing)}, which {data_key} does not have (columns: {have}); "
                "rename the column in the data or use another reward"
            )
    return p
