"""Our GRPO/DAPO loss equals TRL's `GRPOTrainer._compute_loss` on identical inputs.

Two layers:
- a tiny hand-built case (2 sequences, 2 tokens; clipped high, clipped low, unclipped; k3 KL)
  whose loss and gradient are computed by hand below: checked against `grpo.losses.policy_loss`
  always, and against TRL's `_compute_loss` when TRL is installed;
- a tiny random Llama with fixed ragged completions, advantages, old and reference logprobs:
  our `grpo.batch.token_logprobs` + `policy_loss` vs TRL's `_compute_loss` (its own model forward, with its
  fused lm head), same loss value and the same parameter gradients.

TRL is pinned in requirements-cpu.txt (trl==1.16.0), so CI always runs these: with `CI=true` (set by
`.ci/run`) a missing TRL fails the TRL tests instead of skipping them; elsewhere (e.g. a GPU image without
TRL) they skip. The hand-computed ones always run.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from grpo.batch import build_batch, loss_mask, token_logprobs
from grpo.losses import policy_loss
from grpo.rollout import Completion

LN2 = math.log(2.0)
BETA = 0.1

# ---------------------------------------------------------------------------------- the hand case
# old_logp = 0, so logp is the log-ratio. eps = 0.2, beta = 0.1, A = [+1, -1], mask [[1, 1], [1, 0]].
#   seq0 tok0: r = 1.5, A = +1: min(1.5, clip 1.2) = 1.2 (clipped)  -> -1.2;  ref - logp = 0    -> k3 = 0
#   seq0 tok1: r = 0.9, A = +1: min(0.9, 0.9)      = 0.9            -> -0.9;  ref - logp = ln 2 -> k3 = 1 - ln 2
#   seq1 tok0: r = 0.5, A = -1: min(-0.5, -0.8)    = -0.8 (clipped) -> +0.8;  ref - logp = -ln2 -> k3 = ln 2 - 0.5
#   seq1 tok1: padding.
# per-token l = surrogate + beta * k3:
#   seq0 = [-1.2, -0.9 + 0.1 (1 - ln 2)], seq1 = [0.8 + 0.1 (ln 2 - 0.5)]
# grpo = mean over sequences of the per-sequence token mean:
#   ((-2.1 + 0.1 (1 - ln 2)) / 2 + 0.8 + 0.1 (ln 2 - 0.5)) / 2
# dapo = sum / num_tokens = (-1.2 - 0.9 + 0.8 + 0.1 * 0.5) / 3 = -1.25 / 3
# d l / d logp: clipped tokens 0 from the surrogate; unclipped -r A; k3: 1 - exp(ref - logp).
#   seq0 tok0: 0 + 0.1 (1 - 1) = 0;  seq0 tok1: -0.9 + 0.1 (1 - 2) = -1.0;  seq1 tok0: 0 + 0.1 (1 - 0.5) = 0.05
# grpo weights: seq0 tokens 1/(2*2), seq1 token 1/(1*2); dapo weights 1/3.
HAND_LOGP = [[math.log(1.5), math.log(0.9)], [math.log(0.5), 0.0]]
HAND_REF = [[math.log(1.5), math.log(0.9) + LN2], [math.log(0.5) - LN2, 0.0]]
HAND_ADV = [1.0, -1.0]
HAND_MASK = [[1.0, 1.0], [1.0, 0.0]]
EXPECTED = {
    "grpo": (((-2.1 + BETA * (1 - LN2)) / 2 + 0.8 + BETA * (LN2 - 0.5)) / 2, [[0.0, -1.0 / 4], [0.05 / 2, 0.0]]),
    "dapo": (-1.25 / 3, [[0.0, -1.0 / 3], [0.05 / 3, 0.0]]),
}


def hand_inputs():
    logp = torch.tensor(HAND_LOGP, dtype=torch.float64, requires_grad=True)
    return (
        logp,
        torch.zeros(2, 2, dtype=torch.float64),
        torch.tensor(HAND_REF, dtype=torch.float64),
        torch.tensor(HAND_ADV, dtype=torch.float64),
        torch.tensor(HAND_MASK, dtype=torch.float64),
    )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_ours_on_the_hand_case(loss_type):
    logp, old, ref, adv, mask = hand_inputs()
    loss, metrics = policy_loss(logp, old, adv, mask, loss_type=loss_type, beta=BETA, ref_logp=ref)
    loss.backward()
    value, grad = EXPECTED[loss_type]
    assert loss.item() == pytest.approx(value, abs=1e-6)
    torch.testing.assert_close(logp.grad.float(), torch.tensor(grad), atol=1e-6, rtol=0)
    assert metrics["clip_frac_high"] == pytest.approx(1 / 3) and metrics["clip_frac_low"] == pytest.approx(1 / 3)
    assert metrics["kl"] == pytest.approx(0.5 / 3)  # (0 + (1 - ln 2) + (ln 2 - 0.5)) / 3


# ---------------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl():
    try:
        import trl
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(
                f"CI=true but TRL cannot be imported ({e}): install requirements-cpu.txt (trl==1.16.0); "
                "these are the only outside check of the loss and its gradient"
            )
        pytest.skip("trl is not installed (pip install trl==1.16.0, or the `bench` extra)")
    return trl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("vs_trl") / "llama", seed=2)


def make_trainer(trl, path, loss_type: str, temperature: float = 1.0):
    """A real GRPOTrainer on the tiny model (CPU, fp32); only its `_compute_loss` is used.

    `use_bias_correction_kl=False`: TRL 1.16 defaults to multiplying the k3 KL by the importance
    ratio (DeepSeek-V3.2); DeepSeekMath's GRPO, which `policy_loss` implements, does not.
    """
    from datasets import Dataset

    args = trl.GRPOConfig(
        output_dir=str(path.parent / f"trl_out_{loss_type}"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        beta=BETA,
        loss_type=loss_type,
        epsilon=0.2,
        temperature=temperature,
        use_bias_correction_kl=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        model_init_kwargs={"dtype": torch.float32},
        save_strategy="no",
    )
    trainer = trl.GRPOTrainer(
        model=str(path),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 4),
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per step here
    trainer.model.train()
    return trainer


def trl_inputs(batch, mask, adv, old, ref, num_items):
    """The dict `_generate_and_score_completions` hands to `_compute_loss` (left-padded prompt | completion)."""
    C = batch.completion_ids.shape[1]
    return {
        "prompt_ids": batch.input_ids[:, :-C],
        "prompt_mask": batch.attention_mask[:, :-C],
        "completion_ids": batch.completion_ids,
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(num_items)),
    }


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_trl_on_the_hand_case(trl, tiny, loss_type):
    """TRL's loss arithmetic on the hand case (its logprob forward replaced by the hand log-probs)."""
    trainer = make_trainer(trl, tiny, loss_type)
    logp, old, ref, adv, mask = hand_inputs()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    inputs = {
        "prompt_ids": torch.ones(2, 1, dtype=torch.long),
        "prompt_mask": torch.ones(2, 1, dtype=torch.long),
        "completion_ids": torch.ones(2, 2, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    value, grad = EXPECTED[loss_type]
    assert loss.item() == pytest.approx(value, abs=1e-6)
    torch.testing.assert_close(logp.grad.float(), torch.tensor(grad), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_same_loss_and_gradients_as_trl_on_a_model(trl, tiny, loss_type):
    temperature = 0.8
    trainer = make_trainer(trl, tiny, loss_type, temperature)
    model = trainer.model
    gen = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    prompts = [[int(t) for t in torch.randint(3, V, (n,), generator=gen)] for n in (5, 3)]
    lens = [4, 2, 6, 1]  # ragged completions, G = 2
    comps = [
        Completion(j // 2, [int(t) for t in torch.randint(3, V, (n,), generator=gen)], None, "length")
        for j, n in enumerate(lens)
    ]
    batch = build_batch(prompts, [c.token_ids for c in comps], [c.prompt_index for c in comps], pad_id=0)
    mask = loss_mask(comps, torch.ones(len(comps), dtype=torch.bool), mask_truncated=False)
    adv = torch.tensor([0.7, -0.7, 1.2, -1.2])
    with torch.no_grad():
        base = token_logprobs(model, batch, temperature)
    noise = torch.randn(base.shape, generator=gen)
    old = (base + 0.3 * noise) * mask  # ratios both inside and outside [0.8, 1.2]
    ref = (base - 0.2 * noise.flip(0)) * mask
    num_items = 2 * int(mask.sum())  # dapo: tokens of the whole step (as if another micro-batch had as many)

    model.zero_grad(set_to_none=True)
    ours, _ = policy_loss(
        token_logprobs(model, batch, temperature),
        old,
        adv,
        mask,
        loss_type=loss_type,
        beta=BETA,
        ref_logp=ref,
        num_tokens=num_items,
    )
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, trl_inputs(batch, mask, adv, old, ref, num_items))
    theirs.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=1e-5)
    assert abs(ours.item()) > 1e-3
    assert ours_grads.keys() == trl_grads.keys() and ours_grads
    for name in ours_grads:
        torch.testing.assert_close(
            ours_grads[name], trl_grads[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}"
        )
