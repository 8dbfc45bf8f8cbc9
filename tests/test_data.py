"""grpo.data: every dataset form the README names loads the same rows; prompts as every stage sees them.

README: "Datasets are JSONL/JSON/parquet/CSV files or folders, or hub datasets" (`name[@config][:split]`);
`data.prompt_overflow` (truncate_left | drop | error) past `data.max_prompt_length`; `data.apply_chat_template`,
chat `messages` rows and `data.system_prompt`.
"""

import json
import uuid

import pytest

from conftest import TOKENIZER, TOYWORLD
from grpo.config import DataConfig, ModelConfig
from grpo.data import check_columns, load_rows, prompt_records, sft_examples
from grpo.errors import UserError
from grpo.modeling import load_tokenizer
from helpers_common import write_jsonl

ROWS = [
    {"prompt": "Q:47+38=", "completion": "<a>85</a>", "answer": "85", "category": "math"},
    {
        "prompt": "Q:how to bake a cake?",
        "completion": "<a>first get the cake, then bake it.</a>",
        "answer": "",
        "category": "benign",
    },
    {"prompt": "Q:12+34=", "completion": "<a>46</a>", "answer": "46", "category": "math"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path=str(TOKENIZER)))


def test_file_formats_and_folders_give_the_same_rows(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    write_jsonl(tmp_path / "folder" / "a.jsonl", ROWS[:2])  # a folder: its files in name order
    write_jsonl(tmp_path / "folder" / "b.jsonl", ROWS[2:])
    (tmp_path / "folder" / "notes.txt").write_text("not data")
    for spec in ("d.parquet", "d.csv", "d.json", "d.jsonl", "folder"):
        rows = load_rows(str(tmp_path / spec), "data.train")
        if spec == "d.csv":  # CSV has no types: datasets reads the answers as numbers, the empty one as missing
            assert [r["answer"] for r in rows] == [85, None, 46]
            rows = [{**r, "answer": "" if r["answer"] is None else str(int(r["answer"]))} for r in rows]
        assert rows == ROWS, spec


def test_hub_style_name_config_split(tmp_path, monkeypatch):
    """`name@config:split` reaches datasets.load_dataset as (name, config, split=...): a local dataset repository
    with two configs stands in for the hub (no network). Its name is new each run: offline, datasets would serve
    an earlier run's cached copy of a dataset with the same name and config."""
    name = f"hubstyle_{uuid.uuid4().hex[:12]}"
    repo = tmp_path / name
    write_jsonl(repo / "first.jsonl", ROWS[:1])
    write_jsonl(repo / "second_train.jsonl", ROWS[1:2])
    write_jsonl(repo / "second_test.jsonl", ROWS[1:])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: first\n  data_files:\n  - split: train\n    path: first.jsonl\n"
        "- config_name: second\n  data_files:\n  - split: train\n    path: second_train.jsonl\n"
        "  - split: test\n    path: second_test.jsonl\n---\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_rows(f"{name}@second:test", "data.train") == ROWS[1:]
    assert load_rows(f"{name}@second", "data.train") == ROWS[1:2]  # the train split by default
    assert load_rows(f"{name}@first", "data.train") == ROWS[:1]
    with pytest.raises(UserError, match=f"data.train '{name}@third:test' cannot be read"):
        load_rows(f"{name}@third:test", "data.train")


def test_prompt_overflow(tok):
    rows = [{"prompt": "Q:1+2="}, {"prompt": "Q:47+38="}]  # 6 and 8 tokens (one per character)
    cfg = DataConfig(max_prompt_length=6)
    full = tok("Q:47+38=")["input_ids"]
    records, dropped = prompt_records(rows, "prompt", cfg, tok)
    assert (
        dropped == 0
        and records[1]["prompt_ids"] == full[-6:]
        and records[0]["prompt_ids"] == tok("Q:1+2=")["input_ids"]
    )
    records, dropped = prompt_records(rows, "prompt", DataConfig(max_prompt_length=6, prompt_overflow="drop"), tok)
    assert dropped == 1 and [r["prompt"] for r in records] == ["Q:1+2="]
    with pytest.raises(UserError, match=r"prompt 1 has 8 tokens > data.max_prompt_length=6"):
        prompt_records(rows, "prompt", DataConfig(max_prompt_length=6, prompt_overflow="error"), tok)
    with pytest.raises(UserError, match="every prompt is longer"):
        prompt_records(rows, "prompt", DataConfig(max_prompt_length=3, prompt_overflow="drop"), tok)


def test_chat_template_prompts_and_messages(tok):
    """String prompts wrapped as a user message (data.apply_chat_template), chat `messages` rows (the prompt is
    every message before the last assistant one) and TRL's conversational `prompt` lists give the same prompt."""
    cfg = DataConfig(apply_chat_template=True)
    (plain,), _ = prompt_records([{"prompt": "47+38=", "answer": "85"}], "prompt", cfg, tok)
    assert (
        plain["prompt_text"] == "Q:47+38="
        and plain["prompt_ids"] == tok("Q:47+38=", add_special_tokens=False)["input_ids"]
    )
    assert plain["answer"] == "85"  # other columns travel with the prompt
    chat = [
        {
            "messages": [{"role": "user", "content": "47+38="}, {"role": "assistant", "content": "<a>85</a>"}],
            "answer": "85",
        }
    ]
    assert check_columns(chat, DataConfig(), "x", "data.train", need_completion=True) == "messages"
    (rec,), _ = prompt_records(chat, "messages", DataConfig(), tok)
    assert rec["prompt_text"] == "Q:47+38=" and rec["prompt_ids"] == plain["prompt_ids"]
    (ex,) = sft_examples(chat, "messages", DataConfig(), tok, max_length=64)
    assert tok.decode(ex.input_ids) == "Q:47+38=<a>85</a><eos>"
    trl_style = [{"prompt": [{"role": "user", "content": "47+38="}], "answer": "85"}]
    fmt = check_columns(trl_style, DataConfig(), "x", "data.train", need_completion=False)
    assert prompt_records(trl_style, fmt, DataConfig(), tok)[0][0]["prompt_text"] == "Q:47+38="


def test_system_prompt(tok):
    """data.system_prompt is prepended as a system message (string prompts with apply_chat_template, and chat
    rows that have no system message of their own), rendered by the tokenizer's template."""
    tok = load_tokenizer(ModelConfig(name_or_path=str(TOKENIZER)))
    tok.chat_template = (
        "{%- for m in messages -%}{{ m['role'][0] }}:{{ m['content'] }} {% endfor -%}"
        "{%- if add_generation_prompt %}a:{% endif -%}"
    )
    cfg = DataConfig(apply_chat_template=True, system_prompt="be brief")
    (rec,), _ = prompt_records([{"prompt": "12+34="}], "prompt", cfg, tok)
    assert rec["prompt_text"] == "s:be brief u:12+34= a:"
    assert tok.unk_token_id not in rec["prompt_ids"] and tok.decode(rec["prompt_ids"]) == rec["prompt_text"]
    own = [{"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "1+1="}]}]
    assert (
        prompt_records(own, "messages", DataConfig(system_prompt="be brief"), tok)[0][0]["prompt_text"]
        == "s:mine u:1+1= a:"
    )
    none = [{"messages": [{"role": "user", "content": "1+1="}]}]
    assert (
        prompt_records(none, "messages", DataConfig(system_prompt="be brief"), tok)[0][0]["prompt_text"]
        == "s:be brief u:1+1= a:"
    )
    assert prompt_records(none, "messages", DataConfig(), tok)[0][0]["prompt_text"] == "u:1+1= a:"


def test_shipped_toyworld_loads_as_rows():
    rows = load_rows(str(TOYWORLD / "eval.jsonl"), "data.eval")
    assert len(rows) == 280 and set(rows[0]) == {"prompt", "completion", "answer", "category"}
