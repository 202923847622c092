"""Model cards: the gene's (save_pretrained), the apply output's and the exported LoRA's parse with
huggingface_hub's ModelCard and name the gene, λ and the base; the LoRA loads with
AutoPeftModelForCausalLM from its own config."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("huggingface_hub")

import safegene  # noqa: E402
from safegene.gene import Gene  # noqa: E402
from safegene.io.cards import apply_card, gene_card  # noqa: E402
from test_hub_artifacts import REV, hub_cache_put  # noqa: E402

from huggingface_hub import ModelCard  # noqa: E402

COEFFS = {"layer.1": 0.7, "layer.2": 1.3}
TASK_CARD = "---\nlicense: apache-2.0\ntags:\n- sentiment\n---\n\n# Task model\n\nFine-tuned for movie reviews.\n"


@pytest.fixture
def fam(family, tmp_path):
    dirs = family("llama")
    (dirs["task"] / "README.md").write_text(TASK_CARD)
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    return dirs, g


def test_apply_card_names_gene_lambda_and_keeps_the_target_card(fam, tmp_path):
    dirs, g = fam
    res = safegene.apply(g, dirs["task"], tmp_path / "safe", coeffs=COEFFS, progress=False)
    card = ModelCard.load(res.out / "README.md")
    assert card.data.safegene["gene"] == "gene" and card.data.safegene["coeffs"] == COEFFS
    assert card.data.safegene["target"] == dirs["task"].name and card.data.safegene["fingerprint_sha256"] == g.fingerprint["sha256"]
    assert card.data.base_model is None  # a local target has no Hub id to name
    assert card.data.license == "apache-2.0" and {"safegene", "sentiment"} <= set(card.data.tags)
    assert "| `layer.1` | 0.7 |" in card.text and "| `layer.2` | 1.3 |" in card.text
    own = card.text.index("## Original model card")
    assert "Fine-tuned for movie reviews." in card.text[own:] and "license:" not in card.text
    assert str(tmp_path) not in (res.out / "README.md").read_text()


def test_apply_card_from_hub_ids(fam, tmp_path, monkeypatch):
    dirs, g = fam
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache_put(home / "hub", "org/task-model", dirs["task"], REV)
    hub_cache_put(home / "hub", "org/safety-gene", g.save_pretrained(tmp_path / "share"), REV)
    res = safegene.apply(Gene.from_pretrained("org/safety-gene"), "org/task-model", tmp_path / "safe", scale=0.5, progress=False)
    card = ModelCard.load(res.out / "README.md")
    assert card.data.base_model == "org/task-model"
    assert card.data.safegene["gene"] == f"org/safety-gene@{REV}"
    assert set(card.data.safegene["coeffs"].values()) == {0.5}
    assert "Fine-tuned for movie reviews." in card.text


def test_apply_card_eval_summary_and_mixed_lambdas(fam, tmp_path):
    dirs, g = fam
    name = next(n for n in g.tensor_names if g.layer_key(n) == "layer.0")
    res = safegene.apply(g, dirs["aligned"], tmp_path / "out", coeffs={name: 2.0, "layer.0": 1.0}, progress=False)
    (res.out / "README.md").unlink()  # the aligned model had no card of its own
    card = apply_card(g, dirs["aligned"], res, eval_summary={"asr": 0.05, "task_accuracy": 0.91})
    assert card.data.safegene["coeffs"]["layer.0"] == [1.0, 2.0]
    assert "| asr | 0.05 |" in card.text and "## Original model card" not in card.text


def test_gene_card_sections(fam):
    _, g = fam
    man = dict(g.manifest, degradation={"recipe": "eager", "n_train": 64, "data_sha256": "ab" * 32, "steps": 50, "lr": 1e-3,
                                        "seed": 0, "lora_rank": 8})
    man["selection"] = {"method": "contrast-ratio", "scores": {"layer.2": 3.5}, "selected": ["layer.2"]}
    card = gene_card(man, repo_id="org/g")
    text = str(card)
    for heading in ("Family fingerprint", "Sources", "How the degraded model was made", "Layer selection", "Statistics",
                    "Intended use", "Limitations"):
        assert f"## {heading}" in text
    assert "recipe **eager**" in text and "`layer.2`" in text and "safegene apply org/g" in text
    again = ModelCard(text)
    assert again.data.safegene["selected"] == ["layer.2"] and again.data.safegene["model_type"] == "llama"


def test_exported_lora_loads_with_auto_peft_and_has_a_card(fam, tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    dirs, g = fam
    out = tmp_path / "lora"
    info = safegene.export_lora(g, out, coeffs=COEFFS, rank=64, base_model_name_or_path=str(dirs["aligned"]), progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(dirs["aligned"]) and cfg["peft_type"] == "LORA"
    assert peft.LoraConfig.from_pretrained(str(out)).r == info["rank_max"]
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(model, peft.PeftModel)
    # the merged adapter is the dense apply of the same λ (full rank: exact up to float32)
    want = safegene.apply(g, dirs["aligned"], tmp_path / "dense", coeffs=COEFFS, progress=False)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(want.out).eval()
    ids = torch.arange(12)[None]
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local base is not a Hub id
    assert card.data.safegene["coeffs"] == COEFFS and card.data.safegene["gene"] == "gene"
    safegene.export_lora(g, tmp_path / "lora2", coeffs=COEFFS, rank=4, base_model_name_or_path="org/llama-base", progress=False)
    card2 = ModelCard.load(tmp_path / "lora2" / "README.md")
    assert card2.data.base_model == "org/llama-base" and "lora" in card2.data.tags
    assert json.loads((tmp_path / "lora2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/llama-base"
