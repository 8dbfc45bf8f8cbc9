"""SFT: the completion-only mask, packing exactness, and a smoke run on the shipped tiny base."""

import json
import re

import pytest
import torch

from conftest import ROOT, TOKENIZER
from grpo.config import DataConfig, ModelConfig, load_recipe
from grpo.data import sft_examples
from grpo.errors import UserError
from grpo.modeling import load_tokenizer
from grpo.sft import collate, lm_loss, pack, run_sft


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path=str(TOKENIZER)))


def test_completion_only_labels(tok):
    rows = [{"prompt": "Q:12+34=", "completion": "<t>2+4=6,1+3=4</t><a>46</a>"}]
    (ex,) = sft_examples(rows, "prompt", DataConfig(), tok, max_length=64)
    n_prompt = len(tok("Q:12+34=")["input_ids"])
    assert n_prompt == 8  # one token per character, no BOS
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]).replace(" ", "") == "<t>2+4=6,1+3=4</t><a>46</a>"


def test_chat_messages_rendered_with_template(tok):
    rows = [{"messages": [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "<a>46</a>"}]}]
    (ex,) = sft_examples(rows, "messages", DataConfig(), tok, max_length=64)
    prompt_len = sum(l == -100 for l in ex.labels)
    assert tok.decode(ex.input_ids[:prompt_len]).replace(" ", "") == "Q:12+34="
    assert ex.input_ids[-1] == tok.eos_token_id and ex.input_ids.count(tok.eos_token_id) == 1


def test_loss_ignores_prompt_and_padding(tiny_model, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = [
        {"prompt": "Q:12+34=", "completion": "<a>46</a>"},
        {"prompt": "Q:how to bake a cake?", "completion": "<a>ok</a>"},
    ]
    exs = sft_examples(rows, "prompt", DataConfig(), tok, max_length=64)
    with torch.no_grad():
        loss, n = lm_loss(model, collate(exs, tok.pad_token_id))
        # hand-computed: cross-entropy of each completion token given its prefix, averaged over the 2 completions'
        # tokens
        total, count = 0.0, 0
        for e in exs:
            logits = model(torch.tensor([e.input_ids])).logits[0]
            for t in range(1, len(e.input_ids)):
                if e.labels[t] != -100:
                    total -= torch.log_softmax(logits[t - 1], -1)[e.labels[t]].item()
                    count += 1
    assert n == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_packing_is_exact(tiny_model, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = [{"prompt": f"Q:{a}+{b}=", "completion": f"<a>{a + b}</a>"} for a, b in [(12, 34), (56, 78), (90, 11)]]
    exs = sft_examples(rows, "prompt", DataConfig(), tok, max_length=64)
    packed = pack(exs, max_length=64)
    assert packed["input_ids"].shape[0] == 1  # all three fit in one row
    with torch.no_grad():
        loss_packed, n_packed = lm_loss(model, packed)
        loss_plain, n_plain = lm_loss(model, collate(exs, tok.pad_token_id))
    assert n_packed == n_plain
    assert loss_packed.item() == pytest.approx(loss_plain.item(), abs=1e-5)


# examples/domain: 12-8=4,5-3-1=1 when the units borrow
SCRATCHPAD_MINUS = re.compile(r"<t>1?\d-\d=\d+,\d-\d(-1)?=\d+</t><a>\d+</a>")


def greedy(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_sft_smoke_on_tiny_base(base_model, tmp_path):
    """SFT teaches the shipped base a format it does not have: 2-digit subtraction with a '-' scratchpad
    (examples/domain; the base writes '+' steps for these prompts). 60 steps, ~10 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            "sft.steps=60",
            "sft.eval_every=30",
            "sft.batch_size=16",
            "run.threads=1",
            "data.sft_train=examples/domain/train.jsonl",
            "data.sft_eval=examples/domain/eval.jsonl",
        ],
    )
    final = run_sft(recipe)
    history = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 60 and history[-1]["loss"] < history[0]["loss"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert (tmp_path / "sft" / "config.yaml").exists() and (tmp_path / "sft" / "sft_curves.png").exists()
    prompts = [
        json.loads(l)["prompt"] for l in (ROOT / "examples" / "domain" / "eval.jsonl").read_text().splitlines()[:12]
    ]
    tok = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    tuned = AutoModelForCausalLM.from_pretrained(final)
    assert not any(SCRATCHPAD_MINUS.fullmatch(greedy(base, tok, p)) for p in prompts)  # the base adds instead
    learned = [p for p in prompts if SCRATCHPAD_MINUS.fullmatch(greedy(tuned, tok, p))]
    assert len(learned) >= 10, learned  # held-out prompts answered in the new format


def test_sft_with_lora_saves_adapter(tiny_model, tmp_path):
    """final/ holds the trained adapter (lora_B moved off zero, no full weights); final/merged is the base with that
    adapter merged in: the same logits as the base + adapter through peft, not the base's."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={tiny_model}",
            "sft.steps=3",
            "sft.batch_size=4",
            "sft.lr=1e-2",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lora.merge_on_save=true",
            "data.sft_eval=null",
        ],
    )
    final = run_sft(recipe)
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [w for name, w in adapter.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)  # trained: a fresh adapter's lora_B is zero
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(final / "merged")(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert (merged - base_logits).abs().max() > 1e-3


def test_lr_schedule_steps_once_per_optimizer_step(tiny_model, tmp_path):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"run.output_dir={tmp_path}",
            f"model.name_or_path={tiny_model}",
            "sft.steps=4",
            "sft.batch_size=2",
            "sft.grad_accum=2",
            "sft.lr_scheduler=linear",
            "sft.lr=0.004",
            "data.sft_eval=null",
        ],
    )
    run_sft(recipe)
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.003, 0.002, 0.001, 0.0])  # linear decay over 4 optimizer steps, not 8 micro-batches


def test_eval_every_zero_evaluates_after_the_last_step_only(tmp_path):
    """`sft.eval_every: 0` (as in rm and grpo: no periodic evaluation) measures the eval loss once, at the end;
    it used to divide by zero when run_sft was called directly."""
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [f"run.output_dir={tmp_path}", "sft.steps=3", "sft.eval_every=0", "sft.batch_size=4", "run.threads=1"],
    )
    run_sft(recipe)
    history = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "eval_loss" in h] == [3]


CHATML = (
    "{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)
TOOL_CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "12+34="},
    {"role": "assistant", "content": "<t>calc 12+34</t>"},
    {"role": "tool", "content": "46"},
    {"role": "assistant", "content": "<a>46</a>"},
]


def labelled_spans(ex, tok) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels != -100), in order."""
    spans, run = [], []
    for i, l in zip(ex.input_ids, ex.labels):
        if l != -100:
            assert l == i
            run.append(i)
        elif run:
            spans.append(tok.decode(run).replace(" ", ""))
            run = []
    if run:
        spans.append(tok.decode(run).replace(" ", ""))
    return spans


@pytest.fixture
def chatml_tok():
    t = load_tokenizer(ModelConfig(name_or_path=str(TOKENIZER)))
    t.chat_template = CHATML
    return t


def test_every_assistant_turn_is_trained_and_nothing_else(chatml_tok):
    """A multi-turn tool conversation: both assistant turns (each with its end-of-turn token) are targets; the system,
    user and tool messages and the template's role markers are context; the whole sequence is the template's
    rendering of the conversation, token for token."""
    tok = chatml_tok
    (ex,) = sft_examples([{"messages": TOOL_CONVERSATION}], "messages", DataConfig(), tok, max_length=256)
    assert labelled_spans(ex, tok) == ["<t>calc12+34</t><eos>", "<a>46</a><eos>"]
    full = tok.apply_chat_template(TOOL_CONVERSATION, tokenize=False).rstrip()
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]


def test_assistant_turns_last_trains_the_final_turn_only(chatml_tok):
    tok = chatml_tok
    cfg = DataConfig(assistant_turns="last")
    (ex,) = sft_examples([{"messages": TOOL_CONVERSATION}], "messages", cfg, tok, max_length=256)
    assert labelled_spans(ex, tok) == ["<a>46</a><eos>"]
    (both,) = sft_examples([{"messages": TOOL_CONVERSATION}], "messages", DataConfig(), tok, max_length=256)
    assert ex.input_ids == both.input_ids  # the same sequence, fewer targets


def test_a_template_that_rewrites_history_trains_the_last_turn_with_a_warning(chatml_tok, caplog):
    """Templates that drop earlier turns' reasoning (the rendering of a longer conversation does not extend the
    shorter one's): the turns cannot be located, so the last one is trained, as before, and the log says why."""
    tok = chatml_tok
    tok.chat_template = (
        "{%- for m in messages -%}<|{{ m['role'] }}|>"
        "{%- if m['role'] == 'assistant' and not loop.last -%}...{%- else -%}{{ m['content'] }}{%- endif -%}"
        "<eos>\n{% endfor -%}{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
    )
    with caplog.at_level("WARNING", logger="grpo.data"):
        (ex,) = sft_examples([{"messages": TOOL_CONVERSATION}], "messages", DataConfig(), tok, max_length=256)
    assert labelled_spans(ex, tok) == ["<a>46</a><eos>"]
    assert "1 conversation(s) train their last assistant turn only" in caplog.text


def test_a_template_that_refuses_a_role_is_one_clear_error(tok):
    """The toy tokenizer's template knows user and assistant only: a tool message is a UserError naming the roles,
    not a jinja traceback."""
    with pytest.raises(UserError, match="roles user, assistant, tool"):
        sft_examples([{"messages": TOOL_CONVERSATION[1:]}], "messages", DataConfig(), tok, max_length=256)


def test_tool_schemas_are_rendered_into_sft_prompts_as_into_grpo_prompts(chatml_tok):
    """With the recipe's tools, the chat template renders their schemas in SFT as it does in GRPO's prompts (the
    model is tuned on the prompt it will be asked with); the schemas are context, not targets."""
    from grpo.data import prompt_records

    tok = chatml_tok
    tok.chat_template = "{%- if tools %}<|tools|>{{ tools | length }} tool(s)<eos>\n{% endif -%}" + CHATML
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    (ex,) = sft_examples([{"messages": TOOL_CONVERSATION}], "messages", DataConfig(), tok, max_length=256, tools=tools)
    full = tok.apply_chat_template(TOOL_CONVERSATION, tools=tools, tokenize=False).rstrip()
    assert full.startswith("<|tools|>1 tool(s)") and ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]
    assert labelled_spans(ex, tok) == ["<t>calc12+34</t><eos>", "<a>46</a><eos>"]
    (rec,), _ = prompt_records([{"messages": TOOL_CONVERSATION[:2]}], "messages", DataConfig(), tok, tools=tools)
    assert ex.input_ids[: len(rec["prompt_ids"])] == rec["prompt_ids"]  # GRPO's prompt is the SFT sequence's start
