"""Multi-turn continuation on the engine's KV cache: each sample keeps its KV from one turn to the next.

    with engine.open_episodes(prompts, n, params) as episodes:   # each prompt prefilled once, shared by its n rows
        completions = episodes.turn(rows, trajectories, rooms, min_new_tokens)   # one per row of `rows`

Row ``r = i * n + j`` is sample j of prompt i; a row's trajectory is everything after its prompt (sampled and
inserted tokens), at most ``params.max_new_tokens`` (the episode's token budget, the width of the row's suffix KV).
`turn` is given each active row's whole trajectory so far and how many tokens it may sample (its room). The
session keeps the KV of the longest prefix of that trajectory it already holds and feeds only the rest: normally
the turn's last sampled token (whose KV is computed when it is fed) followed by the observation the environment
inserted, one packed forward for all rows (`SharedPrefixKV.begin_extend`); then the rows decode together, as in
`EngineRollout.generate`, until each stops (a stop id) or fills its room. A trajectory that departs from what the
row holds (a turn the driver cut at a stop string) rewinds the row to the common prefix: nothing is recomputed
but the tokens after it. A row with an empty trajectory samples from its prompt's last logits (the first turn).

So no history is prefilled again (`grpo.rollout.multiturn` re-prefills ``prompt + trajectory`` for backends
without `open_episodes`). Decoding is the engine's own step, eager or static (``static_decode``, one host read
per step here); the per-turn extend forward is always eager. One session at a time per engine: it holds the
engine's KV storage until it is closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque

import torch
from torch import nn

from grpo.rollout.base import Completion, SamplingParams, attention_implementation, eval_mode, make_generator
from grpo.rollout.kv_cache import ATTN_NAME, SharedPrefixKV
from grpo.rollout.sampling import sample_next


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


class EngineEpisodes:
    """A multi-turn session on an `EngineRollout` (see the module docstring). Built by `EngineRollout.open_episodes`.

    state: the engine's `_Batch` over `cache` (tokens [rows, >= budget] holds each row's trajectory);
    static: the engine's `StaticDecoder` when it decodes with static shapes, else None.
    first_logits: [prompts, V] float, each prompt's next-token logits (a row's first token when nothing precedes it).
    """

    def __init__(
        self, engine, hf: nn.Module, cache: SharedPrefixKV, state, static, prompts: list[list[int]], n: int, params
    ):
        self.engine, self.hf, self.cache, self.state, self.static = engine, hf, cache, state, static
        self.n, self.params, self.budget = n, params, params.max_new_tokens
        self.rows = len(prompts) * n
        self.gen = make_generator(params.seed, cache.device)
        self.stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=cache.device)
        self.closed = False
        with self._running():
            self.first_logits = self._prefill(prompts)

    # ------------------------------------------------------------------ public
    def turn(
        self, rows: list[int], trajectories: list[list[int]], rooms: list[int], min_new_tokens: int = 0
    ) -> list[Completion]:
        """Samples one turn for each row of `rows` (distinct, any order) after its `trajectories` entry (the whole
        trajectory so far); at most `rooms[i]` tokens, stopping at a stop id (kept, as `generate` does) once
        `min_new_tokens` tokens of the turn exist. Returns the turn's sampled ids and logprobs per row."""
        if self.closed:
            raise RuntimeError("engine: this multi-turn session is closed")
        for r, traj, room in zip(rows, trajectories, rooms):
            if not 0 <= r < self.rows or room < 1 or len(traj) + room > self.budget:
                raise ValueError(
                    f"engine session: row {r} (of {self.rows}) with a trajectory of {len(traj)} ids and room {room}: "
                    f"rows must exist, room >= 1 and trajectory + room <= the budget ({self.budget})"
                )
        if not rows:
            return []
        params = dataclasses.replace(self.params, min_new_tokens=min(min_new_tokens, self.budget))
        with self._running():
            starts = self._feed(rows, trajectories, rooms, params)
            self._decode(params)
        st = self.state
        ends, toks, lps = st.gen_len.tolist(), st.tokens.tolist(), st.logprobs.tolist()
        stop = set(params.stop_token_ids)
        return [
            Completion(
                r // self.n,
                toks[r][t : ends[r]],
                lps[r][t : ends[r]],
                "stop" if toks[r][ends[r] - 1] in stop else "length",
            )
            for r, t in zip(rows, starts)
        ]

    def close(self) -> None:
        """Ends the session (the engine's KV storage is free for other calls again)."""
        if not self.closed:
            self.closed = True
            self.engine.session = None

    def __enter__(self) -> "EngineEpisodes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _running(self):
        """The contexts of a forward through the engine's attention (as `EngineRollout.generate`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(self.hf))
        stack.enter_context(attention_implementation(self.hf, ATTN_NAME))
        return stack

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Packed prefill of every prompt into slot = its index; returns each prompt's last logits [P, V] (fp32)."""
        cache, st, device = self.cache, self.state, self.cache.device
        queue, out = deque(range(len(prompts))), []
        while queue:
            batch = self.engine._take_prefill_batch(queue, prompts, len(prompts))
            lens = [len(prompts[i]) for i in batch]
            ids = torch.tensor([t for i in batch for t in prompts[i]], dtype=torch.long, device=device)[None]
            pos = torch.cat([torch.arange(length, device=device) for length in lens])[None]
            cache.begin_prefill(batch, lens)
            out.append(self.engine._forward(self.hf, cache, ids, pos, torch.tensor(lens).cumsum(0) - 1)[0].float())
            for i, length in zip(batch, lens):
                st.slot_prompt[i], st.prompt_len[i] = i, length
        st.gen_len.zero_()
        st.done.fill_(True)
        return torch.cat(out)

    def _feed(self, rows: list[int], trajectories: list[list[int]], rooms: list[int], params) -> list[int]:
        """Brings each row's KV up to its trajectory (one packed extend forward) and samples the turn's first token.

        A row holds KV for its first gen_len - 1 ids (the last sampled id is fed at the next forward); it keeps
        the longest prefix of that agreeing with the new trajectory, and feeds the rest (at least one id, whose
        logits give the next token) unless the trajectory is empty. Returns each row's turn start (trajectory
        length, the index of the turn's first token)."""
        st, cache, device = self.state, self.cache, self.cache.device
        held_len = st.gen_len.tolist()
        stored = st.tokens[torch.tensor(rows, device=device)].tolist()
        seg_rows, seg_starts, seg_ids, logit_src = [], [], [], []
        for r, traj, held_ids in zip(rows, trajectories, stored):
            if not traj:
                logit_src.append(("prompt", r // self.n))
                continue
            held = max(held_len[r] - 1, 0)
            keep = common_prefix(held_ids[:held], traj)
            keep = min(keep, len(traj) - 1)
            seg_rows.append(r)
            seg_starts.append(keep)
            seg_ids.append(traj[keep:])
            logit_src.append(("fed", len(seg_rows) - 1))
            st.tokens[r, keep : len(traj)] = torch.tensor(traj[keep:], dtype=torch.long, device=device)
            st.logprobs[r, keep : len(traj)] = 0.0  # the caller keeps the turns' logprobs; the ids are what matter
        fed = None
        if seg_rows:
            lens = [len(x) for x in seg_ids]
            plens = [int(st.prompt_len[r // self.n]) for r in seg_rows]
            ids = torch.tensor([t for x in seg_ids for t in x], dtype=torch.long, device=device)[None]
            pos = torch.cat([torch.arange(p + s, p + s + k, device=device) for p, s, k in zip(plens, seg_starts, lens)])
            cache.begin_extend(seg_rows, seg_starts, lens, plens)
            last = torch.tensor(lens).cumsum(0) - 1
            fed = self.engine._forward(self.hf, cache, ids, pos[None], last)[0].float()
        logits = torch.stack([self.first_logits[i] if src == "prompt" else fed[i] for src, i in logit_src])
        starts = [len(traj) for traj in trajectories]
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        t = torch.tensor(starts, dtype=torch.long, device=device)
        st.done.fill_(True)
        st.done[rows_t] = False
        st.start[rows_t] = t
        st.limit[rows_t] = t + torch.tensor(rooms, dtype=torch.long, device=device)
        too_short = torch.full((len(rows),), params.min_new_tokens > 0, device=device)
        tok, lp = sample_next(logits, params, self.gen, self.stop_ids, too_short)
        self.engine._record(st, rows_t, t, tok, lp, params, self.stop_ids)
        return starts

    def _decode(self, params: SamplingParams) -> None:
        """Decode steps until every row of the turn is done (eager: only the unfinished rows are fed)."""
        st = self.state
        if self.static is not None:
            self.static.start(self.hf, params)
            unfinished = int((~st.done).sum())
            while unfinished:
                self.static.step(self.hf, params, unfinished, self.gen)
                unfinished, _ = self.static.summary()
            return
        while True:
            active = (~st.done).nonzero().squeeze(1)
            if not active.numel():
                return
            self.engine._decode(self.hf, self.cache, st, active, params, self.gen, self.stop_ids)
