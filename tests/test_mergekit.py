"""export-mergekit: the YAML names degraded as the base, the target at weight 1 and the aligned
model at weight λ per layer; mergekit run on it reproduces `apply` within one rounding of the
output dtype."""

from __future__ import annotations

import pytest
import yaml

import safegene
from safegene.cli import main as cli_main
from safegene.coeffs import Coeffs
from safegene.errors import OutputError, UsageError
from safegene.ops.export_mergekit import export_mergekit, mergekit_config

torch = pytest.importorskip("torch")

COEFFS = {"layer.1": 0.7, "layer.2": 1.3, "lm_head": 0.5}


@pytest.fixture(params=["F32", "BF16"])
def fam(request, family, tmp_path):
    dirs = family("llama", request.param)
    g = safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    return dirs, g, request.param


def _filters_of(cfg):
    return cfg["models"][1]["parameters"]["weight"]


def test_config_shape(fam, tmp_path):
    dirs, g, dtype = fam
    cfg = mergekit_config(g, COEFFS, dirs["task"])
    assert cfg["merge_method"] == "task_arithmetic" and cfg["base_model"] == str(dirs["degraded"])
    assert cfg["models"][0] == {"model": str(dirs["task"]), "parameters": {"weight": 1.0}}
    assert cfg["models"][1]["model"] == str(dirs["aligned"])
    assert cfg["parameters"] == {"normalize": False, "lambda": 1.0} and cfg["dtype"] == "float32"
    assert cfg["out_dtype"] == {"F32": "float32", "BF16": "bfloat16"}[dtype]
    filters = _filters_of(cfg)
    assert filters[-1] == {"value": 0.0}
    by = {f["filter"]: f["value"] for f in filters[:-1]}
    assert by == {"model.layers.1.": 0.7, "model.layers.2.": 1.3, "lm_head.": 0.5}
    # every tensor resolves, by mergekit's first-substring-match rule, to apply's λ
    lam = safegene.coeffs.resolve_coeffs(g, None, COEFFS)
    for name in g.tensor_names:
        got = next(f["value"] for f in filters if "filter" not in f or f["filter"] in name)
        assert got == lam[name], name

    # per-tensor λ that differ inside a key fall back to one filter per tensor name
    one = next(n for n in g.tensor_names if g.layer_key(n) == "layer.0")
    f2 = _filters_of(mergekit_config(g, {one: 2.0, "layer.0": 1.0}, dirs["task"]))
    assert {"filter": one, "value": 2.0} in f2 and len(f2) == sum(g.layer_key(n) == "layer.0" for n in g.tensor_names) + 1


def test_cli_writes_yaml_and_reads_target_from_coeffs(fam, tmp_path, capsys):
    dirs, g, _ = fam
    cpath = tmp_path / "COEFFS.json"
    Coeffs(COEFFS, {"target": str(dirs["task"])}).save(cpath)
    out = tmp_path / "merge.yml"
    assert cli_main(["export-mergekit", str(cpath), "--gene", str(g.path), "-o", str(out)]) == 0
    assert "weight filters" in capsys.readouterr().out
    cfg = yaml.safe_load(out.read_text())
    assert cfg == mergekit_config(g, cpath, dirs["task"])
    with pytest.raises(OutputError, match="already exists"):
        export_mergekit(cpath, out, gene=g)
    with pytest.raises(UsageError, match="--target"):
        mergekit_config(g, COEFFS)
    # a portable copy names its sources by content hash only: mergekit then needs them given
    portable = safegene.Gene.load(g.save_pretrained(tmp_path / "portable"))
    with pytest.raises(UsageError, match="--degraded"):
        mergekit_config(portable, COEFFS, dirs["task"])
    cfg = mergekit_config(portable, COEFFS, dirs["task"], aligned=dirs["aligned"], degraded=dirs["degraded"])
    assert cfg == mergekit_config(g, COEFFS, dirs["task"])


def test_mergekit_reproduces_apply(fam, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    dirs, g, dtype = fam
    out = tmp_path / "merge.yml"
    export_mergekit(COEFFS, out, gene=g, target=dirs["task"])
    config = MergeConfiguration.model_validate(yaml.safe_load(out.read_text()))
    run_merge(config, str(tmp_path / "mk"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    res = safegene.apply(g, dirs["task"], tmp_path / "ap", coeffs=COEFFS, progress=False)

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    mk, ap = tensors(tmp_path / "mk"), tensors(res.out)
    src = {k: tensors(dirs[k]) for k in ("task", "aligned", "degraded")}
    lam = safegene.coeffs.resolve_coeffs(g, None, COEFFS)
    assert set(mk) == set(ap)
    n_same = n_total = 0
    eps32 = torch.finfo(torch.float32).eps
    for name, a in ap.items():
        b = mk[name]
        assert b.dtype == a.dtype, name
        a64, b64 = a.double(), b.double()
        # apply rounds T + λτ once; mergekit forms D + (T − D) + λ(A − D) in float32, then rounds:
        # they agree to one rounding of the output dtype plus a few float32 roundings of the inputs
        scale = sum(src[k][name].double().abs() for k in src) * (1 + abs(lam.get(name, 0.0)))
        tol = torch.finfo(a.dtype).eps * a64.abs() + 4 * eps32 * scale
        assert ((a64 - b64).abs() <= tol).all(), name
        n_same += int((a == b).sum())
        n_total += a.numel()
    assert n_same / n_total > 0.9
