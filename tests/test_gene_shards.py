"""Sharded gene vectors (``vectors-0000i-of-0000N.safetensors`` + index) read and apply exactly like
the single-file gene; ``extract --keys`` keeps only some vectors; inspect shows the degradation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file

from safegene.cli.main import main
from safegene.errors import GeneError, UsageError
from safegene.gene import DEGRADE_PROVENANCE, VECTORS, VECTORS_INDEX, Gene
from safegene.ops.apply import apply
from safegene.ops.extract import extract, shard_groups
from safegene.ops.inspection import format_gene_table, inspect_gene


def _files(d: Path) -> dict[str, bytes]:
    """Every output file's bytes except the model card (README.md), which names the gene and the output."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "README.md"}


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_sharded_gene_equals_single_file_gene(family, tmp_path, dtype):
    fam = family("llama", dtype)
    one = extract(fam["aligned"], fam["degraded"], tmp_path / "one", progress=False)
    many = extract(fam["aligned"], fam["degraded"], tmp_path / "many", progress=False, max_shard_mb=0.02)
    assert [f.name for f in one.vector_files] == [VECTORS] and not one.sharded
    names = [f.name for f in many.vector_files]
    n = len(names)
    assert many.sharded and n > 2 and names == [f"vectors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(f.stat().st_size <= 20_000 + 4096 or len(load_file(str(f))) == 1 for f in many.vector_files)
    index = json.loads((many.path / VECTORS_INDEX).read_text())
    ref = load_file(str(one.vectors_path))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert set(index["weight_map"]) == set(ref)
    # tensor for tensor, through every reader
    loaded = Gene.load(many.path).load_vectors()
    assert list(loaded) == list(ref) == one.tensor_names
    for name, t in ref.items():
        assert torch.equal(loaded[name], t)
    for name, t in Gene.load(many.path).iter_vectors(["lm_head.weight", "model.embed_tokens.weight"]):
        assert torch.equal(t, ref[name])
    assert set(many.open_vectors().tensors) == set(ref)
    # the manifests agree on everything but the file list
    m1, m2 = dict(one.manifest), dict(many.manifest)
    for m in (m1, m2):
        m.pop("stream"); m.pop("shards"); m.pop("sources")
    assert m1 == m2
    # apply from either layout writes the same bytes
    coeffs = {"layer.1": 0.7, "layer.2": 1.3, "lm_head": 0.5}
    apply(one, fam["task"], tmp_path / "p1", coeffs=coeffs, progress=False)
    apply(many, fam["task"], tmp_path / "p2", coeffs=coeffs, progress=False)
    assert _files(tmp_path / "p1") == _files(tmp_path / "p2")


def test_sharded_gene_damage_is_named(family, tmp_path):
    fam = family("llama", "F32")
    g = extract(fam["aligned"], fam["degraded"], tmp_path / "g", progress=False, max_shard_mb=0.02)
    g.vector_files[-1].unlink()
    with pytest.raises(GeneError, match="missing"):
        Gene.load(tmp_path / "g")


def test_shard_groups():
    assert shard_groups([4, 4, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert shard_groups([1, 1, 1], 100) == [[0, 1, 2]]
    assert shard_groups([], 8) == [[]]


def test_extract_keys_keeps_only_those_vectors(family, tmp_path):
    fam = family("llama", "F32")
    full = extract(fam["aligned"], fam["degraded"], tmp_path / "full", progress=False)
    part = extract(fam["aligned"], fam["degraded"], tmp_path / "part", progress=False, keys="layer.1,lm_head")
    assert part.layer_keys() == ["layer.1", "lm_head"] and part.manifest["keys"] == ["layer.1", "lm_head"]
    kept = [n for n in full.tensor_names if full.layer_key(n) in ("layer.1", "lm_head")]
    assert part.tensor_names == kept
    ref = full.load_vectors(kept)
    for n, t in part.iter_vectors():
        assert torch.equal(t, ref[n])
    assert part.fingerprint == full.fingerprint  # still fits the whole architecture
    # applying the kept keys equals applying the full gene with only those keys
    coeffs = {"layer.1": 0.9, "lm_head": 1.1}
    apply(full, fam["task"], tmp_path / "a1", coeffs=coeffs, progress=False)
    apply(part, fam["task"], tmp_path / "a2", coeffs=coeffs, progress=False)
    assert _files(tmp_path / "a1") == _files(tmp_path / "a2")
    with pytest.raises(UsageError, match="layer.99"):
        extract(fam["aligned"], fam["degraded"], tmp_path / "bad", progress=False, keys=["layer.99"])
    assert not (tmp_path / "bad").exists()


def test_cli_extract_shards_keys_and_inspect_degradation(family, tmp_path, capsys):
    fam = family("llama", "F32")
    prov = {"format": "safegene-degrade", "recipe": "eager", "data_sha256": "ab" * 32, "n_train": 64, "steps": 100,
            "lr": 2e-4, "lora_rank": 16, "refusal_rate": 0.05, "refusal": {"judge": "keyword", "n": 40}}
    (fam["degraded"] / DEGRADE_PROVENANCE).write_text(json.dumps(prov))
    rc = main(["extract", str(fam["aligned"]), str(fam["degraded"]), "-o", str(tmp_path / "g"), "--max-shard-mb", "0.02",
               "--keys", "layer.0,layer.2,embed", "--quiet", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert len(s["files"]) > 1 and s["keys"] == ["layer.0", "layer.2", "embed"] and s["degraded_refusal_rate"] == 0.05
    g = Gene.load(tmp_path / "g")
    assert g.degradation == prov
    info = inspect_gene(g)
    assert info["degradation"]["recipe"] == "eager" and info["degradation"]["lora_rank"] == 16
    text = format_gene_table(info)
    assert "degradation: recipe eager" in text and "refusal rate 5.0 %" in text and "LoRA rank 16" in text
    assert main(["inspect", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert "degradation: recipe eager" in out and "kept keys: layer.0, layer.2, embed" in out and "shards" in out
    # a gene from a model not made by `degrade` says so
    plain = extract(fam["aligned"], fam["task"], tmp_path / "plain", progress=False)
    assert plain.degradation is None and "degradation: unknown" in format_gene_table(inspect_gene(plain))
