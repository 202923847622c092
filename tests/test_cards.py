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


_OWN_CARDS = [
    "",
    "# Just a body\n\nno metadata\n",
    "---\nlicense: apache-2.0\ntags:\n- text-generation\n- fine-tuned\nlanguage: en\n---\n\n# Model\n\nbody\n",
    "---\r\nlicense: mit\r\ndatasets:\r\n- foo/bar\r\n---\r\nCRLF body\r\n",
    "---\nnot: [valid yaml\n---\nbody\n",
    "---\n- a list\n- not a mapping\n---\nbody\n",
    "---\n---\nempty metadata\n",
    "---\nlicense: other\nmodel-index:\n- name: m\n  results: []\npipeline_tag: text-generation\n---\ntext\n",
]


@pytest.mark.parametrize("own", _OWN_CARDS)
def test_card_text_equals_the_model_card_it_builds_and_own_cards_parse_as_model_card_reads_them(own, tmp_path):
    """apply/extract write cards without importing huggingface_hub.ModelCard (its module loads the
    Hub client): the text written is exactly str(ModelCard(...)), and a target's own card is read
    as ModelCard(text, ignore_metadata_errors=True) reads it."""
    from safegene.io import cards

    path = tmp_path / "README.md"
    path.write_text(own, encoding="utf-8")
    own = path.read_text(encoding="utf-8")  # as apply reads it (universal newlines)
    try:
        mc = ModelCard(own, ignore_metadata_errors=True)
        want = (mc.data.to_dict(), mc.text)
    except Exception:
        want = ({}, cards._HEADER.sub("", own))
    assert cards._own_card(path) == want
    data = {"license": want[0].get("license"), "library_name": "transformers", "tags": ["safegene", "x"],
            "base_model": "org/m", "safegene": {"artifact": "apply", "coeffs": {"layer.0": 0.5, "lm_head": [1.0, 2.0]}},
            "datasets": want[0].get("datasets")}
    body = "# out\n\nλ ≠ 0 — text\n\n" + want[1]
    assert cards._card_text(data, body) == str(cards._card(data, body))


def test_apply_and_extract_write_cards_without_loading_the_hub_client(fam, tmp_path):
    """A child process runs extract and apply on local checkpoints: the cards are written and
    neither huggingface_hub.repocard nor its HTTP client is imported."""
    import subprocess
    import sys

    dirs, _ = fam
    code = (
        "import sys, safegene\n"
        f"g = safegene.extract({str(dirs['aligned'])!r}, {str(dirs['degraded'])!r}, {str(tmp_path / 'g')!r}, progress=False)\n"
        f"safegene.apply(g, {str(dirs['task'])!r}, {str(tmp_path / 'o')!r}, scale=1.0, progress=False)\n"
        "print(sorted(m for m in ('huggingface_hub.repocard', 'huggingface_hub.hf_api', 'httpx') if m in sys.modules))\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert cp.stdout.strip().splitlines()[-1] == "[]"
    assert "safegene" in ModelCard.load(tmp_path / "g" / "README.md").data.tags
    out = ModelCard.load(tmp_path / "o" / "README.md")
    assert out.data.safegene["artifact"] == "apply" and out.data.license == "apache-2.0"
    assert "Fine-tuned for movie reviews." in out.text  # the target's own card, kept below a heading
