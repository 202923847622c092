"""``safegene inspect``: per-layer gene summary, its plot, and the safety–utility plane."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import safegene  # noqa: E402
from safegene import cli  # noqa: E402
from safegene.errors import GeneError, UsageError  # noqa: E402
from safegene.eval.plots import plot_safety_utility
from safegene.ops.inspection import format_gene_table, inspect_gene  # noqa: E402

from conftest import perturbed, tiny_model  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gene(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    a = tiny_model("llama")
    a.save_pretrained(root / "a")
    perturbed(a, 1).save_pretrained(root / "d")
    return safegene.extract(root / "a", root / "d", root / "gene", progress=False)


def test_inspect_without_selection(gene, tmp_path):
    info = inspect_gene(gene, plot=tmp_path / "g.png")
    keys = [r["key"] for r in info["layers"]]
    assert keys == ["embed", "layer.0", "layer.1", "layer.2", "final_norm", "lm_head"]
    stats = gene.manifest["layer_stats"]
    for r in info["layers"]:
        assert r["tau_norm"] == stats[r["key"]]["tau_norm"] and r["rel_change"] == stats[r["key"]]["rel_change"]
        assert r["score"] is None and r["selected"] is False
    assert info["selected"] is None and info["num_layers"] == 3 and info["model_type"] == "llama"
    assert info["tau_norm"] == pytest.approx(sum(v["tau_norm"] ** 2 for v in stats.values()) ** 0.5)
    assert "none yet" in format_gene_table(info)
    data = (tmp_path / "g.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000


def test_inspect_with_selection_cli_and_json(gene, tmp_path, capsys):
    scores = {"layer.0": 0.1, "layer.1": 2.0, "layer.2": 1.5}
    gene.set_selection(scores, ["layer.1", "layer.2"], "refusal",
                       {"all_scores": {"refusal": scores, "contrast": {"layer.0": 0.3, "layer.1": 0.2, "layer.2": 0.9}}})
    try:
        assert cli.main(["inspect", str(gene.path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        sel = {r["key"]: (r["score"], r["selected"]) for r in info["layers"]}
        assert sel["layer.1"] == (2.0, True) and sel["layer.0"] == (0.1, False) and sel["embed"] == (None, False)
        assert info["selected"] == ["layer.1", "layer.2"] and info["selection"]["method"] == "refusal"
        png = tmp_path / "sel.png"
        assert cli.main(["inspect", str(gene.path), "--plot", str(png)]) == 0
        out = capsys.readouterr().out
        lines = [ln for ln in out.splitlines() if ln.startswith("layer.")]
        assert [ln.rstrip().endswith("*") for ln in lines] == [False, True, True]
        assert "refusal → layer.1, layer.2" in out and f"wrote {png}" in out
        assert png.read_bytes().startswith(PNG)
    finally:
        gene.manifest["selection"] = None
        from safegene.gene import write_json_atomic

        write_json_atomic(gene.path / "gene.json", gene.manifest)


def test_inspect_errors(gene, tmp_path, capsys):
    with pytest.raises(UsageError, match="must end in .png"):
        inspect_gene(gene, plot=tmp_path / "g.jpg")
    with pytest.raises(UsageError, match="does not exist"):
        inspect_gene(gene, plot=tmp_path / "nope" / "g.png")
    with pytest.raises(GeneError, match="not a gene directory"):
        inspect_gene(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_safety_utility_plane(tmp_path):
    res = [{"method": "none", "task": "sentiment", "asr": 0.8, "accuracy": 0.9},
           {"method": "RESTA", "task": "sentiment", "asr": 0.2, "accuracy": 0.7},
           {"method": "SafeGene", "task": "sentiment", "asr": 0.05, "accuracy": 0.88}]
    p = plot_safety_utility(res, tmp_path / "plane.png")
    assert p.read_bytes().startswith(PNG)
    with pytest.raises(UsageError, match="result 0: missing 'accuracy'"):
        plot_safety_utility([{"method": "x", "asr": 0.1}], tmp_path / "p.png")
    with pytest.raises(UsageError, match=r"result 0: asr = 80 must be a fraction"):
        plot_safety_utility([{"method": "x", "asr": 80, "accuracy": 0.5}], tmp_path / "p.png")
    with pytest.raises(UsageError, match=r"unknown keys \['acc'\]"):
        plot_safety_utility([{"method": "x", "asr": 0.1, "accuracy": 0.5, "acc": 1}], tmp_path / "p.png")
    with pytest.raises(UsageError, match="no results"):
        plot_safety_utility([], tmp_path / "p.png")
