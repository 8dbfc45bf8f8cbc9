"""The LoRA domain demo (README "LoRA on your own data", recipes/lora_domain.yaml, examples/domain/) does what the
README's table says (issue 20).

- fast: the shipped data is what examples/domain/make_data.py makes; the chat form and the prompt/completion form
  give every stage the same token ids (so the same numbers); the recipe header carries the README's table.
- slow (~2 min): `python -m grpo pipeline recipes/lora_domain.yaml`, as the README runs it in a fresh checkout, gives
  the README's table (base / SFT / GRPO held-out numbers) and adapter size, trains only the adapter, and GRPO beats
  SFT by the 20 points the demo is for. The run is seeded and deterministic on CPU: any difference means behaviour
  changed, and the message says what to update.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPE = ROOT / "recipes" / "lora_domain.yaml"
DOMAIN = ROOT / "examples" / "domain"
_spec = importlib.util.spec_from_file_location("domain_make_data", DOMAIN / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)  # examples/domain/make_data.py: the generator, solver and habit
_spec.loader.exec_module(make_data)

MODELS = ("base", "SFT (LoRA)", "GRPO (LoRA)")
UPDATE = (
    "If you changed this on purpose, rerun `python -m grpo pipeline recipes/lora_domain.yaml` and update the table "
    "and sizes in README.md (section 'LoRA on your own data') and the header of recipes/lora_domain.yaml."
)


def lora_section() -> str:
    text = README.read_text()
    m = re.search(r"^## LoRA on your own data\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "README.md has no '## LoRA on your own data' section"
    return m.group(1)


def table(text: str) -> dict[str, list[str]]:
    """{row label: [base, SFT, GRPO]} of the markdown table whose header names the three models (`# ` stripped)."""
    lines = [re.sub(r"^#\s?", "", l).strip() for l in text.splitlines()]
    head = next((i for i, l in enumerate(lines) if l.startswith("|") and all(f"| {m} " in l for m in MODELS)), None)
    assert head is not None, f"no table with the columns {MODELS} found"
    rows = {}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def readme_sizes() -> tuple[int, int, int]:
    """(trainable, total, adapter bytes) as the README states them."""
    text = lora_section()
    m = re.search(r"([\d,]+) trainable parameters of ([\d,]+)", text)
    b = re.search(r"`adapter_model\.safetensors`\) is ([\d,]+) bytes", text)
    assert m and b, "README's LoRA section no longer states 'N trainable parameters of M' and the adapter's bytes"
    return int(m[1].replace(",", "")), int(m[2].replace(",", "")), int(b[1].replace(",", ""))


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    assert make_data.main(["--out", str(tmp_path)]) == 0
    for f in sorted(tmp_path.iterdir()):
        assert (DOMAIN / f.name).read_text() == f.read_text(), (
            f"examples/domain/{f.name} differs from what `python examples/domain/make_data.py` writes: rerun it "
            "(and the demo: README 'LoRA on your own data')"
        )


def test_demos_carry_the_habit_and_held_out_is_unseen():
    """The story the README tells: demos forget most borrows, GRPO prompts and held-out problems are disjoint."""
    rows = {n: [json.loads(l) for l in (DOMAIN / f"{n}.jsonl").read_text().splitlines()] for n in make_data.FILES}
    problems = {n: [tuple(map(int, r["prompt"][2:-1].split("-"))) for r in rs] for n, rs in rows.items()}
    borrow = [(r, p) for r, p in zip(rows["train"], problems["train"]) if make_data.needs_borrow(*p)]
    forgot = sum(r["completion"] == make_data.solve(*p, forget_borrow=True)[0] for r, p in borrow)
    assert 0.6 < forgot / len(borrow) < 0.8 and len(rows["train"]) == 300
    assert all(r["completion"] == make_data.solve(*p)[0] for r, p in zip(rows["eval"], problems["eval"]))
    assert all(r["answer"] == str(a - b) for n in rows for r, (a, b) in zip(rows[n], problems[n]))
    sets = [set(p) for p in problems.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 1500  # no problem in two files, none twice


@pytest.mark.parametrize("name", make_data.FILES)
def test_chat_form_gives_the_same_tokens(name):
    """`{name}_chat.jsonl` through the tiny base's chat template = `{name}.jsonl` as prompt/completion, id for id
    (prompts as GRPO and eval see them; SFT examples with their eos), answers included: the same run either way."""
    from transformers import AutoTokenizer

    from grpo.config import DataConfig
    from grpo.data import check_columns, example_tokens, load_rows, prompt_tokens

    tok, cfg = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny_base"), DataConfig()
    forms = {}
    for suffix in ("", "_chat"):
        spec = str(DOMAIN / f"{name}{suffix}.jsonl")
        rows = load_rows(spec, "data")
        fmt = check_columns(rows, cfg, spec, "data", need_completion=False)
        forms[suffix] = [
            (
                prompt_tokens(r, fmt, cfg, tok)[1],
                example_tokens(r, fmt, cfg, tok) if name != "prompts" else None,
                r["answer"],
            )
            for r in rows
        ]
    assert forms[""] == forms["_chat"]


def test_recipe_header_carries_the_readme_table():
    assert table(RECIPE.read_text()) == table(lora_section()), (
        "recipes/lora_domain.yaml's header table differs from README's 'LoRA on your own data' table: make them equal"
    )


def measured(run: Path) -> dict[str, list[str]]:
    """The README table's rows, recomputed from the pipeline's eval (results.json, samples.jsonl)."""
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    counts = {m: {"n": 0, "b": 0, "ok_n": 0, "ok_b": 0, "forgot": 0} for m in ("base", "sft", "grpo")}
    for line in (run / "eval" / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        a, b = map(int, s["prompt"][2:-1].split("-"))
        m = re.search(r"<a>(\d+)</a>", s["completion"])
        right = bool(m) and int(m[1]) == a - b
        c, key = counts[s["model"]], "b" if make_data.needs_borrow(a, b) else "n"
        c[key] += 1
        c["ok_" + key] += right
        c["forgot"] += key == "b" and s["completion"] == make_data.solve(a, b, forget_borrow=True)[0]
    n, nb = counts["base"]["n"], counts["base"]["b"]
    labels = ("base", "sft", "grpo")
    return {
        f"accuracy ({n + nb} problems)": [f"{100 * results[m]['accuracy']:.1f}%" for m in labels],
        f"without a borrow ({n}) right": [str(counts[m]["ok_n"]) for m in labels],
        f"with a borrow ({nb}) right": [str(counts[m]["ok_b"]) for m in labels],
        "borrow forgotten, as the demos do": [str(counts[m]["forgot"]) for m in labels],
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The README's command in a fresh checkout's layout (shipped folders linked, no runs/)."""
    from conftest import run_in_fresh_layout

    assert "\npython -m grpo pipeline recipes/lora_domain.yaml" in lora_section()  # the README's line, run as written
    root = tmp_path_factory.mktemp("lora_domain")
    run_in_fresh_layout(root, [[sys.executable, "-m", "grpo", "pipeline", "recipes/lora_domain.yaml"]])
    return root / "runs" / "lora_domain"


@pytest.mark.slow  # the whole demo as the README runs it: ~2 min on 2 CPU cores
def test_readme_lora_table_is_what_the_demo_gives(demo_run):
    from safetensors import safe_open

    stated, got = table(lora_section()), measured(demo_run)
    diff = [
        f"  {k}: README {stated.get(k)}, demo {got.get(k)}" for k in {**stated, **got} if stated.get(k) != got.get(k)
    ]
    assert not diff, (
        "README's LoRA table no longer matches the demo (base, SFT, GRPO):\n" + "\n".join(diff) + "\n" + UPDATE
    )
    adapter = demo_run / "train" / "final" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
        trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    with safe_open(str(ROOT / "data" / "tiny_base" / "model.safetensors"), "pt") as f:
        base = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert all("lora_" in k for k in keys), keys  # only the adapter is saved as trained
    got_sizes = (trainable, base + trainable, adapter.stat().st_size)
    assert got_sizes == readme_sizes(), (
        f"README states (trainable, total, adapter bytes) = {readme_sizes()}, the demo gives {got_sizes}. {UPDATE}"
    )
    acc = [float(v.rstrip("%")) for v in next(iter(got.values()))]
    assert acc[2] >= acc[1] + 20 and acc[1] >= acc[0] + 30, (
        f"the demo no longer shows what it is for (SFT well above base, GRPO >= SFT + 20 points): {acc}"
    )
