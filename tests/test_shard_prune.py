"""Sharded low-rank genes (``factors-0000i-of-0000N.safetensors`` + index) read, apply, export and
calibrate exactly like the single-file gene; ``select --prune`` / :func:`prune_gene` keep only the
selected keys, byte for byte, in shards (the pruned gene equals ``extract --keys``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import load_file  # noqa: E402
from test_lowrank_gene import IDS, _adapter, _model  # noqa: E402

import safegene  # noqa: E402
from safegene.cli.main import main  # noqa: E402
from safegene.errors import GeneError, UsageError  # noqa: E402
from safegene.gene import FACTORS, FACTORS_INDEX, VECTORS, VECTORS_INDEX, Gene, key_sort  # noqa: E402
from safegene.ops.extract import extract, extract_from_adapter, prune_gene  # noqa: E402

COEFFS = {"layer.0": 0.7, "layer.1": -1.3}


def _files(d: Path) -> dict[str, bytes]:
    """Every output file's bytes except the model card (README.md), which names the gene and the output."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "README.md"}


def _all_factors(g: Gene) -> dict[str, "torch.Tensor"]:
    out: dict[str, torch.Tensor] = {}
    for f in g.factor_files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-lowrank")
    _model(torch.float32).save_pretrained(root / "aligned")
    ad = _adapter(root / "aligned", root / "ad")
    one = extract_from_adapter(ad, root / "one", base=root / "aligned")
    many = extract_from_adapter(ad, root / "many", base=root / "aligned", max_shard_mb=0.004)
    from conftest import perturbed
    from transformers import AutoModelForCausalLM

    perturbed(AutoModelForCausalLM.from_pretrained(root / "aligned"), 2).save_pretrained(root / "task")
    return {"root": root, "aligned": root / "aligned", "adapter": ad, "one": one, "many": many, "task": root / "task"}


def test_sharded_factors_equal_the_single_file_factors(lowrank):
    one, many = lowrank["one"], lowrank["many"]
    assert [f.name for f in one.factor_files] == [FACTORS] and not (one.path / FACTORS_INDEX).exists()
    names = [f.name for f in many.factor_files]
    n = len(names)
    assert n > 2 and names == [f"factors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (many.path / FACTORS).exists() and many.factors_path.name == FACTORS_INDEX
    index = json.loads((many.path / FACTORS_INDEX).read_text())
    ref = load_file(str(one.path / FACTORS))
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    for name in one.factored:  # a tensor's two factors share a shard
        assert index["weight_map"][f"{name}.A"] == index["weight_map"][f"{name}.B"]
    got = _all_factors(many)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # through every reader
    for (n1, a1, b1), (n2, a2, b2) in zip(one.iter_factors(), Gene.load(many.path).iter_factors()):
        assert n1 == n2 and torch.equal(a1, a2) and torch.equal(b1, b2)
    d1, d2 = one.load_vectors(), Gene.load(many.path).load_vectors()
    assert d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)
    m1, m2 = dict(one.manifest), dict(many.manifest)
    for m in (m1, m2):
        m.pop("stream"), m.pop("shards"), m.pop("sources")
    assert m1 == m2
    assert many.manifest["shards"]["factor_files"] == names


def test_sharded_factors_apply_export_calibrate_inspect(lowrank, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from safegene.method.lowmem import LowMemPlan

    one, many = lowrank["one"], lowrank["many"]
    safegene.apply(one, lowrank["task"], tmp_path / "p1", coeffs=COEFFS, progress=False)
    safegene.apply(many, lowrank["task"], tmp_path / "p2", coeffs=COEFFS, progress=False)
    assert _files(tmp_path / "p1") == _files(tmp_path / "p2")
    safegene.export_lora(one, tmp_path / "l1", coeffs=COEFFS, progress=False)
    safegene.export_lora(many, tmp_path / "l2", coeffs=COEFFS, progress=False)
    assert (tmp_path / "l1" / "adapter_model.safetensors").read_bytes() == (tmp_path / "l2" / "adapter_model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(lowrank["task"]).double().eval().requires_grad_(False)
    outs = []
    for g in (one, many):
        plan = LowMemPlan(model, g, ["layer.0", "layer.1"])
        plan.set([0.7, -1.3])
        with torch.no_grad():
            outs.append(model(input_ids=IDS).logits)
        plan.restore()
    assert torch.equal(outs[0], outs[1])
    info = safegene.inspect_gene(many)
    assert info["factored"] == safegene.inspect_gene(one)["factored"]
    assert info["factor_files"] == [f.name for f in many.factor_files]
    assert main(["inspect", str(many.path)]) == 0
    assert f"factors: {len(many.factor_files)} shards (factors-00001-of-" in capsys.readouterr().out


def test_damaged_factor_shards_are_named(lowrank, tmp_path):
    import shutil

    g = shutil.copytree(lowrank["many"].path, tmp_path / "g")
    idx = json.loads((g / FACTORS_INDEX).read_text())
    first = next(iter(idx["weight_map"]))
    name = first.rsplit(".", 1)[0]
    idx["weight_map"][f"{name}.B"] = "factors-00002-of-00099.safetensors" if idx["weight_map"][f"{name}.A"] != \
        "factors-00002-of-00099.safetensors" else "x.safetensors"
    (g / FACTORS_INDEX).write_text(json.dumps(idx))
    with pytest.raises(GeneError, match="one shard"):
        Gene.load(g)
    shutil.rmtree(g)
    g = shutil.copytree(lowrank["many"].path, tmp_path / "g")
    Gene.load(g).factor_files[-1].unlink()
    with pytest.raises(GeneError, match="missing"):
        Gene.load(g)


def test_cli_extract_from_adapter_shards_factors(lowrank, tmp_path, capsys):
    rc = main(["extract", "--from-adapter", str(lowrank["adapter"]), "--base", str(lowrank["aligned"]), "-o",
               str(tmp_path / "g"), "--max-shard-mb", "0.004", "--quiet", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["factor_files"] == [f.name for f in lowrank["many"].factor_files] and s["files"] == [VECTORS]
    got, ref = _all_factors(Gene.load(tmp_path / "g")), _all_factors(lowrank["many"])
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ---- prune ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_prune_equals_extract_keys_byte_for_byte(family, tmp_path, dtype):
    fam = family("llama", dtype)
    keep = ["layer.1", "lm_head"]
    full = extract(fam["aligned"], fam["degraded"], tmp_path / "full", progress=False, max_shard_mb=0.02)
    assert full.sharded
    full_files = {f.name for f in full.vector_files}
    (full.path / "layer_scores.png").write_bytes(b"png")
    full.set_selection({k: 1.0 for k in full.layer_keys()}, keep, "test")
    part = extract(fam["aligned"], fam["degraded"], tmp_path / "part", progress=False, keys=keep)
    ref_vectors = Gene.load(full.path).load_vectors()
    pruned = prune_gene(tmp_path / "full", max_shard_mb=0.01)  # the selection, into smaller shards
    assert pruned.path == full.path and pruned.layer_keys() == keep and pruned.tensor_names == part.tensor_names
    assert pruned.sharded and len(pruned.vector_files) > 1 and {f.name for f in pruned.vector_files} != full_files
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left behind
    assert (pruned.path / "layer_scores.png").read_bytes() == b"png"
    card, full_card = (pruned.path / "README.md").read_text(), (tmp_path / "part" / "README.md").read_text()
    assert "| `layer.0` |" not in card and "| `layer.1` |" in card and "| `lm_head` |" in card  # rewritten, not copied
    assert f"**keys kept:** `layer.1`, `lm_head` ({len(part.tensor_names)} of the family's" in card

    def stats(c: str) -> list[str]:  # key, |τ|, relative change, tensors (the score columns differ: selected or not)
        return ["|".join(r.split("|")[:5]) for r in c.split("## Statistics")[1].split("## Intended use")[0].splitlines() if r]
    assert stats(card) == stats(full_card) and len(stats(card)) == 4  # header, rule, two keys
    index = json.loads((pruned.path / VECTORS_INDEX).read_text())
    assert set(index["weight_map"]) == set(part.tensor_names)
    ref = load_file(str(part.vectors_path))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    got: dict[str, torch.Tensor] = {}
    for f in pruned.vector_files:
        got.update(load_file(str(f)))
    assert got.keys() == ref.keys()
    for n, t in ref.items():  # exact bytes: the full gene's tensors == extract --keys' tensors
        assert t.dtype == got[n].dtype and t.view(torch.uint8).equal(got[n].view(torch.uint8))
        assert torch.equal(t, ref_vectors[n])
    m1, m2 = dict(pruned.manifest), dict(part.manifest)
    assert m1["selection"]["selected"] == keep and m1["selection"]["pruned"] is True
    for m in (m1, m2):
        for k in ("stream", "shards", "sources", "selection"):
            m.pop(k)
    assert m1 == m2  # same tensors, layers, layer_stats, rounding, keys, fingerprint
    coeffs = {"layer.1": 0.9, "lm_head": 1.1}
    apply(part, fam["task"], tmp_path / "a1", coeffs=coeffs)
    apply(pruned, fam["task"], tmp_path / "a2", coeffs=coeffs)
    assert _files(tmp_path / "a1") == _files(tmp_path / "a2")


def apply(g, target, out, coeffs):
    return safegene.apply(g, target, out, coeffs=coeffs, progress=False)


def test_prune_lowrank_gene_keeps_the_selected_factors(lowrank, tmp_path):
    import shutil

    shutil.copytree(lowrank["many"].path, tmp_path / "g")
    pruned = prune_gene(tmp_path / "g", ["layer.1"], max_shard_mb=0.004)
    want = {n for n in lowrank["one"].factored if lowrank["one"].layer_key(n) == "layer.1"}
    assert set(pruned.factored) == want == set(pruned.tensor_names) and pruned.manifest["keys"] == ["layer.1"]
    ref = _all_factors(lowrank["one"])
    got = _all_factors(pruned)
    assert got.keys() == {f"{n}.{s}" for n in want for s in "AB"} and all(torch.equal(got[k], ref[k]) for k in got)
    apply(lowrank["one"], lowrank["task"], tmp_path / "a1", {"layer.1": -1.3})
    apply(pruned, lowrank["task"], tmp_path / "a2", {"layer.1": -1.3})
    assert _files(tmp_path / "a1") == _files(tmp_path / "a2")


def test_prune_refuses_without_a_selection_or_with_unknown_keys(family, tmp_path):
    fam = family("llama", "F32")
    g = extract(fam["aligned"], fam["degraded"], tmp_path / "g", progress=False)
    before = _files(g.path)
    with pytest.raises(UsageError, match="no layer selection"):
        prune_gene(g)
    with pytest.raises(UsageError, match="layer.99"):
        prune_gene(g, ["layer.99"])
    assert _files(g.path) == before


def test_cli_select_prune(tmp_path, capsys):
    import tiny_models as tm

    from safegene.data import save_jsonl

    torch.set_num_threads(1)
    dirs = tm.build_family(tmp_path / "fam")
    g = extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    n_full = len(g.tensor_names)
    save_jsonl(tmp_path / "h.jsonl", tm.HARMFUL)
    save_jsonl(tmp_path / "b.jsonl", tm.BENIGN)
    rc = main(["select", str(g.path), "--aligned", str(dirs["aligned"]), "--degraded", str(dirs["degraded"]),
               "--harmful", str(tmp_path / "h.jsonl"), "--benign", str(tmp_path / "b.jsonl"), "--top-k", "2",
               "--prune", "--max-shard-mb", "0.005", "--quiet", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    pg = Gene.load(tmp_path / "gene")
    assert pg.layer_keys() == sorted(res["selected"], key=key_sort) and len(res["selected"]) == 2
    assert res["pruned"]["tensors"] == len(pg.tensor_names) < n_full
    assert pg.selected_layers() == res["selected"] and (pg.path / "layer_scores.png").is_file()
    full = extract(dirs["aligned"], dirs["degraded"], tmp_path / "ref", progress=False, keys=res["selected"])
    ref = full.load_vectors()
    got = pg.load_vectors()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_every_consumer_reads_a_sharded_dense_gene_as_the_single_file_one(tmp_path, mode):
    """calibrate (both modes), select, export-lora and save_pretrained give the same results from a gene
    cut into many vector shards as from the single-file gene."""
    import tiny_models as tm

    from safegene.method.calibrate import calibrate
    from safegene.method.selection import select_layers

    torch.set_num_threads(1)
    dirs = tm.build_family(tmp_path / "fam")
    one = extract(dirs["aligned"], dirs["degraded"], tmp_path / "one", progress=False)
    many = extract(dirs["aligned"], dirs["degraded"], tmp_path / "many", progress=False, max_shard_mb=0.005)
    assert len(many.vector_files) > 3
    kw = dict(layers=["layer.2", "layer.3"], steps=2, init=1.0, lr=0.2, device="cpu", log=None, mode=mode)
    c1 = calibrate(one, dirs["task"], tm.HARMFUL, tm.BENIGN, **kw)
    c2 = calibrate(many, dirs["task"], tm.HARMFUL, tm.BENIGN, **kw)
    assert c1.coeffs == c2.coeffs
    if mode == "exact":
        s1 = select_layers(one, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, top_k=2)
        s2 = select_layers(many, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, top_k=2)
        assert s1["scores"] == s2["scores"] and s1["selected"] == s2["selected"]
        safegene.export_lora(one, tmp_path / "l1", scale=1.0, rank=2, progress=False)
        safegene.export_lora(many, tmp_path / "l2", scale=1.0, rank=2, progress=False)
        assert (tmp_path / "l1" / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "l2" / "adapter_model.safetensors").read_bytes()
        copy = Gene.load(many.path).save_pretrained(tmp_path / "share")
        assert {p.name for p in Gene.load(copy).vector_files} == {p.name for p in many.vector_files}
        assert (Path(copy) / VECTORS_INDEX).is_file()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_factors_read_without_torch_equal_the_torch_reader(lowrank, tmp_path, dtype):
    g = lowrank["many"] if dtype == "F32" else extract_from_adapter(
        lowrank["adapter"], tmp_path / dtype, base=lowrank["aligned"], dtype=dtype, max_shard_mb=0.004)
    assert len(g.factor_files) > 1
    ref = {n: (a, b) for n, a, b in g.iter_factors(dtype=torch.float32)}
    got = {n: (a, b) for n, a, b in g.iter_factors_f32()}
    assert list(got) == list(ref) and got
    for n, (a, b) in got.items():
        assert a.dtype == b.dtype == np.float32 and a.shape == tuple(ref[n][0].shape) and b.shape == tuple(ref[n][1].shape)
        assert np.array_equal(a, ref[n][0].numpy()) and np.array_equal(b, ref[n][1].numpy())  # exact widening
    name = next(iter(got))
    assert [n for n, _, _ in g.iter_factors_f32([name])] == [name]
    with pytest.raises(GeneError, match="is not factored in this gene"):
        list(g.iter_factors_f32(["nope.weight"]))


def test_a_low_rank_apply_does_not_import_torch(lowrank, tmp_path):
    """apply reads the factors with numpy: a low-rank apply is as light as a dense one."""
    import subprocess

    code = ("import sys, safegene; safegene.apply(sys.argv[1], sys.argv[2], sys.argv[3], scale=-1.3, progress=False); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(lowrank["many"].path), str(lowrank["task"]), str(tmp_path / "a")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    apply(lowrank["many"], lowrank["task"], tmp_path / "b", {k: -1.3 for k in lowrank["many"].layer_keys()})
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_dense_apply_imports_neither_torch_nor_numpy(tmp_path):
    """The streaming apply of a dense gene needs neither library: the memory tests (under ASan
    numpy's import alone is ~30 MiB) and small machines rely on it; factors are read only when
    the gene has some with λ ≠ 0."""
    import subprocess

    fam_dir = tmp_path / "fam"
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for k, name in enumerate(("a", "d", "t")):
        (fam_dir / name).mkdir(parents=True)
        save_file({"model.layers.0.w.weight": rng.standard_normal((8, 8)).astype(np.float32) + k},
                  str(fam_dir / name / "model.safetensors"))
    extract(fam_dir / "a", fam_dir / "d", tmp_path / "g", progress=False)
    code = ("import sys, safegene; safegene.apply(sys.argv[1], sys.argv[2], sys.argv[3], scale=0.5, progress=False); "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g"), str(fam_dir / "t"), str(tmp_path / "o")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
