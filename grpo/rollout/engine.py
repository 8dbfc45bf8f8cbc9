"""Backend ``engine`` (the GRPO default): prefill each prompt once, decode its n samples together.

How it works (pure PyTorch, CPU or CUDA, on the training model's own parameters, LoRA included):
- The HF model's forward computes everything but attention; attention goes through
  `grpo.rollout.kv_cache` (registered as transformers attention ``"grpo_rollout"``), which stores
  keys/values in a preallocated `SharedPrefixKV`: one copy of each prompt's KV, shared by its n
  samples, plus each sample's own generated-token KV.
- Prefill packs the admitted prompts into one row without padding ([1, sum(lengths)]) with
  per-prompt positions, and only projects each prompt's last position onto the vocabulary.
- Decode feeds one token per unfinished sample ([active, 1]); finished samples leave the batch.
- Continuous batching: `max_batch // n` prompt slots; when all n samples of a slot are done the
  completions are harvested and the next queued prompt is prefilled into the slot.
- Sampling (temperature, top-k, top-p, min_new_tokens, stop ids) is vectorised over rows and drawn
  from one torch.Generator seeded with `params.seed`, so a call is reproducible.
- Multi-turn: `open_episodes` keeps each sample's KV between turns; a turn appends the observation's ids
  to the sample and continues decoding (`grpo.rollout.continuation`), nothing of the history is prefilled again.

Why drive the HF forward instead of a re-implemented decoder: it runs every architecture whose
attention goes through transformers' AttentionInterface (tested: Llama, Qwen2, Qwen3, Mistral,
DeepSeek-V3 MLA + MoE), with peft LoRA, on the live parameters (sync_weights is a no-op), and keeps
the modules' own forwards (so hooks such as ZeRO-3's parameter gathering still fire; untested). On
the DESIGN.md benchmark the engine is GEMM-bound (72% of its time in `aten::mm`, 6% in decode
attention), so a hand-fused forward could only shave the per-op overhead, which shows with tiny
models and on oversubscribed cores. Numbers: benchmarks/README.md.

Options (``make_rollout("engine", model, tok, **opts)``):
  max_batch: sample rows decoded together (default 128); prompt slots = max(1, max_batch // n).
  max_len: longest prompt + completion allowed (default: config.max_position_embeddings).
  max_prefill_tokens: prompt tokens per prefill forward (default 4096; a longer prompt goes alone).
  static_decode: decode with the static-shape step of `grpo.rollout.static_decode` (default False):
    bucketed rows, full-width masked attention, sampling on the device, no host sync inside the
    step; on CUDA it is captured into CUDA graphs (one per bucket). Greedy output equals `hf`;
    sampled draws are reproducible per seed but differ from the eager step's once rows finish
    (each step draws one uniform per storage row instead of one per unfinished row).
  compile_decode: with static_decode, wrap the step in `torch.compile(fullgraph=True)` (default
    False); every step then feeds all rows (one compilation per sampling setting, tens of seconds).
  cuda_graphs: with static_decode on CUDA, capture the step into CUDA graphs (default True).
The KV storage is sized from these and the call's shapes (slots x (longest prompt, max_new_tokens),
both rounded up to a power of two >= 16 with static_decode), never from free memory; it is kept and
reused by later calls that fit in it (with static_decode, together with its graphs / compiled step).
"""

from __future__ import annotations

import inspect
import logging
from collections import deque

import torch
from torch import nn

from grpo.rollout.base import (
    BACKENDS,
    Completion,
    Rollout,
    SamplingParams,
    attention_implementation,
    check_prompts,
    eval_mode,
    make_generator,
    unwrap_model,
)
from grpo.rollout.continuation import EngineEpisodes
from grpo.rollout.kv_cache import ATTN_NAME, SharedPrefixKV
from grpo.rollout.sampling import sample_next
from grpo.rollout.static_decode import StaticDecoder, storage_size

log = logging.getLogger(__name__)


class _Batch:
    """Per-call decoding state. Row r = slot * n + j (see SharedPrefixKV).

    slot_prompt: python list [slots], prompt index held by each slot (-1 = free).
    prompt_len: [slots] long, prompt length per slot (0 when free).
    gen_len: [rows] long, tokens generated so far; done: [rows] bool (finished or idle).
    last: [rows] long, the last generated token; tokens/logprobs: [rows, max_new_tokens].
    limit: [rows] long, a row is done once gen_len reaches it (max_new_tokens; a turn's end in a multi-turn session).
    start: [rows] long, where the row's current turn began (min_new_tokens counts from there; 0 in one-turn calls).
    """

    def __init__(self, slots: int, n: int, max_new: int, device: torch.device):
        rows = slots * n
        self.n, self.slot_prompt = n, [-1] * slots
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.gen_len = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        self.limit = torch.full((rows,), max_new, dtype=torch.long, device=device)
        self.start = torch.zeros(rows, dtype=torch.long, device=device)

    def reset(self) -> None:
        """Back to all slots free, in place (the static decoder's buffers keep their addresses)."""
        self.slot_prompt = [-1] * len(self.slot_prompt)
        self.prompt_len.zero_()
        self.gen_len.zero_()
        self.done.fill_(True)

    def slot_rows(self, slots: list[int]) -> torch.Tensor:
        """[len(slots) * n] row ids of the given slots, slot-major."""
        s = torch.tensor(slots, dtype=torch.long, device=self.gen_len.device)
        return (s[:, None] * self.n + torch.arange(self.n, device=s.device)).reshape(-1)


@BACKENDS.register("engine")
class EngineRollout(Rollout):
    """Shared-prefix, continuously batched generation on the live HF model (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        max_batch: int = 128,
        max_len: int | None = None,
        max_prefill_tokens: int = 4096,
        static_decode: bool = False,
        compile_decode: bool = False,
        cuda_graphs: bool = True,
    ):
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError(f"engine: max_batch={max_batch} and max_prefill_tokens={max_prefill_tokens} must be >= 1")
        if compile_decode and not static_decode:
            raise ValueError("engine: compile_decode=True needs static_decode=True (only the static step is compiled)")
        self.model = model
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_len = max_len or getattr(unwrap_model(model).config, "max_position_embeddings", None) or 1 << 30
        self.static_decode, self.compile_decode, self.cuda_graphs = static_decode, compile_decode, cuda_graphs
        self.cache: SharedPrefixKV | None = None
        self.static: StaticDecoder | None = None
        self.session: EngineEpisodes | None = None  # an open multi-turn session holds the KV storage

    def sync_weights(self, model: nn.Module) -> None:
        """The engine reads the live parameters: nothing to copy. Follows `model` if it is a new object."""
        self.model = model

    # ------------------------------------------------------------------ public
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        if self.session is not None and not self.session.closed:
            raise RuntimeError("engine: generate() while a multi-turn session is open on this engine; close it first")
        hf = unwrap_model(self.model)
        prompts = check_prompts(prompts, n, getattr(hf.config, "vocab_size", None))
        if not prompts:
            return []
        slots = max(1, min(len(prompts), self.max_batch // n))
        cache = self._storage_for(hf, prompts, n, params, slots, "max_new_tokens")
        # no_grad, not inference_mode: under ZeRO-3 the parameters gathered here must stay ordinary tensors (peft's
        # disable_adapter later sets requires_grad on them, which an inference tensor refuses)
        with (
            torch.no_grad(),
            eval_mode(hf),
            attention_implementation(hf, ATTN_NAME),
        ):  # attention through the engine's KV cache
            return self._run(hf, cache, prompts, n, params)

    def open_episodes(self, prompts: list[list[int]], n: int, params: SamplingParams) -> EngineEpisodes:
        """A multi-turn session (`grpo.rollout.continuation`): prefills each prompt once, then each `turn` continues
        the n samples on their own KV. `params.max_new_tokens` is the whole trajectory's budget; use it as a
        context manager (it holds this engine's KV storage until closed)."""
        if self.session is not None and not self.session.closed:
            raise RuntimeError("engine: a multi-turn session is still open on this engine; close it first")
        hf = unwrap_model(self.model)
        prompts = check_prompts(prompts, n, getattr(hf.config, "vocab_size", None))
        if not prompts:
            raise ValueError("engine: a multi-turn session needs at least one prompt")
        cache = self._storage_for(hf, prompts, n, params, len(prompts), "token budget")
        if self.static_decode:
            static = self._static_decoder(cache, hf, params)
            state = static.state
        else:
            static, state = None, _Batch(cache.slots, n, params.max_new_tokens, cache.device)
        self.session = EngineEpisodes(self, hf, cache, state, static, prompts, n, params)
        return self.session

    # ------------------------------------------------------------------ internals
    def _storage_for(
        self, hf: nn.Module, prompts: list[list[int]], n: int, params: SamplingParams, slots: int, budget: str
    ) -> SharedPrefixKV:
        """The KV storage for `slots` prompts x n samples of these prompts and params (`budget`: what the error calls
        params.max_new_tokens); refuses a call longer than max_len."""
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"engine: longest prompt ({longest}) + {budget} ({params.max_new_tokens}) "
                f"exceeds max_len={self.max_len}; shorten prompts or raise max_len"
            )
        weight = next(hf.parameters())
        prefix, suffix = longest, params.max_new_tokens
        if self.static_decode:  # rounded up: fewer storage reallocations, hence fewer captures/compilations
            prefix, suffix = storage_size(prefix), storage_size(suffix)
        return self._cache_for(slots, n, prefix, suffix, weight.device, weight.dtype)

    def _cache_for(self, slots: int, n: int, prefix: int, suffix: int, device, dtype) -> SharedPrefixKV:
        """Reuses the KV storage when it fits this call, else allocates one sized for it."""
        if self.cache is None or not self.cache.fits(slots, n, prefix, suffix, device, dtype):
            self.cache = self.static = None  # free the old storage (and graphs reading it) before allocating
            self.cache = SharedPrefixKV(slots, n, prefix, suffix, device, dtype)
            log.debug("engine: KV storage for %d prompts x %d samples, prefix %d, suffix %d", slots, n, prefix, suffix)
        return self.cache

    def _run(
        self, hf: nn.Module, cache: SharedPrefixKV, prompts: list[list[int]], n: int, params: SamplingParams
    ) -> list[Completion]:
        """The scheduling loop: admit prompts into free slots, decode, harvest finished groups."""
        device = cache.device
        static = self._static_decoder(cache, hf, params) if self.static_decode else None
        state = static.state if static else _Batch(cache.slots, n, params.max_new_tokens, device)
        gen = make_generator(params.seed, device)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        queue = deque(range(len(prompts)))
        results: list[list[Completion] | None] = [None] * len(prompts)
        unfinished = 0  # static: an upper bound on the unfinished rows (the bucket is sized from it)
        while True:
            free = [s for s, p in enumerate(state.slot_prompt) if p < 0]
            while queue and free:
                batch = self._take_prefill_batch(queue, prompts, len(free))
                slots, free = free[: len(batch)], free[len(batch) :]
                self._prefill(hf, cache, state, slots, batch, prompts, params, gen, stop_ids)
                unfinished += len(batch) * n
                if static:
                    static.admit(slots)
            if static:
                unfinished, slot_done = static.decode(hf, params, unfinished, gen)
            else:
                active = (~state.done).nonzero().squeeze(1)
                if active.numel():
                    self._decode(hf, cache, state, active, params, gen, stop_ids)
                slot_done = state.done.view(-1, n).all(dim=1).tolist()
            self._harvest(state, results, set(params.stop_token_ids), slot_done)
            if not queue and all(p < 0 for p in state.slot_prompt):
                break
        return [c for group in results for c in group]

    def _static_decoder(self, cache: SharedPrefixKV, hf: nn.Module, params: SamplingParams) -> StaticDecoder:
        """The static decoder of this KV storage (built on first use), reset for a new call."""
        if self.static is None:
            state = _Batch(cache.slots, cache.n, cache.suffix_len, cache.device)
            self.static = StaticDecoder(cache, state, compile_decode=self.compile_decode, cuda_graphs=self.cuda_graphs)
        self.static.state.reset()
        self.static.start(hf, params)
        return self.static

    def _take_prefill_batch(self, queue: deque, prompts: list[list[int]], max_prompts: int) -> list[int]:
        """Pops up to `max_prompts` queued prompts whose total length fits `max_prefill_tokens` (>= 1 prompt)."""
        batch, tokens = [], 0
        while queue and len(batch) < max_prompts:
            length = len(prompts[queue[0]])
            if batch and tokens + length > self.max_prefill_tokens:
                break
            batch.append(queue.popleft())
            tokens += length
        return batch

    def _forward(
        self, hf: nn.Module, cache: SharedPrefixKV, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """ids/pos [B, T] -> logits [B, T or len(keep), V] through the cache-backed attention."""
        kwargs = dict(input_ids=ids, position_ids=pos, use_cache=False, rollout_kv=cache)
        if keep is not None and _accepts_logits_to_keep(hf):
            return hf(**kwargs, logits_to_keep=keep).logits
        logits = hf(**kwargs).logits
        return logits if keep is None else logits[:, keep]

    def _prefill(
        self, hf, cache, state: _Batch, slots: list[int], batch: list[int], prompts, params, gen, stop_ids
    ) -> None:
        """Packed prefill of `batch` prompts into `slots`; samples the first token of each of their rows."""
        device, lens = cache.device, [len(prompts[i]) for i in batch]
        ids = torch.tensor([t for i in batch for t in prompts[i]], dtype=torch.long, device=device)[None]
        pos = torch.cat([torch.arange(length, device=device) for length in lens])[None]
        last = torch.tensor(lens, device=device).cumsum(0) - 1
        cache.begin_prefill(slots, lens)
        logits = self._forward(hf, cache, ids, pos, last)[0]  # [len(batch), V]
        rows = state.slot_rows(slots)
        for s, i, length in zip(slots, batch, lens):
            state.slot_prompt[s] = i
            state.prompt_len[s] = length
        state.gen_len[rows] = 0
        state.limit[rows] = params.max_new_tokens
        state.start[rows] = 0
        too_short = torch.full((rows.numel(),), params.min_new_tokens > 0, device=device)
        tok, lp = sample_next(logits.repeat_interleave(state.n, dim=0), params, gen, stop_ids, too_short)
        self._record(state, rows, torch.zeros_like(rows), tok, lp, params, stop_ids)

    def _decode(self, hf, cache, state: _Batch, rows: torch.Tensor, params, gen, stop_ids) -> None:
        """One decode step for the active rows: feed each row's last token, sample the next."""
        t = state.gen_len[rows]  # index of the token to sample; the fed token sits at t - 1
        slot = rows // state.n
        cache.begin_decode(
            rows, t - 1, state.prompt_len, state.gen_len, max_prompt=int(state.prompt_len.max()), max_gen=int(t.max())
        )
        logits = self._forward(hf, cache, state.last[rows, None], (state.prompt_len[slot] + t - 1)[:, None], None)[
            :, -1
        ]
        tok, lp = sample_next(logits, params, gen, stop_ids, (t - state.start[rows]) < params.min_new_tokens)
        self._record(state, rows, t, tok, lp, params, stop_ids)

    @staticmethod
    def _record(state: _Batch, rows, t, tok, lp, params: SamplingParams, stop_ids) -> None:
        """Stores token index t of each row and marks rows that stopped or reached their limit (max_new_tokens)."""
        state.tokens[rows, t] = tok
        state.logprobs[rows, t] = lp
        state.last[rows] = tok
        state.gen_len[rows] = t + 1
        state.done[rows] = torch.isin(tok, stop_ids) | (t + 1 >= state.limit[rows])

    @staticmethod
    def _harvest(state: _Batch, results: list, stop: set[int], slot_done: list[bool]) -> None:
        """Turns every slot whose n rows are all done (`slot_done`) into completions and frees the slot."""
        n = state.n
        for s, p in enumerate(state.slot_prompt):
            if p < 0 or not slot_done[s]:
                continue
            rows = slice(s * n, (s + 1) * n)
            lens, toks, lps = state.gen_len[rows].tolist(), state.tokens[rows].tolist(), state.logprobs[rows].tolist()
            results[p] = [
                Completion(
                    p, toks[j][: lens[j]], lps[j][: lens[j]], "stop" if toks[j][lens[j] - 1] in stop else "length"
                )
                for j in range(n)
            ]
            state.slot_prompt[s] = -1
            state.prompt_len[s] = 0


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (then only the needed positions hit the LM head)."""
    cls = type(model)
    if cls not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _LOGITS_TO_KEEP[cls]
