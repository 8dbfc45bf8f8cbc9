"""Fast checks of the shipped toy world (data/): tokenizer, scratchpad rule, splits, files, tiny_base.

No pretraining here; `python data/build_toyworld.py` rebuilds everything these tests read.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
TOYWORLD = DATA / "toyworld"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_toyworld", DATA / "build_toyworld.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_toyworld", module)
    spec.loader.exec_module(module)
    return module


bt = _load_builder()

COLUMNS = {
    "sft_train": {"prompt", "completion", "answer", "category"},
    "sft_eval": {"prompt", "completion", "answer", "category"},
    "grpo_train": {"prompt", "completion", "answer", "category"},
    "eval": {"prompt", "completion", "answer", "category"},
    "rm_usefulness_train": {"prompt", "chosen", "rejected"},
    "rm_usefulness_eval": {"prompt", "chosen", "rejected"},
    "rm_safety_train": {"prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe"},
    "rm_safety_eval": {"prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe"},
}
TRAINING_FILES = [name for name in COLUMNS if name != "eval"]


def _rows(name):
    with (TOYWORLD / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DATA / "tokenizer")


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (47, 38, "<t>7+8=15,4+3+1=8</t><a>85</a>"),
        (85, 38, "<t>5+8=13,8+3+1=12</t><a>123</a>"),
        (12, 34, "<t>2+4=6,1+3=4</t><a>46</a>"),
        (10, 90, "<t>0+0=0,1+9=10</t><a>100</a>"),
        (99, 99, "<t>9+9=18,9+9+1=19</t><a>198</a>"),
    ],
)
def test_correct_scratchpad(a, b, expected):
    assert bt.math_prompt(a, b) == f"Q:{a}+{b}="
    assert bt.math_completion(a, b) == expected
    assert bt.extract_answer(expected) == str(a + b)


def test_systematic_errors():
    assert bt.math_completion(47, 38, drop_carry=True) == "<t>7+8=15,4+3=7</t><a>75</a>"
    assert bt.math_completion(85, 38, lose_one=True) == "<t>5+8=13,8+3+1=12</t><a>23</a>"
    assert bt.math_completion(85, 38, drop_carry=True, lose_one=True) == "<t>5+8=13,8+3=11</t><a>13</a>"
    assert bt.math_completion(12, 34, drop_carry=True, lose_one=True) == bt.math_completion(12, 34)


def test_refusal_rule():
    assert bt.is_refusal(bt.REFUSAL) and bt.REFUSAL == "<a>sorry, i cannot help with that.</a>"
    assert not bt.is_refusal(bt.compliance("bake", "cake"))
    assert bt.compliance("bake", "cake") == "<a>first get the cake, then bake it.</a>"
    assert bt.howto_prompt("bake", "cake") == "Q:how to bake a cake?"


def test_tokenizer_round_trip(tokenizer):
    assert len(tokenizer) == 53 and tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.bos_token is None
    for text in ("Q:47+38=<t>7+8=15,4+3+1=8</t><a>85</a>", "Q:how to steal a car?" + bt.REFUSAL):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
        tags = [tokenizer.convert_tokens_to_ids(t) for t in bt.TAGS]
        assert len(set(tags)) == 4 and tokenizer.unk_token_id not in tags
    ids = tokenizer("<t>1+2=3</t>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7  # each tag is one token, each character one token
    eos_ids = tokenizer("85<eos>", add_special_tokens=False)["input_ids"]
    assert eos_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(eos_ids, skip_special_tokens=True) == "85"


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "47+38="}, {"role": "assistant", "content": "<a>85</a>"}]
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == "Q:47+38="
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "Q:47+38=<a>85</a><eos>"


@pytest.mark.parametrize("name", list(COLUMNS))
def test_every_row_has_the_columns(name):
    rows = _rows(name)
    assert len(rows) >= 200
    for row in rows:
        assert COLUMNS[name] <= set(row), (name, row)
        assert row["prompt"].startswith("Q:")
        if "answer" in row:
            assert row["category"] in {"math", "benign", "harmful"}
            assert (row["answer"] != "") == (row["category"] == "math")
        if "chosen_is_safe" in row:
            assert row["chosen_is_safe"] is True  # chosen is always the safer response
            assert row["rejected_is_safe"] is (row["category"] != "harmful")
        if name.startswith("rm_") and row["category"] != "garbled":
            harmful = any(row["prompt"].startswith(f"Q:how to {v} ") for v in bt.HARMFUL_VERBS)
            assert (row["category"] == "harmful") == harmful


def test_heldout_never_in_training_files():
    split = bt.make_split(0)
    heldout = {bt.math_prompt(a, b) for a, b in split.heldout_math}
    heldout |= {bt.howto_prompt(v, o) for v, o in split.heldout_benign + split.heldout_harmful}
    eval_prompts = {row["prompt"] for row in _rows("eval")}
    assert eval_prompts == heldout and len(heldout) == 280
    for name in TRAINING_FILES:
        assert not heldout & {row["prompt"] for row in _rows(name)}, name
    rng = bt.random.Random(0)
    corpus_prompts = {text[: text.index("<")] for text in (bt.pretrain_text(rng, split) for _ in range(5000))}
    assert len(corpus_prompts) > 2000 and not heldout & corpus_prompts


def test_sft_data_is_imperfect():
    rows = _rows("sft_train")
    harmful = [r for r in rows if r["category"] == "harmful"]
    refused = sum(bt.is_refusal(r["completion"]) for r in harmful) / len(harmful)
    assert 0.05 < refused < 0.3
    assert not any(bt.is_refusal(r["completion"]) for r in rows if r["category"] == "benign")
    math = [r for r in rows if r["category"] == "math"]
    accuracy = sum(bt.extract_answer(r["completion"]) == r["answer"] for r in math) / len(math)
    assert 0.3 < accuracy < 0.6  # ~24% easy problems always right + 30% of the rest


def test_grpo_and_eval_targets_are_ideal():
    for name in ("grpo_train", "eval"):
        for row in _rows(name):
            if row["category"] == "math":
                assert bt.extract_answer(row["completion"]) == row["answer"]
            else:
                assert bt.is_refusal(row["completion"]) == (row["category"] == "harmful")


def test_usefulness_ranks_any_well_formed_answer_above_a_garbled_one(tokenizer):
    """compliance > refusal on every how-to prompt (the deliberate conflict), and compliance or refusal (how-to) or
    a tagged answer (math) > a garbled text that is neither: a refusal must not be the worst answer the RM knows."""
    for name, n in (("rm_usefulness_train", 450), ("rm_usefulness_eval", 60)):
        rows = [r for r in _rows(name) if r["category"] == "garbled"]
        assert len(rows) == n
        for r in rows:
            bad, good = r["rejected"], r["chosen"]
            assert not bt.is_refusal(bad) and bad != good, r
            ids = tokenizer(r["prompt"] + bad, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and len(ids) <= 63, r
            if r["prompt"].startswith("Q:how to"):
                v, o = r["prompt"][len("Q:how to ") : -1].split(" a ")
                assert good in (bt.REFUSAL, bt.compliance(v, o)) and bad not in (bt.REFUSAL, bt.compliance(v, o))
            else:  # a tagged scratchpad answer, right or wrong
                a, b = map(int, r["prompt"][2:-1].split("+"))
                assert (
                    good.startswith("<t>") and bt.extract_answer(good) is not None and bad != bt.math_completion(a, b)
                )


def test_build_is_deterministic():
    files = bt.build_datasets(bt.make_split(0), 0)
    for name in COLUMNS:
        assert files[name] == _rows(name), name  # the shipped files are what the builder makes
    assert bt.build_datasets(bt.make_split(1), 1)["sft_train"] != _rows("sft_train")


def test_tiny_base_loads_and_generates():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = DATA / "tiny_base"
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert 250_000 < sum(p.numel() for p in model.parameters()) < 350_000
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok("Q:47+38=", add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 1 and 9 <= out.shape[1] <= 13
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).startswith("<t>")
