"""recipes/tools_qwen.yaml: multi-turn tool use with Qwen2.5-Instruct, checked offline.

The model cannot be downloaded here, so its chat template ships as a fixture (tests/fixtures/, Qwen2.5-Instruct's
`tokenizer_config.json` template, Hermes-style tools) on the toy tokenizer; what is checked is text: the prompts
the recipe builds (system prompt + the "# Tools" section with the calculator's JSON schema + the question), and
that a trajectory (prompt, a sampled tool call, the inserted tool response, the next turn) reads exactly as the
template renders the same conversation.
"""

import json

import pytest
from test_recipes import dry_run
from transformers import AutoTokenizer

from conftest import ROOT, TOKENIZER
from grpo.config import load_recipe
from grpo.data import prompt_records
from grpo.environments import environment_factory, tool_schemas
from grpo.rollout.multiturn import render_messages

RECIPE = ROOT / "recipes" / "tools_qwen.yaml"
TEMPLATE = ROOT / "tests" / "fixtures" / "qwen2.5_instruct_chat_template.jinja"
QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?"
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "48 + 48 / 2"}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen_tok():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = TEMPLATE.read_text().rstrip("\n")
    return tok


def test_recipe_passes_a_dry_run_offline():
    ok = dry_run("tools_qwen.yaml", 8)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "dry run OK for 8 process(es)" in ok.stdout and "weights not loaded" in ok.stdout


def test_prompts_render_the_system_prompt_tools_and_question_in_qwens_format(qwen_tok):
    r = load_recipe(RECIPE)
    tools = tool_schemas(r.environment)
    (rec,), dropped = prompt_records([{"question": QUESTION, "answer": "#### 72"}], "prompt", r.data, qwen_tok, tools)
    assert dropped == 0 and [t["function"]["name"] for t in tools] == ["calculator"]
    assert rec["prompt_text"] == (
        f"<|im_start|>system\n{r.data.system_prompt}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{json.dumps(tools[0], ensure_ascii=False)}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("ending", ["", "<|im_end|>"], ids=["stop-string", "end-of-message"])
def test_a_trajectory_reads_as_the_template_renders_the_conversation(qwen_tok, ending):
    """The turn stops at </tool_call> (the recipe's stop string) or at <|im_end|> (Qwen's eos); the inserted tool
    response closes the assistant message as the template does, either way."""
    r = load_recipe(RECIPE)
    env = environment_factory(r.environment)({"question": QUESTION})
    turn = CALL + ending
    messages = env.step(turn, [])
    assert messages == [{"role": "tool", "content": "72"}] and env.tool_calls == 1
    observation = render_messages(qwen_tok, messages, turn_text=turn)
    (rec,), _ = prompt_records([{"question": QUESTION}], "prompt", r.data, qwen_tok, tool_schemas(r.environment))
    conversation = [
        {"role": "system", "content": r.data.system_prompt},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": "72"},
    ]
    expected = qwen_tok.apply_chat_template(
        conversation, tools=tool_schemas(r.environment), tokenize=False, add_generation_prompt=True
    )
    assert rec["prompt_text"] + turn + observation == expected
    assert observation.endswith("<tool_response>\n72\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
