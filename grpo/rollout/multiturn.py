"""Multi-turn rollouts: generate, let the environment answer, insert its tokens, continue (token-exact).

    comps, episodes = run_episodes(rollout, tokenizer, rows, prompt_ids, n, params, make_env, limits)

For each of the ``len(rows) * n`` samples (grouped by prompt, as `Rollout.generate` returns them) an
environment is made from its row (`grpo.environments`), and turns alternate:

1. the backend samples a turn from ``prompt + trajectory so far`` until a stop token, a stop string
   (`TurnLimits.stop_strings`: single-token strings are stop ids; longer ones cut the turn after the
   token that completes them) or the turn's token limit;
2. ``env.step(turn_text, turn_ids)`` returns the next observation, or None: the episode is done;
3. the observation's token ids (cut to `max_observation_tokens`) are appended to the trajectory.

The result is one `Completion` per sample whose ``token_ids`` is the whole trajectory: the sampled ids
and the inserted observation ids exactly as they went into the model (never text tokenised again);
``logprobs`` holds each sampled token's sampling log-prob (0.0 on observation tokens) and
``sampled_mask`` marks which ids were sampled (the trainer's loss mask). Limits: `max_turns` (an
episode whose environment still answers after the last turn is truncated), the token budget
``params.max_new_tokens`` for the whole trajectory (sampled + observation tokens; an observation that
does not fit truncates the episode), and the per-turn `max_tokens_per_turn`. Truncated episodes finish
with ``"length"``; finished ones with their last turn's reason.

Two ways to sample a turn, the same ids under greedy decoding (tests/test_multiturn.py):
- continuation (backends with `open_episodes`, i.e. ``engine``; the default there): one session per chunk of
  prompts keeps every sample's KV between turns; a turn feeds only the previous turn's last token and the
  inserted observation (`grpo.rollout.continuation`), nothing of the history is prefilled again;
- re-prefill (any backend, ``hf``, or ``kv_continuation=False``): ``prompt + trajectory`` goes through the
  backend's `generate` again every turn.
Samples of a group may take different numbers of turns. Cutting a sampled turn at a stop string or a budget
keeps a prefix of an autoregressive sample, itself a sample: the logprobs stay exact.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from grpo.errors import UserError, first_line
from grpo.rollout.base import Completion, Rollout, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class TurnLimits:
    """Episode limits. The whole trajectory's token budget is SamplingParams.max_new_tokens."""

    max_turns: int = 4
    max_tokens_per_turn: int | None = None
    max_observation_tokens: int = 256
    stop_strings: tuple[str, ...] = ()


@dataclass
class Episode:
    """What happened in one sample's episode (for rewards and metrics)."""

    turns: int = 0  # model turns
    turn_texts: list[str] = field(default_factory=list)  # each turn's sampled text
    observations: list[str] = field(default_factory=list)  # each inserted observation, decoded
    tool_calls: int = 0
    tool_failures: int = 0
    observation_tokens: int = 0
    truncated: str | None = None  # "max_turns" | "budget" | None
    observation_cut: int = 0  # observations cut to max_observation_tokens
    env_reward: float | None = None


class EnvironmentContractError(UserError):
    """An environment or tool broke its contract (raised where it must not, returned a wrong type): one line."""


def _contract(env, what: str, e: BaseException | None = None, got: Any = None) -> Exception:
    name = type(env).__name__
    if e is not None:
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        at = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""
        return EnvironmentContractError(
            f"environment {name}.{what} raised {type(e).__name__}: {first_line(e)}{at}; "
            "an environment must not raise (return an observation describing the problem)"
        )
    return EnvironmentContractError(
        f"environment {name}.{what} returned {type(got).__name__} {str(got)[:60]!r}; "
        "expected None (done), text, a list of token ids or a list of chat messages"
    )


def observation_ids(
    obs, env, what: str, tokenizer, vocab_size: int | None, turn_text: str | None = None
) -> list[int] | None:
    """The token ids of an observation (text, ids or chat messages; `turn_text`: the turn it answers, see
    `render_messages`); None stays None."""
    if obs is None:
        return None
    if isinstance(obs, str):
        return list(tokenizer.encode(obs, add_special_tokens=False)) if obs else []
    if isinstance(obs, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in obs):
        ids = [int(t) for t in obs]
        if ids and vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise _contract(env, what, got=f"token ids outside [0, {vocab_size})")
        return ids
    if isinstance(obs, (list, tuple)) and obs and all(isinstance(m, dict) and "role" in m for m in obs):
        return list(tokenizer.encode(render_messages(tokenizer, list(obs), turn_text), add_special_tokens=False))
    raise _contract(env, what, got=obs)


def render_messages(tokenizer, messages: list[dict], turn_text: str | None = None) -> str:
    """The text the chat template adds for `messages` after an assistant turn, ending with the generation prompt.

    Rendered as the difference between a short conversation with and without them (templates add a system
    prompt or BOS at the start, which must not be inserted mid-trajectory). With `turn_text` (the sampled turn
    the messages answer), the text starts right after the assistant's content instead, so it closes the assistant
    message as the template does (Qwen2.5: ``<|im_end|>\n``), less what the turn already ended with: a turn
    that stopped at the end-of-message token gets ``\n<|im_start|>user...``, one cut at ``</tool_call>`` gets
    ``<|im_end|>\n<|im_start|>user...``; either way the trajectory reads as the template renders it.
    """
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        before = tokenizer.apply_chat_template(base, tokenize=False)
        after = tokenizer.apply_chat_template(base + list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise UserError(
            f"the tokenizer's chat template cannot render the observation messages "
            f"({type(e).__name__}: {first_line(e)}); return text or token ids instead"
        ) from e
    if not after.startswith(before):
        raise UserError(
            "the tokenizer's chat template rewrites earlier turns when a message is added; "
            "return the observation as text or token ids instead of messages"
        )
    if turn_text is None or "y" not in before:
        return after[len(before) :]
    rendered = after[before.rindex("y") + 1 :]  # the assistant message's end, the messages, the generation prompt
    closing = len(before) - before.rindex("y") - 1
    overlap = next((k for k in range(closing, 0, -1) if turn_text.endswith(rendered[:k])), 0)
    return rendered[overlap:]


def stop_ids_of(tokenizer, stop_strings: Sequence[str]) -> tuple[list[int], list[str]]:
    """Stop strings that are one token of the vocabulary become stop ids; the rest are matched in the text."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids, texts = [], []
    for s in stop_strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if s in vocab:
            ids.append(int(vocab[s]))
        elif len(enc) == 1 and tokenizer.decode(enc) == s:
            ids.append(int(enc[0]))
        else:
            texts.append(s)
    return ids, texts


def cut_at_stop_string(tokenizer, ids: list[int], stops: Sequence[str]) -> int | None:
    """Length of the shortest prefix of `ids` whose text contains a stop string, or None."""
    if not stops or not ids:
        return None

    def hit(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)  # hit(hi) is True; containment is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class _Sample:
    prompt: list[int]
    env: Any
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    done: bool = False
    finish: str = "stop"
    episode: Episode = field(default_factory=Episode)


def run_episodes(
    rollout: Rollout,
    tokenizer,
    rows: list[dict],
    prompt_ids: list[list[int]],
    n: int,
    params: SamplingParams,
    make_env: Callable[[dict], Any],
    limits: TurnLimits,
    seeds: list[int] | None = None,
    vocab_size: int | None = None,
    kv_continuation: bool | None = None,
) -> tuple[list[Completion], list[Episode]]:
    """n multi-turn episodes per prompt (see the module docstring); completions grouped by prompt.

    `seeds` (one per prompt, `rollout.seed_per_prompt`): each group is drawn by its own calls (re-prefill: seeded
    from (seed, sample, turn); continuation: one session seeded from the prompt's seed), so samples do not depend
    on the batch; else one call per turn seeded from (params.seed, turn), or one session per chunk of prompts.
    `kv_continuation`: continue on the backend's KV cache (`open_episodes`, the engine); None = when the backend
    offers it, False = re-prefill the history every turn (any backend).
    """
    stop_ids, stop_texts = stop_ids_of(tokenizer, limits.stop_strings)
    params = dataclasses.replace(params, stop_token_ids=tuple(dict.fromkeys([*params.stop_token_ids, *stop_ids])))
    budget = params.max_new_tokens
    samples = []
    for i, row in enumerate(rows):
        for _ in range(n):
            try:
                env = make_env(row)
            except Exception as e:
                raise _contract(make_env, "__init__", e) from e
            samples.append(_Sample(list(prompt_ids[i]), env))
    for k, s in enumerate(samples):  # the first observation goes into the trajectory (masked): a group keeps one prompt
        try:
            first = s.env.reset(rows[k // n])
        except Exception as e:
            raise _contract(s.env, "reset", e) from e
        obs = observation_ids(first, s.env, "reset", tokenizer, vocab_size)
        if obs:
            _insert(s, obs[: limits.max_observation_tokens], tokenizer, limits)
    offered = hasattr(rollout, "open_episodes")
    if kv_continuation and not offered:
        raise ValueError(f"kv_continuation=True: backend {type(rollout).__name__} has no open_episodes")

    def after(k: int, out: tuple, turn: int) -> None:
        _after_turn(samples[k], *out, tokenizer, stop_texts, budget, limits, turn, vocab_size)

    if offered if kv_continuation is None else kv_continuation:
        _continue_episodes(rollout, samples, n, params, limits, budget, seeds, after)
    else:
        for turn in range(limits.max_turns):
            active = [k for k, s in enumerate(samples) if not s.done]
            if not active:
                break
            outs = _sample_turn(rollout, samples, active, n, params, limits, budget, turn, seeds)
            for k, out in zip(active, outs):
                after(k, out, turn)
    comps, episodes = [], []
    for k, s in enumerate(samples):
        ep = s.episode
        ep.tool_calls, ep.tool_failures = int(getattr(s.env, "tool_calls", 0)), int(getattr(s.env, "tool_failures", 0))
        if hasattr(s.env, "reward"):
            try:
                value = s.env.reward()
            except Exception as e:
                raise _contract(s.env, "reward", e) from e
            if value is not None and not isinstance(value, (int, float)):
                raise _contract(s.env, "reward", got=value)
            ep.env_reward = None if value is None else float(value)
        comps.append(Completion(k // n, s.ids, s.logprobs, s.finish, sampled_mask=s.mask))
        episodes.append(ep)
    return comps, episodes


def _sample_turn(rollout, samples, active, n, params, limits, budget, turn, seeds):
    """One turn for every active sample: (ids, logprobs, finish) each, at most the sample's own room in tokens.

    Samples are generated together where they share their room (so no context + room exceeds prompt + budget);
    on the first turn each group shares its context too, and the backend's shared prefix computes it once.
    """
    room = dict(zip(active, _rooms(samples, active, limits, budget)))
    contexts = {k: samples[k].prompt + samples[k].ids for k in active}
    groups = len(samples) // n
    whole = (
        len(active) == len(samples)
        and len(set(room.values())) == 1
        and all(contexts[g * n + j] == contexts[g * n] for g in range(groups) for j in range(n))
    )

    def call(ctxs, m, r, seed):
        p = dataclasses.replace(
            params, max_new_tokens=r, seed=seed, min_new_tokens=min(params.min_new_tokens, r) if turn == 0 else 0
        )
        return rollout.generate(ctxs, m, p)

    out = {}
    if whole:  # every group shares its context (the first turn)
        r = room[0]
        if seeds is not None:
            comps = [c for g in range(groups) for c in call([contexts[g * n]], n, r, _mix(seeds[g], 0, turn))]
        else:
            comps = call(
                [contexts[g * n] for g in range(groups)],
                n,
                r,
                None if params.seed is None else _mix(params.seed, 0, turn),
            )
        out = dict(zip(range(len(samples)), comps))
    elif seeds is not None:  # each sample by its own call, seeded from (its prompt's seed, sample, turn)
        out = {k: call([contexts[k]], 1, room[k], _mix(seeds[k // n], k % n + 1, turn))[0] for k in active}
    else:
        for r in sorted(set(room.values())):
            ks = [k for k in active if room[k] == r]
            comps = call([contexts[k] for k in ks], 1, r, None if params.seed is None else _mix(params.seed, r, turn))
            out.update(zip(ks, comps))
    return [
        (list(out[k].token_ids), list(out[k].logprobs or [0.0] * len(out[k].token_ids)), out[k].finish_reason)
        for k in active
    ]


def _rooms(samples, active, limits, budget) -> list[int]:
    room = [budget - len(samples[k].ids) for k in active]
    return [min(r, limits.max_tokens_per_turn) for r in room] if limits.max_tokens_per_turn else room


def _continue_episodes(rollout, samples, n, params, limits, budget, seeds, after) -> None:
    """Every turn of every sample on the backend's KV (`open_episodes`): one session per chunk of prompts (per
    prompt with `seeds`), each prompt prefilled once; a turn feeds only the last token and the new observation."""
    groups = len(samples) // n
    if seeds is not None:
        chunks = [([g], _mix(seeds[g], 0, 0)) for g in range(groups)]
    else:
        per = max(1, getattr(rollout, "max_batch", groups * n) // n)
        chunks = [
            (list(range(g, min(g + per, groups))), None if params.seed is None else _mix(params.seed, 0, c))
            for c, g in enumerate(range(0, groups, per))
        ]
    for gs, seed in chunks:
        first = gs[0] * n
        ks = list(range(first, (gs[-1] + 1) * n))
        with rollout.open_episodes([samples[g * n].prompt for g in gs], n, dataclasses.replace(params, seed=seed)) as e:
            for turn in range(limits.max_turns):
                active = [k for k in ks if not samples[k].done]
                if not active:
                    break
                comps = e.turn(
                    [k - first for k in active],
                    [samples[k].ids for k in active],
                    _rooms(samples, active, limits, budget),
                    params.min_new_tokens if turn == 0 else 0,
                )
                for k, c in zip(active, comps):
                    after(k, (list(c.token_ids), list(c.logprobs), c.finish_reason), turn)


def _mix(seed: int, sample: int, turn: int) -> int:
    return (int(seed) * 1_000_003 + sample * 7_919 + turn * 104_729) % (2**62)


def _after_turn(s: _Sample, ids, lps, finish, tokenizer, stop_texts, budget, limits, turn, vocab_size) -> None:
    cut = cut_at_stop_string(tokenizer, ids, stop_texts)
    if cut is not None:
        ids, lps, finish = ids[:cut], lps[:cut], "stop"
    s.ids += ids
    s.logprobs += [float(x) for x in lps]
    s.mask += [1] * len(ids)
    s.finish = finish
    ep = s.episode
    ep.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=False)
    ep.turn_texts.append(text)
    if len(s.ids) >= budget and finish == "length":  # cut by the budget: the environment is not asked
        s.done, ep.truncated = True, "budget"
        return
    try:
        obs = s.env.step(text, list(ids))
    except Exception as e:
        if isinstance(e, EnvironmentContractError):
            raise
        raise _contract(s.env, "step", e) from e
    obs_ids = observation_ids(obs, s.env, "step", tokenizer, vocab_size, turn_text=text)
    if obs_ids is None:
        s.done = True
        return
    if turn + 1 >= limits.max_turns:
        s.done, s.finish, ep.truncated = True, "length", "max_turns"
        return
    if len(obs_ids) > limits.max_observation_tokens:
        obs_ids, ep.observation_cut = obs_ids[: limits.max_observation_tokens], ep.observation_cut + 1
    if len(s.ids) + len(obs_ids) >= budget:
        s.done, s.finish, ep.truncated = True, "length", "budget"
        return
    _insert(s, obs_ids, tokenizer, limits)


def _insert(s: _Sample, obs_ids: list[int], tokenizer, limits) -> None:
    s.ids += obs_ids
    s.logprobs += [0.0] * len(obs_ids)
    s.mask += [0] * len(obs_ids)
    s.episode.observation_tokens += len(obs_ids)
    s.episode.observations.append(tokenizer.decode(obs_ids, skip_special_tokens=False))


def episode_metrics(episodes: Sequence[Episode], completions: Sequence[Completion]) -> dict[str, float]:
    """Per-step means: turns, tool calls per episode, tool failure rate, truncated episodes, observation-token share."""
    if not episodes:
        return {}
    n = len(episodes)
    calls = sum(e.tool_calls for e in episodes)
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "episode/turns": sum(e.turns for e in episodes) / n,
        "episode/tool_calls": calls / n,
        "episode/tool_failure_rate": sum(e.tool_failures for e in episodes) / calls if calls else 0.0,
        "episode/truncated_frac": sum(e.truncated is not None for e in episodes) / n,
        "episode/observation_token_share": sum(e.observation_tokens for e in episodes) / tokens if tokens else 0.0,
    }
