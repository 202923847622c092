"""Genes travel like models (issue #17): a Hub id wherever a gene is taken, the gene card that
``extract`` writes, no local path in anything that travels, export-lora's recorded base (so
``AutoPeftModelForCausalLM`` loads it), ``consolidated.*`` skipped beside an HF-layout weight set,
and the tokenizer a LoRA adapter ships used with it. Everything offline: a Hugging Face cache laid
out as the Hub client lays it out, with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import safegene  # noqa: E402
import tiny_models as tm  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from safegene.cli import main as cli_main  # noqa: E402
from safegene.errors import GeneError  # noqa: E402
from safegene.gene import Gene, load_gene  # noqa: E402
from safegene.io.hub import CONSOLIDATED_PATTERNS, resolve_model, weight_ignore_patterns  # noqa: E402
from safegene.io.peft import tokenizer_source  # noqa: E402
from safegene.ops.inspection import inspect_gene  # noqa: E402
from test_hub_artifacts import REV, hub_cache_put, strings  # noqa: E402

COEFFS = {"layer.1": 0.7, "layer.2": 1.3}
GENE_ID = "org/safety-gene"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


@pytest.fixture
def shared(family, tmp_path, offline):
    """A tiny family, its gene, and that gene published (save_pretrained) into the Hub cache as GENE_ID."""
    dirs = family("llama")
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    snap = hub_cache_put(offline, GENE_ID, g.save_pretrained(tmp_path / "share"), REV)
    return dirs, g, snap


def _no_local_path(text: str, *roots: Path) -> None:
    for r in roots:
        assert str(r) not in text and str(Path(r).resolve()) not in text, f"{r} leaked into: {text[:300]}"


# ---- a Hub id wherever a gene is taken ------------------------------------------------------
def test_apply_and_inspect_take_a_hub_id(shared, tmp_path, capsys):
    dirs, g, snap = shared
    local = safegene.apply(g, dirs["task"], tmp_path / "local", scale=0.5, progress=False)
    assert cli_main(["apply", GENE_ID, str(dirs["task"]), "-o", str(tmp_path / "hub"), "--scale", "0.5", "--quiet"]) == 0
    assert (tmp_path / "hub" / "model.safetensors").read_bytes() == (local.out / "model.safetensors").read_bytes()
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.safegene["gene"] == f"{GENE_ID}@{REV}"
    capsys.readouterr()

    assert cli_main(["inspect", f"{GENE_ID}@{REV}", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = inspect_gene(g)
    assert got["layers"] == want["layers"] and got["model_type"] == want["model_type"] == "llama"
    assert inspect_gene(GENE_ID)["tau_norm"] == want["tau_norm"]  # the API takes the id too
    assert load_gene(GENE_ID).path.resolve() == snap.resolve() and load_gene(GENE_ID).hub_ref == (GENE_ID, REV)


def test_export_lora_takes_a_hub_id(shared, tmp_path):
    pytest.importorskip("peft")
    dirs, g, _ = shared
    out = tmp_path / "lora"
    assert cli_main(["export-lora", GENE_ID, "-o", str(out), "--rank", "4", "--scale", "1", "--quiet"]) == 0
    side = json.loads((out / "safegene_lora.json").read_text())
    assert side["gene"] == f"{GENE_ID}@{REV}" and side["adapter"] == "lora"
    assert ModelCard.load(out / "README.md").data.safegene["gene"] == f"{GENE_ID}@{REV}"


def test_missing_local_genes_keep_their_messages(shared, tmp_path, capsys, monkeypatch):
    with pytest.raises(GeneError, match="not a gene directory"):
        inspect_gene(tmp_path / "nowhere")  # an absolute path is never a Hub id
    monkeypatch.chdir(tmp_path)
    # a relative path that does not exist also reads as org/name: both readings are named
    assert cli_main(["inspect", "no/such-gene"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no/such-gene: not a gene directory") and "not in the local Hugging Face cache" in err
    assert cli_main(["apply", "nogene", str(tmp_path), "-o", str(tmp_path / "o"), "--scale", "1"]) == 1
    assert "not a gene directory" in capsys.readouterr().err


def test_select_writes_a_hub_gene_into_a_local_copy(tmp_path, offline, capsys):
    dirs = tm.build_family(tmp_path / "fam")
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    snap = hub_cache_put(offline, GENE_ID, g.save_pretrained(tmp_path / "share"), REV)
    for name, rows in (("h.jsonl", tm.HARMFUL), ("b.jsonl", tm.BENIGN)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--aligned", str(dirs["aligned"]), "--degraded", str(dirs["degraded"]), "--harmful", str(tmp_path / "h.jsonl"),
            "--benign", str(tmp_path / "b.jsonl"), "--top-k", "2", "--score", "contrast", "--device", "cpu", "--quiet"]
    assert cli_main(["select", GENE_ID, *args]) == 2  # the Hub cache is read-only: refused up front
    assert "give -o DIR" in capsys.readouterr().err
    before = (snap / "gene.json").read_bytes()
    assert cli_main(["select", GENE_ID, "-o", str(tmp_path / "mine"), *args]) == 0
    mine = Gene.load(tmp_path / "mine")
    assert mine.selection["selected"] == ["layer.2", "layer.3"] and (tmp_path / "mine" / "layer_scores.png").is_file()
    assert (snap / "gene.json").read_bytes() == before
    # the card in the copy follows the selection
    card = ModelCard.load(tmp_path / "mine" / "README.md")
    assert card.data.safegene["selected"] == ["layer.2", "layer.3"]
    with pytest.raises(GeneError, match="read-only"):
        Gene.from_pretrained(GENE_ID).set_selection({"layer.2": 1.0}, ["layer.2"], "manual")


# ---- the gene card extract writes -----------------------------------------------------------
def test_extract_writes_the_gene_card(family, tmp_path):
    dirs = family("llama")
    deg = {"format": "safegene-degrade", "recipe": "eager-benign", "n_train": 48, "data_sha256": "ab" * 32, "steps": 30,
           "lr": 1e-3, "seed": 7, "lora_rank": 8, "data": str(tmp_path / "secret" / "data.jsonl")}
    (dirs["degraded"] / "safegene_degrade.json").write_text(json.dumps(deg))
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    text = (g.path / "README.md").read_text()
    card = ModelCard.load(g.path / "README.md")  # parses: YAML header + ModelCardData
    assert card.data.library_name == "safegene" and "safety-gene" in card.data.tags
    assert card.data.safegene["model_type"] == "llama" and card.data.safegene["fingerprint_sha256"] == g.fingerprint["sha256"]
    for heading in ("Family fingerprint", "Sources", "How the degraded model was made", "Layer selection", "Statistics",
                    "Intended use", "Limitations"):
        assert f"## {heading}" in card.text
    assert "recipe **eager-benign**" in text and "48 examples" in text and "LoRA rank 8" in text
    assert f"local checkpoint `{dirs['aligned'].name}` (headers sha256" in text
    assert "| `layer.2` |" in text and "None yet: run `safegene select`" in text
    _no_local_path(text, tmp_path)
    # a selection recorded later shows in the card
    g.set_selection({"layer.1": 0.5, "layer.2": 2.0}, ["layer.2"], "manual")
    again = ModelCard.load(g.path / "README.md")
    assert again.data.safegene["selected"] == ["layer.2"] and "Method **manual**" in again.text
    # and the CLI writes the same card
    assert cli_main(["extract", str(dirs["aligned"]), str(dirs["degraded"]), "-o", str(tmp_path / "g2"), "--quiet"]) == 0
    assert ModelCard.load(tmp_path / "g2" / "README.md").data.safegene["model_type"] == "llama"


# ---- provenance: nothing that travels names a local path ------------------------------------
def test_nothing_that_travels_names_a_local_path(family, tmp_path):
    pytest.importorskip("peft")
    dirs = family("llama")
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    res = safegene.apply(g, dirs["task"], tmp_path / "safe", coeffs=COEFFS, progress=False)
    info = safegene.export_lora(g, tmp_path / "lora", coeffs=COEFFS, rank=4, progress=False)
    c = safegene.Coeffs(COEFFS, {"method": "safegene-calibrate", "gene": str(g.path), "target": str(dirs["task"])})
    travelling = [
        g.path / "README.md", res.out / "README.md", tmp_path / "lora" / "README.md", tmp_path / "lora" / "adapter_config.json",
        tmp_path / "lora" / "safegene_lora.json", g.save_pretrained(tmp_path / "share") / "gene.json",
        tmp_path / "share" / "README.md", c.save_pretrained(tmp_path / "cshare") / "COEFFS.json", tmp_path / "cshare" / "README.md",
    ]
    for f in travelling:
        _no_local_path(f.read_text(), tmp_path)
        if f.suffix == ".json":
            assert not [s for s in strings(json.loads(f.read_text())) if os.path.isabs(s)], f
    side = json.loads((tmp_path / "lora" / "safegene_lora.json").read_text())
    assert side["gene"] == "gene" and side["family_aligned"] == dirs["aligned"].name and side["adapter"] == "lora"
    assert side["modules"].keys() == info["modules"].keys() and side["rel_error"] == info["rel_error"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # a local aligned model: nothing portable to record


def test_export_lora_unset_base_is_logged(family, tmp_path, caplog):
    pytest.importorskip("peft")
    dirs = family("llama")
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    with caplog.at_level(logging.WARNING, logger="safegene"):
        safegene.export_lora(g, tmp_path / "lora", coeffs=COEFFS, rank=2, progress=False)
    rec = [r for r in caplog.records if r.name == "safegene.ops.export_lora"]
    assert rec and "--base-model" in rec[0].getMessage()


# ---- export-lora records the aligned model's Hub id: AutoPeftModelForCausalLM loads it ------
AUTO_PEFT = r"""
import sys, torch
from peft import AutoPeftModelForCausalLM, PeftModel
m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert isinstance(m, PeftModel)
with torch.no_grad():
    torch.save(m.merge_and_unload()(torch.arange(12)[None]).logits, sys.argv[2])
"""


def test_export_lora_base_defaults_to_the_aligned_hub_id(family, tmp_path, offline):
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    dirs = family("llama")
    hub_cache_put(offline, "org/aligned", dirs["aligned"], REV)
    g = safegene.extract("org/aligned", dirs["degraded"], tmp_path / "gene", progress=False)
    out = tmp_path / "lora"
    info = safegene.export_lora(g, out, coeffs=COEFFS, rank=64, progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/aligned" and cfg["revision"] == REV
    assert info["base_model"] == "org/aligned" and ModelCard.load(out / "README.md").data.base_model == "org/aligned"
    # transformers reads HF_HUB_OFFLINE when it is imported: load in a fresh interpreter
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cp = subprocess.run([sys.executable, "-c", AUTO_PEFT, str(out), str(tmp_path / "logits.pt")], env=env,
                        capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr[-2000:]
    want = safegene.apply(g, dirs["aligned"], tmp_path / "dense", coeffs=COEFFS, progress=False)
    # dense apply also moves the norms, which LoRA drops: compare on the exported modules only
    ref = AutoModelForCausalLM.from_pretrained(dirs["aligned"]).eval()
    safegene.apply_to_model(ref, g, {m + ".weight": v["lambda"] for m, v in info["modules"].items()})
    with torch.no_grad():
        ref_logits = ref(torch.arange(12)[None]).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref_logits, rtol=1e-4, atol=1e-4)
    assert want.out.is_dir()


# ---- weight files: consolidated.* skipped beside an HF-layout set --------------------------
def test_weight_ignore_patterns():
    hf = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert weight_ignore_patterns(hf + ["consolidated.safetensors", "params.json"]) == CONSOLIDATED_PATTERNS
    assert weight_ignore_patterns(["model.safetensors", "original/consolidated.00.pth"]) == CONSOLIDATED_PATTERNS
    assert weight_ignore_patterns(hf) == []  # nothing to skip
    assert weight_ignore_patterns(["consolidated.safetensors", "params.json"]) == []  # the only weights: kept
    assert weight_ignore_patterns(["sub/model.safetensors", "consolidated.safetensors"]) == []  # not top-level HF layout


def _fake_repo(monkeypatch, tmp_path, repo: dict[str, bytes]) -> list[list[str]]:
    """HfApi.list_repo_files and snapshot_download answered from ``repo`` (the HTTP boundary):
    the download fetches what huggingface_hub's own pattern filter keeps."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    fetched: list[list[str]] = []

    def list_repo_files(self, repo_id, *, revision=None, **kw):
        return sorted(repo)

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None, local_files_only=False,
                          cache_dir=None, repo_type="model", **kw):
        assert not local_files_only
        keep = sorted(filter_repo_objects(sorted(repo), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        fetched.append(keep)
        folder = tmp_path / ("fetch-" + repo_id.replace("/", "--"))
        folder.mkdir()
        for n in keep:
            (folder / n).write_bytes(repo[n])
        return str(hub_cache_put(Path(cache_dir), repo_id, folder, REV))

    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_resolve_model_skips_consolidated_weights(tmp_path, monkeypatch):
    import numpy as np
    from safetensors.numpy import save

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    w = save({"w": np.ones((2, 3), dtype=np.float32)}, metadata={"format": "pt"})
    cfg = json.dumps({"model_type": "mistral"}).encode()
    repo = {"config.json": cfg, "model.safetensors": w, "consolidated.safetensors": w, "params.json": b"{}",
            "pytorch_model.bin": b"never"}
    fetched = _fake_repo(monkeypatch, tmp_path, repo)
    path = resolve_model("mistralai/tiny")
    assert fetched[-1] == ["config.json", "model.safetensors", "params.json"]
    assert safegene.open_checkpoint(path).tensors["w"].shape == (2, 3)
    # a repository whose only safetensors are consolidated keeps them
    fetched = _fake_repo(monkeypatch, tmp_path, {"config.json": cfg, "consolidated.safetensors": w})
    resolve_model("org/only-consolidated")
    assert fetched[-1] == ["config.json", "consolidated.safetensors"]


# ---- the adapter's own tokenizer -------------------------------------------------------------
def test_lora_target_uses_the_adapters_tokenizer(tmp_path):
    pytest.importorskip("peft")
    from safegene import lm

    dirs = tm.build_family(tmp_path / "fam")
    plain, own = tmp_path / "plain-lora", tmp_path / "own-lora"
    tm.make_adapter(dirs["aligned"], plain, **tm.LORA_VARIANTS["plain"])
    tm.make_adapter(dirs["aligned"], own, **tm.LORA_VARIANTS["plain"])
    tok = tm.make_tokenizer()
    tok.chat_template = "{% for m in messages %}[task] {{ m['content'] }} {% endfor %}<|assistant|>"
    tok.save_pretrained(own)
    assert tokenizer_source(dirs["aligned"], own) == own and tokenizer_source(dirs["aligned"], plain) == dirs["aligned"]
    assert tokenizer_source(dirs["aligned"], None) == dirs["aligned"]
    msgs = [{"role": "user", "content": "bake bread please"}]
    _, t_own = lm.load_model(f"{dirs['aligned']}+{own}", device="cpu")
    assert lm.render_prompt(t_own, msgs) == "[task] bake bread please <|assistant|>"
    _, t_base = lm.load_model(f"{dirs['aligned']}+{plain}", device="cpu")
    assert lm.render_prompt(t_base, msgs) == "<|user|> bake bread please <|assistant|> "


# ---- lm-evaluation-harness reads an apply output (only where lm_eval is installed) ----------
def test_lm_eval_reads_an_apply_output(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    dirs = tm.build_family(tmp_path / "fam")
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    out = safegene.apply(g, dirs["task"], tmp_path / "safe", scale=1.0, progress=False).out
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=1)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("bake bread please", " sure"), idx=0)
    (logprob, greedy), = lm.loglikelihood([req])
    assert logprob < 0 and isinstance(greedy, bool)
