"""Built-in verifiable (rule-based) rewards, registered by name.

Every function follows the protocol in `rewards.registry`:
``f(prompts, completions, **columns) -> list[float | None]``; the keyword arguments listed
in each signature are the reward's own settings (from the recipe entry, with defaults),
and unknown columns are ignored via ``**kwargs``.

The toy world (DESIGN.md) formats answers as ``<t>...</t><a>85</a>`` and treats a
completion containing the word "sorry" as a refusal. For math on real datasets use the
``math-verify`` package (open-r1's checker) through a dotted-path reward.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from rewards.registry import RewardError, register_reward

REFUSAL_TEXT = "sorry, i cannot help with that."
"""The canonical refusal of the toy world."""

REFUSAL_MARKER = "sorry"
_WS_RE = re.compile(r"\s+")


def is_refusal(text: str) -> bool:
    """True iff ``text`` contains "sorry" (case-insensitive substring): the toy world's rule.

    Same rule as ``data/build_toyworld.py`` and the eval's refusal rates.
    """
    return REFUSAL_MARKER in text.lower()


def _column(name: str, values, columns: dict, reward: str, n: int) -> list:
    """The column ``values`` checked for presence and length; ``columns`` is for the message."""
    if values is None:
        raise RewardError(
            f"reward {reward!r} needs a {name!r} column in the dataset; "
            f"available columns: {', '.join(sorted(columns)) or '(none)'}"
        )
    if len(values) != n:
        raise RewardError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return list(values)


# ----------------------------------------------------------------------------------------
# accuracy / format


def extract_answer(text: str, tags: Sequence[str] = ("<a>", "</a>")) -> str | None:
    """The content of the LAST ``open ... close`` span in ``text``, or None if there is none."""
    open_tag, close_tag = tags
    pattern = re.escape(open_tag) + r"(.*?)" + re.escape(close_tag)
    found = re.findall(pattern, text, flags=re.DOTALL)
    return found[-1] if found else None


def _to_number(text: str) -> float | None:
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _normalise(text: str) -> str:
    return _WS_RE.sub(" ", text.strip().lower())


def answers_match(predicted: str, reference: str, tolerance: float = 1e-6) -> bool:
    """Numeric comparison when both parse as finite numbers (``,`` ignored), else normalised
    string equality (case-folded, whitespace collapsed)."""
    p, r = _to_number(predicted), _to_number(reference)
    if p is not None and r is not None:
        return abs(p - r) <= tolerance * max(1.0, abs(r))
    return _normalise(predicted) == _normalise(reference)


@register_reward("accuracy")
def accuracy_reward(
    prompts: list[str],
    completions: list[str],
    answer: Sequence | None = None,
    *,
    tags: Sequence[str] = ("<a>", "</a>"),
    tolerance: float = 1e-6,
    answer_field: str = "answer",
    reference_regex: str | None = None,
    **kwargs,
) -> list[float | None]:
    """1.0 if the last ``<a>...</a>`` span equals the ``answer`` column, else 0.0.

    Outcome reward as in DeepSeek-R1's rule-based accuracy reward. Comparison: numeric
    (relative tolerance ``tolerance``) when both sides parse as numbers, else normalised
    string equality. No span -> 0.0. Samples whose answer is None or empty -> None (not
    applicable, e.g. harmful prompts that have nothing to compute).

    Columns: ``answer`` (required; another column with ``answer_field``). Settings: ``tags``
    (open, close), ``tolerance``, ``reference_regex``: the reference is group 1 of this regex
    searched in the answer column (e.g. ``"####\\s*(.+)$"`` for GSM8K's worked solutions).
    """
    if answer_field != "answer":
        answer = kwargs.get(answer_field)
    answers = _column(answer_field, answer, kwargs, "accuracy", len(completions))
    pattern = re.compile(reference_regex, flags=re.MULTILINE) if reference_regex else None
    out: list[float | None] = []
    for completion, ref in zip(completions, answers):
        ref = "" if ref is None else str(ref)
        if pattern is not None:
            m = pattern.search(ref)
            ref = m.group(1) if m else ""
        if not ref.strip():
            out.append(None)
            continue
        predicted = extract_answer(completion, tags)
        out.append(1.0 if predicted is not None and answers_match(predicted, ref, tolerance) else 0.0)
    return out


@register_reward("format")
def format_reward(
    prompts: list[str],
    completions: list[str],
    *,
    tags: Sequence[str] = ("<a>", "</a>"),
    **kwargs,
) -> list[float]:
    """1.0 if every tag in ``tags`` appears, in this order and without overlap, else 0.0.

    E.g. ``tags=["<t>", "</t>", "<a>", "</a>"]`` for the toy world's think-then-answer format
    (DeepSeek-R1's format reward, made order-aware without a full-match regex).
    """
    if not tags:
        raise RewardError("reward 'format': tags must name at least one tag")
    out = []
    for text in completions:
        pos, ok = 0, True
        for tag in tags:
            i = text.find(tag, pos)
            if i < 0:
                ok = False
                break
            pos = i + len(tag)
        out.append(1.0 if ok else 0.0)
    return out


# ----------------------------------------------------------------------------------------
# length-based


def _lengths(columns: dict, reward: str, n: int) -> list[int]:
    ids = _column("completion_ids", columns.get("completion_ids"), columns, reward, n)
    return [len(x) for x in ids]


@register_reward("soft_overlong")
def soft_overlong_reward(
    prompts: list[str],
    completions: list[str],
    *,
    max_completion_length: int | None = None,
    cache_length: int | None = None,
    **kwargs,
) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Sec. 3.4).

    With ``L = len(completion_ids)``, ``L_max = max_completion_length``, ``L_c = cache_length``::

        0                          if L <= L_max - L_c
        ((L_max - L_c) - L) / L_c  if L_max - L_c < L <= L_max   (linear from 0 to -1)
        -1                         if L > L_max

    Settings: ``max_completion_length`` (required; the generation budget), ``cache_length``
    (default ``max_completion_length // 5``, DAPO's 4096 of 20480). Columns: ``completion_ids``.
    """
    if max_completion_length is None or max_completion_length < 1:
        raise RewardError(
            "reward 'soft_overlong' needs max_completion_length (a positive int, usually the "
            "rollout's max_new_tokens); set it in the reward's recipe entry"
        )
    cache = max_completion_length // 5 if cache_length is None else int(cache_length)
    if not 0 <= cache <= max_completion_length:
        raise RewardError(f"reward 'soft_overlong': cache_length must be in [0, {max_completion_length}], got {cache}")
    start = max_completion_length - cache
    out = []
    for length in _lengths(kwargs, "soft_overlong", len(completions)):
        if length <= start:
            out.append(0.0)
        elif length <= max_completion_length:
            out.append((start - length) / cache)
        else:
            out.append(-1.0)
    return out


@register_reward("length")
def length_reward(
    prompts: list[str],
    completions: list[str],
    *,
    max_completion_length: int | None = None,
    target_length: int | None = None,
    **kwargs,
) -> list[float]:
    """Length penalty in ``[-1, 0]`` on completion token counts (``completion_ids``).

    - Without ``target_length``: ``-min(L / max_completion_length, 1)``; shorter is better.
    - With ``target_length``: ``-min(|L - target_length| / target_length, 1)``; 0 exactly at
      the target, -1 at twice the target or at length 0.

    Settings: ``max_completion_length`` (needed when no ``target_length``), ``target_length``.
    """
    if target_length is not None:
        if target_length < 1:
            raise RewardError(f"reward 'length': target_length must be >= 1, got {target_length}")
        scale, centre = float(target_length), float(target_length)
    elif max_completion_length is not None and max_completion_length >= 1:
        scale, centre = float(max_completion_length), 0.0
    else:
        raise RewardError(
            "reward 'length' needs target_length or max_completion_length (positive ints) in its recipe entry"
        )
    return [-min(abs(length - centre) / scale, 1.0) for length in _lengths(kwargs, "length", len(completions))]


@register_reward("completion_tokens")
def completion_tokens_cost(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The number of completion tokens (``completion_ids``, the stop token included): a cost for a length budget,
    e.g. ``constraints: [{reward: completion_tokens, kind: mean, threshold: 24}]`` (mean tokens <= 24)."""
    return [float(n) for n in _lengths(kwargs, "completion_tokens", len(completions))]


# ----------------------------------------------------------------------------------------
# repetition


@register_reward("repetition")
def repetition_reward(
    prompts: list[str],
    completions: list[str],
    *,
    ngram: int = 3,
    max_penalty: float = -1.0,
    unit: str = "word",
    **kwargs,
) -> list[float]:
    """Negative fraction of repeated n-grams (open-r1's repetition penalty).

    ``reward = -|max_penalty| * (1 - unique_ngrams / total_ngrams)``: 0 with no repeats, near
    ``-|max_penalty|`` for a degenerate loop. Texts with fewer than ``ngram`` units get 0.

    Settings: ``ngram`` (n-gram size), ``max_penalty`` (sign ignored; open-r1 writes it
    negative), ``unit``: ``"word"`` (whitespace split, as open-r1) or ``"char"`` (for texts
    without spaces such as the toy world's).
    """
    if ngram < 1:
        raise RewardError(f"reward 'repetition': ngram must be >= 1, got {ngram}")
    if unit not in ("word", "char"):
        raise RewardError(f"reward 'repetition': unknown unit {unit!r}; valid: char, word")
    out = []
    for text in completions:
        units = text.lower().split() if unit == "word" else list(text)
        grams = [tuple(units[i : i + ngram]) for i in range(len(units) - ngram + 1)]
        if not grams:
            out.append(0.0)
            continue
        repeated = 1.0 - len(set(grams)) / len(grams)
        out.append(-abs(max_penalty) * repeated)
    return out


# ----------------------------------------------------------------------------------------
# refusal (toy-world safety rule)


@register_reward("refusal")
def refusal_reward(
    prompts: list[str],
    completions: list[str],
    category: Sequence | None = None,
    *,
    harmful_categories: Sequence[str] = ("harmful",),
    over_refusal_penalty: float = -1.0,
    **kwargs,
) -> list[float | None]:
    """Rewards refusing harmful requests and penalises refusing benign ones.

    A completion is a refusal iff `is_refusal` (it contains the word "sorry").
      - ``category`` in ``harmful_categories``: 1.0 if refusal else 0.0;
      - any other category: 0.0 if it answers, ``over_refusal_penalty`` (default -1.0) if it
        refuses;
      - category None: None (not applicable).

    Columns: ``category`` (required). Settings: ``harmful_categories``, ``over_refusal_penalty``.
    """
    categories = _column("category", category, kwargs, "refusal", len(completions))
    harmful = set(harmful_categories)
    out: list[float | None] = []
    for text, cat in zip(completions, categories):
        if cat is None:
            out.append(None)
        elif cat in harmful:
            out.append(1.0 if is_refusal(text) else 0.0)
        else:
            out.append(float(over_refusal_penalty) if is_refusal(text) else 0.0)
    return out


@register_reward("over_refusal")
def over_refusal_cost(
    prompts: list[str],
    completions: list[str],
    category: Sequence | None = None,
    *,
    categories: Sequence[str] = ("benign",),
    **kwargs,
) -> list[float | None]:
    """A cost for a constraint on over-refusal: 1.0 if a prompt of one of ``categories`` is refused, 0.0 if it is
    answered, None (not applicable) for every other prompt.

    A completion is a refusal iff `is_refusal` (it contains the word "sorry"). As a `kind: rate` constraint,
    ``{reward: over_refusal, kind: rate, threshold: d}`` keeps the share of sampled completions that refuse a
    benign request at most ``d`` (of all samples: a non-applicable one counts as 0), the counterweight to a safety
    constraint whose push towards refusing spreads to requests that look alike (README "Safety-constrained GRPO").

    Columns: ``category`` (required). Settings: ``categories`` (default ``("benign",)``).
    """
    cats = _column("category", category, kwargs, "over_refusal", len(completions))
    wanted = set(categories)
    return [
        (1.0 if is_refusal(text) else 0.0) if cat is not None and cat in wanted else None
        for text, cat in zip(completions, cats)
    ]
