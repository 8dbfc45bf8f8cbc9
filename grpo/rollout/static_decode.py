"""The engine's static-shape decode step (option ``static_decode=True``): CUDA-graph capturable.

The eager step (`EngineRollout._decode`) feeds only the unfinished rows and sizes attention by the
longest prompt / generation so far, Python ints read from the device: every step has new shapes and
host syncs, so on a GPU it is bound by kernel launches for small models. Here every tensor a step
touches has a shape fixed by (bucket, KV storage), and the step reads nothing back to the host:
- rows: the forward's batch is a bucket of B rows (powers of two up to the storage's row count).
  Inside the step the rows are ordered unfinished-first (a stable sort of the `done` flags) and the
  first B are fed; the extra rows are finished or idle ones, computed and discarded (`valid` mask),
  so no two fed rows alias and no live row's state is touched by them.
- attention spans the whole KV storage (prefix_len + suffix_len) under a mask built on the device
  (`SharedPrefixKV.begin_static_decode`); KV positions, positions and input ids are gathered from
  the persistent per-row state (`_Batch`: prompt_len, gen_len, last, done), which the step updates in
  place (tokens, logprobs, last, gen_len, done), never reallocates.
- sampling runs inside the step (`sampling.sample_static`), stop ids as a mask, with uniforms drawn
  by the caller before the step into a persistent buffer `u` [rows, 1] (one per storage row), so the
  graph holds no RNG state. Row r reads u[r]: its draw does not depend on the bucket.
The host decides one Python int per step, the bucket, from an upper bound on the unfinished rows,
and reads one small summary (unfinished count, finished slots) per round of steps: a round is every
step in which the host can tell no row finishes (before min_new_tokens, or always without stop ids:
a fixed-length call is one round), plus one (`StaticDecoder.decode`).

Runners (a step is `fn()` with every input in persistent buffers):
- eager (CPU or CUDA): the step as is; ``compile_decode=True`` wraps it in `torch.compile` (then
  every step feeds all rows: one compilation per sampling setting and storage shape).
- CUDA graphs (CUDA, default with static_decode): per (sampling signature, bucket) the first
  `WARMUP_STEPS` calls run the real step on a side stream (as torch's docs ask before capture), the
  next one captures it into a `torch.cuda.CUDAGraph` (one shared memory pool: the step returns
  nothing, so every capture's memory is scratch) and replays it. Graphs read the parameters and KV
  storage at the addresses seen at capture: they are dropped when the KV storage or this state is
  reallocated, and when the model's fingerprint (parameter/buffer addresses, peft adapter flags)
  changes. Python-level model state is frozen into a graph; the fingerprint covers peft's.
  If a capture fails (a model with a host sync in its forward, e.g. the eager MoE experts' routing
  loop), the engine logs one warning and runs that signature's steps eagerly.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from grpo.rollout.base import SamplingParams
from grpo.rollout.kv_cache import SharedPrefixKV
from grpo.rollout.sampling import sample_static

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # eager steps per (signature, bucket) on the side stream before a CUDA-graph capture


def buckets(rows: int) -> list[int]:
    """Row counts a static step is built for: 1, 2, 4, ... below `rows`, then `rows`."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


def bucket_for(active: int, rows: int) -> int:
    """The smallest bucket holding `active` rows."""
    return next(b for b in buckets(rows) if b >= active)


def storage_size(length: int) -> int:
    """KV storage width for a static decoder: the next power of two >= max(length, 16), so that calls
    with slightly different prompt lengths reuse one storage (and its graphs / compiled step)."""
    return 1 << max(length - 1, 15).bit_length()


def step_params(params: SamplingParams) -> SamplingParams:
    """The sampling settings a step is specialised on (Python constants in a graph or compiled code);
    max_new_tokens, min_new_tokens and the stop ids themselves are read from buffers instead."""
    return SamplingParams(
        max_new_tokens=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_new_tokens=min(params.min_new_tokens, 1),
    )


def signature(params: SamplingParams) -> tuple:
    """Hashable key of `step_params(params)` and the number of stop ids."""
    return params.temperature, params.top_p, params.top_k, min(params.min_new_tokens, 1), len(params.stop_token_ids)


class StaticDecoder:
    """Persistent buffers and per-bucket step runners for one KV storage and one decoding state.

    state: the engine's `_Batch` for `cache` (allocated once, reset per call; width suffix_len).
    u: [rows, 1] float32 uniforms of the step; limits: [2] long (max_new_tokens, min_new_tokens);
    stops: [n_stops] long stop ids of the current call.
    """

    def __init__(self, cache: SharedPrefixKV, state, *, compile_decode: bool = False, cuda_graphs: bool = True):
        self.cache, self.state = cache, state
        device = cache.device
        self.u = torch.zeros(cache.rows, 1, dtype=torch.float32, device=device)
        self.limits = torch.zeros(2, dtype=torch.long, device=device)
        self.stops = torch.zeros(0, dtype=torch.long, device=device)
        self.identity = torch.arange(cache.rows, device=device)
        # compiled: one bucket (every step feeds all rows), so one compilation per sampling signature. Not
        # fullgraph: a model whose forward breaks the graph (peft's LoRA on MoE expert parameters) still runs;
        # the tests compile the step with fullgraph=True to show the step itself has no break.
        self.step_fn: Callable = torch.compile(static_step, dynamic=False) if compile_decode else static_step
        self.bucketed = not compile_decode
        self.graphs = _Graphs(device) if cuda_graphs and device.type == "cuda" else None
        self.fingerprint: tuple | None = None
        self.generated = [0] * cache.slots  # tokens generated so far by each occupied slot's unfinished rows

    def start(self, model: nn.Module, params: SamplingParams) -> None:
        """Loads a call's settings into the buffers (in place) and drops graphs the model outgrew."""
        self.fixed, self.key = step_params(params), signature(params)
        self.limits.copy_(torch.tensor([params.max_new_tokens, params.min_new_tokens]))
        stops = torch.tensor(params.stop_token_ids, dtype=torch.long)
        if stops.numel() == self.stops.numel():
            self.stops.copy_(stops)
        else:  # new shape: graphs holding the old buffer cannot be replayed
            self.stops = stops.to(self.cache.device)
            if self.graphs is not None:
                self.graphs.clear()
        if self.graphs is not None:
            fingerprint = model_fingerprint(model)
            if fingerprint != self.fingerprint:
                self.graphs.clear()
                self.fingerprint = fingerprint

    def admit(self, slots: list[int]) -> None:
        """Slots just prefilled (their rows hold one sampled token)."""
        for s in slots:
            self.generated[s] = 1

    def decode(
        self, model: nn.Module, params: SamplingParams, unfinished: int, generator: torch.Generator
    ) -> tuple[int, list[bool]]:
        """Runs every decode step in which no row can finish, plus the next one, then reads the summary.

        One host read per such round: with no stop ids (fixed-length generation) or before
        min_new_tokens, rows can only finish at a step the host can count, so steps that cannot
        change which slots are done run back to back (on CUDA: queued without waiting).
        """
        occupied = [s for s, p in enumerate(self.state.slot_prompt) if p >= 0]
        if unfinished and occupied:
            steps = 1 + min(quiet_steps(self.generated[s], params) for s in occupied)
            for _ in range(steps):
                self.step(model, params, unfinished, generator)
            for s in occupied:
                self.generated[s] += steps
        return self.summary()

    def step(self, model: nn.Module, params: SamplingParams, unfinished: int, generator: torch.Generator) -> None:
        """One decode step of the unfinished rows (`unfinished`: an upper bound on their number), fed as
        a bucket of rows padded with finished ones."""
        bucket = bucket_for(unfinished, self.cache.rows) if self.bucketed else self.cache.rows
        if not params.greedy:
            self.u.uniform_(generator=generator)

        def fn() -> None:
            self.step_fn(
                model, self.cache, self.state, bucket, self.identity, self.u, self.limits, self.stops, self.fixed
            )

        if self.graphs is None:
            fn()
        else:
            self.graphs.run((self.key, bucket), fn)

    def summary(self) -> tuple[int, list[bool]]:
        """(unfinished rows, per-slot all-finished flags): the one host read per scheduling step."""
        done = self.state.done
        flags = torch.cat([(~done).sum()[None], done.view(-1, self.cache.n).all(dim=1)]).tolist()
        return int(flags[0]), [bool(f) for f in flags[1:]]


def quiet_steps(generated: int, params: SamplingParams) -> int:
    """Decode steps none of a slot's unfinished rows (each holding `generated` tokens) can finish in.

    A step samples token index t = generated; the row finishes if t + 1 >= max_new_tokens, or if the
    token is a stop id and t >= min_new_tokens (stop ids are suppressed before that).
    """
    quiet = params.max_new_tokens - 1 - generated
    if params.stop_token_ids:
        quiet = min(quiet, params.min_new_tokens - generated)
    return max(quiet, 0)


def static_step(
    model: nn.Module,
    cache: SharedPrefixKV,
    st,
    bucket: int,
    identity: torch.Tensor,
    u: torch.Tensor,
    limits: torch.Tensor,
    stops: torch.Tensor,
    params: SamplingParams,
) -> None:
    """Feeds each fed row's last token, samples the next and records it, all on the device (see module doc).

    Shapes are fixed by `bucket` (a Python int) and the storage; nothing is read back to the host.
    """
    if bucket == cache.rows:
        rows = identity
    else:  # unfinished rows first (in row order), then finished/idle ones to pad the bucket
        rows = torch.sort(st.done.to(torch.uint8), stable=True).indices[:bucket]
    t = st.gen_len[rows]  # index of the token to sample; the fed token sits at t - 1
    valid = ~st.done[rows]
    cache.begin_static_decode(
        rows, (t - 1).clamp(0, cache.suffix_len - 1), st.prompt_len, st.gen_len, all_rows=bucket == cache.rows
    )
    pos = (st.prompt_len[rows // st.n] + t - 1).clamp_min(0)
    logits = model(input_ids=st.last[rows, None], position_ids=pos[:, None], use_cache=False, rollout_kv=cache).logits[
        :, -1
    ]
    tok, lp = sample_static(logits, params, u[rows], stops, (t - st.start[rows]) < limits[1])
    # record: rows outside `valid` keep their state (their outputs are discarded)
    tc = t.clamp(max=st.tokens.shape[1] - 1)
    st.tokens[rows, tc] = torch.where(valid, tok, st.tokens[rows, tc])
    st.logprobs[rows, tc] = torch.where(valid, lp, st.logprobs[rows, tc])
    st.last[rows] = torch.where(valid, tok, st.last[rows])
    st.gen_len[rows] = t + valid.long()
    finished = (t + 1 >= limits[0]) | (t + 1 >= st.limit[rows])
    if stops.numel():
        finished = finished | (tok[:, None] == stops).any(dim=1)
    st.done[rows] = st.done[rows] | (valid & finished)


def model_fingerprint(model: nn.Module) -> tuple:
    """What a captured graph depends on outside its buffers: the model object, the addresses, dtypes and
    shapes of its parameters and buffers, and peft's per-layer adapter switches."""
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    switches = tuple(
        (getattr(m, "disable_adapters", None), str(getattr(m, "active_adapters", None)), getattr(m, "merged", None))
        for m in model.modules()
        if hasattr(m, "disable_adapters")
    )
    return id(model), tensors, switches


class _Graphs:
    """One CUDA graph per key, captured lazily after WARMUP_STEPS real steps on a side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict = {}
        self.calls: dict = {}
        self.failed: set = set()

    def clear(self) -> None:
        self.graphs.clear()
        self.calls.clear()

    def run(self, key, fn: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        calls = self.calls[key] = self.calls.get(key, 0) + 1
        if key[0] in self.failed or calls <= WARMUP_STEPS:
            self._on_side_stream(fn)
            return
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                fn()
        except Exception as err:  # a forward that cannot be captured: this signature stays eager
            log.warning(
                "engine: CUDA graph capture of the decode step failed (%s: %s); decoding without graphs",
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            self.failed.add(key[0])
            torch.cuda.synchronize(self.device)
            self._on_side_stream(fn)
            return
        self.graphs[key] = graph
        graph.replay()

    def _on_side_stream(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)
