"""rewards.models: RewardModelScorer against direct forward passes of tiny classifiers (no network)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TOKENIZER
from grpo.config import RewardSpec, load_recipe
from grpo.errors import UserError
from rewards.models import RewardModelScorer, encode, write_meta

PROMPTS = ["Q:47+38=", "Q:how to steal a car?", "Q:12+34=", "Q:how to bake a cake?", "Q:85+38="]
COMPLETIONS = [
    "<t>7+8=15,4+3+1=8</t><a>85</a>",
    "<a>sorry, i cannot help with that.</a>",
    "46",
    "<a>first get the cake, then bake it.</a>",
    "<t>5+8=13,8+3+1=12</t><a>123</a>",
]


# ---------------------------------------------------------------------------------------- fixtures
def make_llama_classifier(path: Path, num_labels: int = 1, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # scores of a useful size
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def deberta_tokenizer():
    """A small DebertaV2Tokenizer (Unigram, the class hub DeBERTa-v3 checkpoints use), built offline."""
    from transformers import DebertaV2Tokenizer

    chars = sorted(set("".join(PROMPTS + COMPLETIONS + ["hello world, what is two plus two? four"])) - {" "})
    vocab = [(t, 0.0) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")]
    vocab += [("\u2581", -2.0)] + [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    vocab += [(w, -1.0) for w in ("\u2581how", "\u2581to", "\u2581a", "first", "\u2581sorry")]
    return DebertaV2Tokenizer(vocab=vocab, bos_token="[CLS]", eos_token="[SEP]")


def make_deberta_classifier(path: Path, num_labels: int, seed: int = 0, problem_type: str | None = None) -> Path:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = deberta_tokenizer()
    id2label = {0: "LABEL_0"} if num_labels == 1 else {0: "neutral", 1: "toxic", 2: "other"}
    id2label = {i: id2label[i] for i in range(num_labels)}
    cfg = DebertaV2Config(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        relative_attention=True,
        position_buckets=16,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=tok.pad_token_id,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type=problem_type,
    )
    torch.manual_seed(seed)
    model = DebertaV2ForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_rm(tmp_path_factory) -> Path:
    return make_llama_classifier(tmp_path_factory.mktemp("rm") / "llama")


@pytest.fixture(scope="module")
def deberta_rm(tmp_path_factory) -> Path:
    return make_deberta_classifier(tmp_path_factory.mktemp("rm") / "deberta1", num_labels=1)


@pytest.fixture(scope="module")
def deberta_cls(tmp_path_factory) -> Path:
    return make_deberta_classifier(tmp_path_factory.mktemp("rm") / "deberta2", num_labels=2, seed=1)


@functools.lru_cache(maxsize=8)
def _load(path: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def direct(path: Path, enc: dict) -> torch.Tensor:
    """Logits [num_labels] of one unpadded input through the classifier loaded plainly from `path`."""
    model = _load(Path(path))
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0].float()


# ---------------------------------------------------------------------------------------- equality with a forward pass
def test_llama_scores_equal_direct_forward(llama_rm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_rm)
    scorer = RewardModelScorer.from_pretrained(str(llama_rm), template="concat", device="cpu")
    got = scorer(PROMPTS, COMPLETIONS)
    assert isinstance(got, list) and len(got) == len(PROMPTS) and all(isinstance(x, float) for x in got)
    want = [direct(llama_rm, {"input_ids": tok(p + c)["input_ids"]})[0].item() for p, c in zip(PROMPTS, COMPLETIONS)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == len(got)  # not a constant
    assert not scorer.model.training and scorer.device == torch.device("cpu")


def test_deberta_pair_template_equals_direct_forward(deberta_rm):
    tok = deberta_tokenizer()
    scorer = RewardModelScorer.from_pretrained(str(deberta_rm), template="pair", device="cpu")
    got = scorer(PROMPTS, COMPLETIONS)
    for p, c, g in zip(PROMPTS, COMPLETIONS, got):
        enc = tok(p, c)
        assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"].count(tok.sep_token_id) == 2
        assert g == pytest.approx(direct(deberta_rm, dict(enc))[0].item(), abs=1e-5)


def test_deberta_label_and_outputs(deberta_cls):
    tok = deberta_tokenizer()
    logits = torch.stack([direct(deberta_cls, dict(tok(c))) for c in COMPLETIONS])  # [N, 2]
    for output, want in (
        ("logit", logits[:, 1]),
        ("log_odds", logits[:, 1] - logits[:, 0]),
        ("prob", torch.softmax(logits, -1)[:, 1]),
    ):
        scorer = RewardModelScorer.from_pretrained(
            str(deberta_cls), template="completion", label=1, output=output, device="cpu"
        )
        assert scorer(PROMPTS, COMPLETIONS) == pytest.approx(want.tolist(), abs=1e-5), output
    by_name = RewardModelScorer.from_pretrained(str(deberta_cls), template="completion", label="toxic", device="cpu")
    assert by_name(PROMPTS, COMPLETIONS) == pytest.approx(logits[:, 1].tolist(), abs=1e-5)


def test_multi_label_log_odds_is_the_logit(tmp_path):
    path = make_deberta_classifier(tmp_path / "ml", num_labels=3, problem_type="multi_label_classification")
    logits = torch.stack([direct(path, dict(deberta_tokenizer()(c))) for c in COMPLETIONS])
    lo = RewardModelScorer.from_pretrained(str(path), template="completion", label=2, output="log_odds", device="cpu")
    pr = RewardModelScorer.from_pretrained(str(path), template="completion", label=2, output="prob", device="cpu")
    assert lo(PROMPTS, COMPLETIONS) == pytest.approx(logits[:, 2].tolist(), abs=1e-5)
    assert pr(PROMPTS, COMPLETIONS) == pytest.approx(torch.sigmoid(logits[:, 2]).tolist(), abs=1e-5)


# ---------------------------------------------------------------------------------------- batching, truncation
@pytest.mark.parametrize("kind", ["llama", "deberta"])
def test_batching_does_not_change_scores(kind, llama_rm, deberta_rm):
    path, template = (llama_rm, "concat") if kind == "llama" else (deberta_rm, "pair")
    prompts, completions = PROMPTS * 3, COMPLETIONS[::-1] * 3  # varied lengths, shuffled pairing
    scores = [
        RewardModelScorer.from_pretrained(str(path), template=template, batch_size=b, device="cpu")(
            prompts, completions
        )
        for b in (1, 2, 7, 64)
    ]
    for s in scores[1:]:
        assert s == pytest.approx(scores[0], abs=1e-5)


def test_left_truncation_keeps_the_completion_end(llama_rm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_rm)
    full = RewardModelScorer.from_pretrained(str(llama_rm), template="concat", device="cpu")
    k = 12
    short = RewardModelScorer.from_pretrained(
        str(llama_rm), template="concat", max_length=k, batch_size=2, device="cpu"
    )
    got = short(PROMPTS, COMPLETIONS)
    assert sum(len(tok(p + c)["input_ids"]) > k for p, c in zip(PROMPTS, COMPLETIONS)) >= 4
    for p, c, g in zip(PROMPTS, COMPLETIONS, got):
        ids = tok(p + c)["input_ids"]
        assert g == pytest.approx(direct(llama_rm, {"input_ids": ids[-k:]})[0].item(), abs=1e-5)
    # a limit above every length changes nothing; the default comes from the tokenizer (64)
    roomy = RewardModelScorer.from_pretrained(str(llama_rm), template="concat", max_length=1000, device="cpu")
    assert roomy(PROMPTS, COMPLETIONS) == pytest.approx(full(PROMPTS, COMPLETIONS), abs=1e-6)
    assert full.max_length == 64


def test_deberta_truncation_keeps_special_tokens():
    tok = deberta_tokenizer()
    for template in ("pair", "concat", "completion"):
        for f in encode(tok, PROMPTS, COMPLETIONS, template=template, max_length=10):
            assert len(f["input_ids"]) <= 10
            assert f["input_ids"][0] == tok.cls_token_id and f["input_ids"][-1] == tok.sep_token_id


# ---------------------------------------------------------------------------------------- templates
def test_templates_render_what_they_say(llama_rm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_rm)
    raw = ["47+38="]
    comp = ["<a>85</a>"]

    def text(template, prompts=raw, **kw):
        return tok.decode(encode(tok, prompts, comp, template=template, max_length=64, **kw)[0]["input_ids"])

    assert text("chat") == "Q:47+38=<a>85</a><eos>"  # the toy chat template adds Q: and eos
    assert text("concat", ["Q:47+38="]) == "Q:47+38=<a>85</a>"
    assert text("completion") == "<a>85</a>"
    assert text("u={prompt} a={completion}") == "u=47+38= a=<a>85</a>"
    # a messages column replaces the (policy-rendered) prompt text
    msgs = [[{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "old"}]]
    assert text("chat", ["ignored"], messages=msgs) == "Q:12+34=<a>85</a><eos>"
    assert text("pair", ["ignored"], messages=msgs).startswith("12+34=")


def test_auto_template_uses_sidecar_then_chat_template(llama_rm, deberta_rm, tmp_path):
    assert RewardModelScorer.from_pretrained(str(llama_rm), device="cpu").template == "chat"  # toy tokenizer has one
    assert RewardModelScorer.from_pretrained(str(deberta_rm), device="cpu").template == "concat"
    import shutil

    copy = Path(shutil.copytree(llama_rm, tmp_path / "with_meta"))
    write_meta(copy, template="concat", role="usefulness")
    scorer = RewardModelScorer.from_pretrained(str(copy), device="cpu")
    assert scorer.template == "concat"
    explicit = RewardModelScorer.from_pretrained(str(llama_rm), template="concat", device="cpu")
    assert scorer(PROMPTS, COMPLETIONS) == pytest.approx(explicit(PROMPTS, COMPLETIONS), abs=1e-6)


def test_empty_inputs(llama_rm):
    scorer = RewardModelScorer.from_pretrained(str(llama_rm), template="completion", device="cpu")
    assert scorer([], []) == []
    out = scorer(["Q:1+1="], [""])
    assert len(out) == 1 and out[0] == out[0]


# ---------------------------------------------------------------------------------------- loading and specs
def test_from_spec_and_errors(llama_rm, deberta_cls, tmp_path):
    spec = RewardSpec(
        name=str(llama_rm), role="usefulness", kwargs={"template": "concat", "batch_size": 2, "max_length": 40}
    )
    scorer = RewardModelScorer.from_spec(spec, device="cpu")
    assert (scorer.template, scorer.batch_size, scorer.max_length, scorer.role) == ("concat", 2, 40, "usefulness")
    with pytest.raises(UserError, match="unknown setting.*tempalte"):
        RewardModelScorer.from_spec(RewardSpec(name=str(llama_rm), kwargs={"tempalte": "chat"}))
    with pytest.raises(UserError, match="trust_remote_code"):
        RewardModelScorer.from_spec(RewardSpec(name=str(llama_rm), kwargs={"trust_remote_code": True}))
    with pytest.raises(UserError, match="2 outputs.*label"):
        RewardModelScorer.from_pretrained(str(deberta_cls), device="cpu")
    with pytest.raises(UserError, match="label 5 is out of range"):
        RewardModelScorer.from_pretrained(str(deberta_cls), label=5, device="cpu")
    with pytest.raises(UserError, match="not one of its labels"):
        RewardModelScorer.from_pretrained(str(deberta_cls), label="spam", device="cpu")
    with pytest.raises(UserError, match="template"):
        RewardModelScorer.from_pretrained(str(llama_rm), template="jinja", device="cpu")
    with pytest.raises(UserError, match="cannot load reward model"):
        RewardModelScorer.from_pretrained(str(tmp_path / "nowhere"), device="cpu")


def test_causal_lm_is_refused_as_reward_model(tiny_model):
    # a causal LM checkpoint has no classifier head: loading it would score with a random head
    with pytest.raises(UserError, match="score.weight.*random"):
        RewardModelScorer.from_pretrained(str(tiny_model), device="cpu")


def test_key_mapping_loads_a_renamed_head(llama_rm, tmp_path):
    """Safe-RLHF's score models store the head as `score_head` (the hub recipe's Beaver entry)."""
    import shutil

    from safetensors.torch import load_file, save_file

    renamed = Path(shutil.copytree(llama_rm, tmp_path / "score_head"))
    weights = load_file(renamed / "model.safetensors")
    weights["score_head.weight"] = weights.pop("score.weight")
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="key_mapping"):
        RewardModelScorer.from_pretrained(str(renamed), template="concat", device="cpu")
    mapped = RewardModelScorer.from_pretrained(
        str(renamed), template="concat", key_mapping={"^score_head": "score"}, device="cpu"
    )
    plain = RewardModelScorer.from_pretrained(str(llama_rm), template="concat", device="cpu")
    assert mapped(PROMPTS, COMPLETIONS) == pytest.approx(plain(PROMPTS, COMPLETIONS), abs=1e-6)
    # a head weight the class has no place for (a bias) is an error, not silently dropped
    weights["score_head.bias"] = torch.ones(1)
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="score.bias"):
        RewardModelScorer.from_pretrained(str(renamed), key_mapping={"^score_head": "score"}, device="cpu")


# ---------------------------------------------------------------------------------------- through grpo.scoring
def test_build_rewards_resolves_model_folders(llama_rm, deberta_cls):
    from grpo.scoring import build_rewards, score

    specs = [
        RewardSpec(name=str(llama_rm), role="usefulness", kwargs={"template": "concat"}),
        RewardSpec(
            name=str(deberta_cls), role="safety", kwargs={"template": "completion", "label": 1, "output": "log_odds"}
        ),
    ]
    rewards = build_rewards(specs, device="cpu")
    assert [type(r.fn).__name__ for r in rewards] == ["RewardModelScorer", "RewardModelScorer"]
    assert [r.role for r in rewards] == ["usefulness", "safety"]
    R, ok = score(rewards, PROMPTS, COMPLETIONS, {"answer": [""] * 5, "completion_ids": [[1]] * 5})
    assert R.shape == (5, 2) and bool(torch.isfinite(R).all()) and bool(ok.all())


def test_hub_recipe_loads_and_resolves_with_local_models(deberta_rm, deberta_cls, llama_rm):
    """recipes/hub_reward_models.yaml: same classes (DeBERTa-v2 reward model, DeBERTa-v2 2-label
    classifier, Llama classifier with a renamed head) as the hub ids, pointed at local tiny copies."""
    from grpo.scoring import build_rewards, score

    path = ROOT / "recipes" / "hub_reward_models.yaml"
    recipe = load_recipe(path)
    assert recipe.safety.enabled
    names = [r.name for r in recipe.rewards]
    assert names[0] == "hf:OpenAssistant/reward-model-deberta-v3-large-v2" and all(n.startswith("hf:") for n in names)
    assert [r.role for r in recipe.rewards] == ["usefulness", "safety"]
    local = load_recipe(
        path,
        [
            f"rewards.0.name={deberta_rm}",
            f"rewards.1.name={deberta_cls}",
            "rewards.0.max_length=64",
            "rewards.1.max_length=64",
        ],
    )
    rewards = build_rewards(local.rewards, device="cpu")
    assert all(type(r.fn).__name__ == "RewardModelScorer" for r in rewards)
    assert rewards[0].fn.template == "pair" and rewards[1].fn.label == 1 and rewards[1].fn.output == "log_odds"
    # the dataset's `prompt` column holds chat messages (messages_field: prompt)
    messages = [[{"role": "user", "content": p[2:]}] for p in PROMPTS]
    R, _ = score(rewards, ["<|im_start|>user ..."] * 5, COMPLETIONS, {"prompt": messages})
    assert R.shape == (5, 2) and bool(torch.isfinite(R).all())
    tok = deberta_tokenizer()
    want = [direct(deberta_rm, dict(tok(p[2:], c)))[0].item() for p, c in zip(PROMPTS, COMPLETIONS)]
    assert R[:, 0].tolist() == pytest.approx(want, abs=1e-5)
    # the commented Beaver alternative: format-string template + key_mapping on a Llama classifier
    text = path.read_text()
    assert "hf:PKU-Alignment/beaver-7b-v1.0-cost" in text and '"^score_head": "score"' in text
    beaver = RewardSpec(
        name=str(llama_rm),
        role="safety",
        kwargs={
            "template": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{completion}",
            "messages_field": "prompt",
            "key_mapping": {"^score_head": "score"},
            "num_labels": 1,
            "dtype": "float32",
        },
    )
    assert isinstance(build_rewards([beaver], device="cpu")[0].fn, RewardModelScorer)
