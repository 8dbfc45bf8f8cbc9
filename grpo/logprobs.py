"""Per-token log-probabilities and entropies, without ever holding ``[tokens, vocab]`` logits.

From logits (`selective_log_softmax`, `entropy_from_logits`): one batch row (or chunk of rows) at a
time, so only ``[T, V]`` temporaries exist beside the logits (as TRL's functions of the same names).

From hidden states (`chunked_logprobs`, `forward_logprobs`): the logits themselves are never whole.
At V = 151,936 a ``[tokens, V]`` fp32 tensor is 0.6 MB per token (2.5 GB for 16 x 256 completion
tokens), and its gradient and the log-softmax temporaries come on top: the output layer, the fp32
log-sum-exp and the gather run a chunk of tokens at a time and are recomputed in the backward, so
this part's memory is O(chunk x V) whatever the number of tokens (as TRL's / Liger's chunked
LM-head losses). `forward_logprobs` gets the hidden states out of the real (wrapped) model call by
standing in for its output layer during the forward (see there). Exact against the full-logits path
(tests/test_chunked_logprobs.py: values and gradients <= 1e-5 in fp32).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def selective_log_softmax(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[..., ids]``, the log-prob of each chosen token.

    For fp32/fp64 logits: gather the chosen logit and subtract ``logsumexp`` computed one
    batch row at a time. For fp16/bf16 (where ``logit - logsumexp`` loses precision), a
    float32 ``log_softmax`` is taken one row at a time and gathered. Differentiable w.r.t.
    ``logits``.

    Args:
      logits: ``[B, T, V]`` unnormalised scores; position ``t`` scores token ``ids[:, t]``
        (shift logits by one relative to the input ids before calling).
      ids: ``[B, T]`` int64 chosen token ids.
      temperature: sampling temperature the ids were drawn with (> 0); logits are divided by it
        so the result is the log-prob under the sampling distribution.

    Returns:
      ``[B, T]`` log-probs; float32 for half-precision logits, else the logits' dtype.
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and ids [B, T], got {tuple(logits.shape)} and {tuple(ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        logits = logits / temperature
    ids = ids.long()
    if logits.dtype in (torch.float32, torch.float64):
        chosen = torch.gather(logits, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return chosen - lse
    rows = []
    for row_logits, row_ids in zip(logits, ids):
        row_logp = torch.log_softmax(row_logits.float(), dim=-1)
        rows.append(torch.gather(row_logp, dim=-1, index=row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits)`` over the last dim.

    Computed in float32 over chunks of ``chunk_size`` rows of the flattened leading dims.
    Usually called under ``torch.no_grad()`` for the ``entropy`` metric, but differentiable.

    Args:
      logits: ``[..., V]`` unnormalised scores, e.g. ``[B, T, V]``.
      chunk_size: rows per chunk (memory knob, result independent of it).

    Returns:
      ``[...]`` float32 entropies in nats, e.g. ``[B, T]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        p = logp.exp()
        # 0 * log 0 = 0 for masked (-inf) logits instead of nan
        out.append(-torch.where(p > 0, p * logp, 0.0).sum(dim=-1))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


# ------------------------------------------------------------------------------------- from hidden states
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 64 MiB in fp32, ~110 tokens at Qwen's 151,936 vocabulary
_FULL_LOGITS: set[type] = set()  # model classes that post-process their logits (softcapping, scaling): full path


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's logits hold about `DEFAULT_CHUNK_ELEMENTS` entries (at least 1)."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, int(vocab_size)))


def _dlogits_(x: Tensor, lse: Tensor, target: Tensor, grad: Tensor, T: float) -> Tensor:
    """In place on ``x [c, V]`` (the logits / T, fp32): the gradient of ``grad * log softmax(logits / T)[target]``
    with respect to the logits, ``(onehot(target) - softmax) * grad / T``."""
    x.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # -grad * softmax
    x.scatter_add_(1, target[:, None], grad[:, None])  # + grad at the target
    return x.div_(T) if T != 1.0 else x


class _LogSoftmaxGather(torch.autograd.Function):
    """``log softmax(logits / T)[target]`` for one chunk ``[c, V]``, in fp32 (fp64 stays fp64).

    Saves only the logits (in their own dtype) and the log-sum-exp; the backward builds
    ``(onehot - softmax) * grad / T`` in one fp32 ``[c, V]`` buffer, in place.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, temperature: float) -> Tensor:
        x = logits if logits.dtype == torch.float64 else logits.float()
        if temperature != 1.0:
            x = x / temperature
        lse = torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, target, lse)
        ctx.temperature = temperature
        return x.gather(-1, target[:, None]).squeeze(-1) - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, target, lse = ctx.saved_tensors
        T = ctx.temperature
        x = logits if logits.dtype == torch.float64 else logits.float()
        x = x / T if T != 1.0 else (x.clone() if x.data_ptr() == logits.data_ptr() else x)
        return _dlogits_(x, lse, target, grad, T).to(logits.dtype), None, None


class _LinearLogprobs(torch.autograd.Function):
    """`chunked_logprobs` through a plain ``nn.Linear`` head in one autograd node: the same chunk-by-chunk
    forward and recompute-in-backward, but the weight's gradient is accumulated chunk by chunk INTO ONE
    ``[vocab, hidden]`` buffer (``addmm_``). Through the module, autograd makes a fresh ``[vocab, hidden]``
    weight gradient for every chunk and adds it to the running sum: one more vocabulary-sized tensor at the
    backward's peak (measured, 2,048 tokens at 151,936 x 512 in fp32: the backward's RSS above the weight's
    gradient 601 MB through the module, 134 MB here). Under autocast the backward recomputes the logits under the
    forward's autocast state, so they match the forward's log-sum-exp.

    Returns ``(logp [N], entropy [N] or empty)``, both fp32 (fp64 for an fp64 head); entropy has no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dev = hidden.device.type
        ctx.amp = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        logps, lses, entropies = [], [], []
        for s in range(0, hidden.shape[0], chunk_size):
            x = nn.functional.linear(hidden[s : s + chunk_size], weight, bias).to(acc)
            if temperature != 1.0:
                x = x / temperature
            lse = torch.logsumexp(x, dim=-1)
            logps.append(x.gather(-1, targets[s : s + chunk_size, None]).squeeze(-1) - lse)
            lses.append(lse)
            if with_entropy:
                entropies.append(entropy_from_logits(x, chunk_size=max(1, x.shape[0])).float())
        ctx.save_for_backward(
            hidden, weight, bias, targets, torch.cat(lses) if lses else hidden.new_zeros(0, dtype=acc)
        )
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=acc)
        entropy = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        T, c = ctx.temperature, ctx.chunk_size
        acc = lse.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b and bias is not None else None
        for s in range(0, hidden.shape[0], c):
            h, g = hidden[s : s + c], grad[s : s + c].to(acc)
            with torch.autocast(ctx.amp[0], dtype=ctx.amp[2], enabled=ctx.amp[1]):
                x = nn.functional.linear(h, weight, bias)
            x = x.to(acc)
            if T != 1.0:
                x = x / T
            d = _dlogits_(x, lse[s : s + c], targets[s : s + c], g, T).to(weight.dtype)  # d logp / d logits
            if grad_h is not None:  # (under autocast the hidden states may be bf16 and the weight fp32)
                grad_h[s : s + c] = d @ weight
            if grad_w is not None:
                grad_w.addmm_(d.t(), h.to(d.dtype))
            if grad_b is not None:
                grad_b.add_(d.sum(0))
        return grad_h, grad_w, grad_b, None, None, None, None


def _plain_linear(head: nn.Module) -> bool:
    """A bare ``nn.Linear`` whose call does nothing but the matmul: no module hooks (DeepSpeed ZeRO-3 gathers its
    weight in one, an FSDP2 unit of its own unshards in one), no wrapper (peft's LoRA / modules_to_save are other
    classes), a weight that is a plain tensor (not an FSDP2 DTensor, not a ZeRO-3 partition)."""
    from torch.distributed.tensor import DTensor

    hooks = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks)
    return (
        type(head) is nn.Linear
        and not any(hooks)
        and not isinstance(head.weight, DTensor)
        and not hasattr(head.weight, "ds_id")
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def _chunk_logprobs(
    head: nn.Module, hidden: Tensor, target: Tensor, temperature: float, entropy_slot: list | None
) -> Tensor:
    """One chunk: logits through `head` (the module: its hooks and LoRA run), then log-softmax + gather."""
    logits = head(hidden)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != hidden.shape[0]:
        raise RuntimeError(
            f"the output layer {type(head).__name__} did not map [tokens, hidden] to [tokens, vocab] "
            f"(got {getattr(logits, 'shape', type(logits))}); chunked log-probs need a per-token head"
        )
    if entropy_slot is not None and not entropy_slot:  # the first call only, not the backward's recompute
        with torch.no_grad():
            scaled = logits.float() / temperature if temperature != 1.0 else logits
            entropy_slot.append(entropy_from_logits(scaled, chunk_size=max(1, logits.shape[0])))
    return _LogSoftmaxGather.apply(logits, target, temperature)


def chunked_logprobs(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log softmax(head(hidden) / temperature)[targets]`` without ever holding ``[tokens, vocab]`` logits.

    The tokens (all leading dims of `hidden`, flattened) go through `head` `chunk_size` at a time;
    each chunk's log-sum-exp is taken in fp32 whatever the head's dtype. With grad, every chunk is
    a non-reentrant `torch.utils.checkpoint`: its logits are dropped after the forward and
    recomputed (through `head` again) in the backward, so this part's peak memory is
    O(chunk_size x vocab) for any number of tokens. Gradients reach `hidden` and `head`'s
    parameters (a trained or tied lm_head, LoRA on it). `head` is called as a module, so its hooks
    (DeepSpeed ZeRO-3's parameter gather, FSDP's) and wrappers (peft) run on every call. A bare ``nn.Linear``
    head with no hooks takes `_LinearLogprobs` instead: the same chunks and recompute in one autograd node, its
    weight gradient accumulated in one buffer rather than one per chunk.

    Args:
      hidden: ``[..., H]`` final hidden states at the scoring positions (any float dtype).
      head: the output layer, mapping ``[c, H]`` to ``[c, V]`` logits row by row.
      targets: ``[...]`` int token ids, one per position of `hidden`.
      temperature: > 0; logits are divided by it (in fp32) before the softmax.
      chunk_size: tokens per chunk (default `default_chunk_size` of the head's vocabulary).
      with_entropy: also return the entropy of ``softmax(logits / temperature)`` (no grad).

    Returns:
      ``[...]`` log-probs in float32 (float64 for a float64 head), or ``(logp, entropy)``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"expected hidden [..., H] and targets [...], got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = default_chunk_size(getattr(head, "out_features", 0) or 32768)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if _plain_linear(head):  # one autograd node, the weight's gradient accumulated in place
        logp, entropy = _LinearLogprobs.apply(
            flat_h, head.weight, head.bias, flat_t, float(temperature), chunk_size, with_entropy
        )
        return (logp.view(targets.shape), entropy.view(targets.shape)) if with_entropy else logp.view(targets.shape)
    need_grad = torch.is_grad_enabled() and (flat_h.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, entropies = [], []
    for s in range(0, flat_h.shape[0], chunk_size):
        slot = [] if with_entropy else None
        args = (head, flat_h[s : s + chunk_size], flat_t[s : s + chunk_size], float(temperature), slot)
        logps.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if need_grad else _chunk_logprobs(*args))
        if with_entropy:
            entropies.append(slot[0])
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if not logps:  # no tokens: an empty result that still belongs to the graph
        logp = (flat_h.sum(-1) * 0).to(acc)
        entropy = torch.zeros(0, dtype=torch.float32, device=hidden.device)
    else:
        logp = torch.cat(logps)
        entropy = torch.cat(entropies) if with_entropy else None
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if with_entropy else logp


def forward_logprobs(
    model: nn.Module,
    inputs: dict,
    targets: Tensor,
    positions: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(targets) from ONE call of `model` (as given: DDP, DeepSpeed, FSDP2, peft wrappers run), chunked.

    For the duration of the call, the HF model's output layer (``get_output_embeddings()``, found
    under any wrapper) is replaced by a module that receives the final hidden states of the kept
    positions and runs `chunked_logprobs` through the real output layer, inside the model's own
    forward: so the wrappers' hooks fire (an FSDP2 root's parameters are unsharded there, ZeRO-3
    gathers the head's weight by its module hooks), a LoRA'd / ``modules_to_save`` lm_head applies,
    and ``out.logits`` comes back as the ``[B, K]`` log-probs. No ``[tokens, vocab]`` tensor exists
    beyond one chunk, forward or backward.

    Args:
      model: a transformers causal LM, possibly wrapped.
      inputs: forward kwargs (``input_ids``, ``attention_mask``, ``position_ids``, ``prefix_layout``...);
        ``use_cache`` defaults to False, ``logits_to_keep`` is set here.
      targets: ``[B, K]`` token ids to score.
      positions: None: the K positions predicting the LAST K input tokens (plain layout: targets =
        completion_ids, the last C columns of input_ids); or a ``[K]`` long tensor of sequence positions
        whose next token is ``targets[:, k]`` (the packed layout's ``keep_idx``, B = 1).
      temperature: > 0, the sampling temperature (logits / temperature, in fp32).
      chunk_size: tokens per chunk; default `default_chunk_size` of the config's vocabulary.
      with_entropy: also return per-token entropies ``[B, K]`` (fp32, no grad).

    Returns:
      ``[B, K]`` log-probs, float32 whatever the weights' dtype (log-sum-exp in fp32), grad following
      the caller's grad mode; or ``(logp, entropy)``.

    Models that transform logits after the output layer (Gemma2's final softcapping, Cohere's or
    Granite's scaling), or have no output embeddings, are detected (the model's ``logits`` differ from
    what the replacement returned) and use the full-logits path, with one warning per model class.

    Why inside the forward, through the module: under FSDP2 the head's weight is a sharded DTensor
    outside the root's forward (calling the head there fails: mixed Tensor and DTensor); inside it the
    root has unsharded it, and the chunks' recompute runs in the root's backward, when it is unsharded
    again (a head wrapped as its own FSDP unit unshards at each call). Under DeepSpeed ZeRO-3 the
    weight is gathered by DeepSpeed's own module hooks at each call of the head (forward, and the
    recompute and backward of each chunk), which is also what a tied weight's backward needs; nothing
    here imports deepspeed. `deepspeed.zero.GatheredParameters` around the loop would not do: the
    weight would be re-partitioned at its exit, before the backward that needs it. Seen with deepspeed
    0.19.8 (one process, counting its gathers of the head's weight): when a step's chunk count
    matches DeepSpeed's recorded module trace the weight is gathered once per step and kept; when it
    changes (token counts vary step to step) DeepSpeed re-traces and gathers it at every chunk call,
    about 3 per chunk: a larger `chunk_size` means fewer gathers.
    """
    hf = _hf_model(model)
    B, K = targets.shape
    keep = K + 1 if positions is None else positions
    head = hf.get_output_embeddings() if hf is not None else None
    if head is None or type(hf) in _FULL_LOGITS:
        if hf is not None and type(hf) not in _FULL_LOGITS:
            _FULL_LOGITS.add(type(hf))
            log.warning(
                "%s has no output embeddings module: log-probs use full [tokens x vocab] logits", type(hf).__name__
            )
        return _full_logits(model, inputs, targets, positions, temperature, with_entropy)
    vocab = getattr(hf.config.get_text_config(), "vocab_size", None) or getattr(head, "out_features", 32768)
    probe = _LogprobHead(head, targets, positions, temperature, chunk_size or default_chunk_size(vocab), with_entropy)
    with _swapped(hf, head, probe):
        out = model(**{"use_cache": False, **inputs, "logits_to_keep": keep})
    logp = out.logits if hasattr(out, "logits") else out[0]
    if probe.logp is None:
        raise RuntimeError(f"{type(hf).__name__}'s forward never called its output layer {type(head).__name__}")
    if logp.shape != probe.logp.shape or not torch.equal(logp.detach(), probe.logp.detach()):
        _FULL_LOGITS.add(type(hf))
        log.warning(
            "%s transforms its logits after the output layer (e.g. final softcapping or scaling): log-probs "
            "use full [tokens x vocab] logits for this model class (more memory)",
            type(hf).__name__,
        )
        return _full_logits(model, inputs, targets, positions, temperature, with_entropy)
    return (logp, probe.entropy) if with_entropy else logp


class _LogprobHead(nn.Module):
    """Stands in for the output layer during one forward: hidden states in, `chunked_logprobs` out."""

    def __init__(
        self,
        head: nn.Module,
        targets: Tensor,
        positions: Tensor | None,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ):
        super().__init__()
        # plain attributes, not submodules: the real head keeps its one place in the module tree
        self.__dict__.update(
            head=head,
            targets=targets,
            positions=positions,
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_entropy,
            logp=None,
            entropy=None,
        )

    @property
    def weight(self) -> Tensor:  # for models that read lm_head.weight (its dtype / device)
        return self.head.weight

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = _select(hidden, self.targets.shape[1], self.positions)
        out = chunked_logprobs(hidden, self.head, self.targets, self.temperature, self.chunk_size, self.with_entropy)
        logp, self.entropy = out if self.with_entropy else (out, None)
        self.logp = logp.clone()  # not a view: FSDP2 hooks the root's outputs for its backward
        return self.logp


def _select(x: Tensor, K: int, positions: Tensor | None) -> Tensor:
    """The K scoring positions of ``x [B, S, ...]`` (S: the K(+1) kept, or all if the model ignored logits_to_keep)."""
    if positions is None:
        if x.shape[1] < K + 1:
            raise RuntimeError(f"the model kept {x.shape[1]} positions, {K + 1} were asked for (logits_to_keep)")
        return x[:, x.shape[1] - K - 1 : -1]
    return x if x.shape[1] == positions.numel() else x[:, positions]


def _full_logits(
    model: nn.Module, inputs: dict, targets: Tensor, positions: Tensor | None, temperature: float, with_entropy: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference path: the model's own [B, K(+1), V] logits, then `selective_log_softmax`."""
    keep = targets.shape[1] + 1 if positions is None else positions
    out = model(**{"use_cache": False, **inputs, "logits_to_keep": keep})
    logits = _select(out.logits if hasattr(out, "logits") else out[0], targets.shape[1], positions)
    logp = selective_log_softmax(logits, targets, temperature=temperature)
    logp = logp if logp.dtype == torch.float64 else logp.float()
    if not with_entropy:
        return logp
    with torch.no_grad():
        return logp, entropy_from_logits(logits.float() / temperature)


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The outermost transformers model under any wrapper (DDP / DeepSpeed `.module`, peft, FSDP2 in place)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


@contextlib.contextmanager
def _swapped(root: nn.Module, old: nn.Module, new: nn.Module) -> Iterator[None]:
    """Puts `new` where `old` sits in `root`'s module tree for the block."""
    name = next((n for n, m in root.named_modules() if m is old), None)
    if not name:
        raise RuntimeError(f"{type(root).__name__}: its output layer is not one of its submodules")
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
    try:
        yield
    finally:
        setattr(parent, leaf, old)
