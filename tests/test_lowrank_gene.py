"""Low-rank genes (format version 2): τ = −s·B·A of a LoRA degrade kept as its factors.

References are float64: τ = −s·B_ad·A_ad from the adapter's own factors, the statistics from the
dense aligned weights, and apply's output ``round(W + λ·τ)`` (plus a task LoRA's ``s·B·A`` when
the target is BASE+ADAPTER). The densified twin is a dense (v1) gene of the same degrade.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import safegene  # noqa: E402
import safegene.gene as gene_mod  # noqa: E402
from safegene import cli  # noqa: E402
from safegene.errors import CheckpointError, GeneError, MismatchError  # noqa: E402
from safegene.gene import FACTORS, Gene, densify  # noqa: E402
from safegene.ops.extract import extract_from_adapter  # noqa: E402

from conftest import DTYPES, perturbed  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
COEFFS = {"layer.0": 0.7, "layer.1": -1.3}
IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 71], [4, 4, 8, 15, 16, 23, 42, 90]])


def _model(dtype: "torch.dtype"):
    """A tiny Llama whose down_proj rows (72 columns) do not divide the core's 4096-element chunks."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval().to(dtype)


def _adapter(base: Path, out: Path, seed: int = 3, **kw) -> Path:
    """A real PEFT LoRA adapter (LoraConfig + get_peft_model + save_pretrained) with non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS} | kw
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(task_type="CAUSAL_LM", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


def _load(path: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _tau64(base: Path, adapter: Path) -> dict[str, "torch.Tensor"]:
    """The float64 reference τ = −s·B·A of every tensor the adapter touches."""
    return {n: -s * (b.double() @ a.double()) for n, (a, b, s) in safegene.lora_target_delta(base, adapter).items()}


def _ulps_apart(a: "torch.Tensor", b: "torch.Tensor") -> int:
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32).to(torch.int64)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32).to(torch.int64)
    return int((ia - ib).abs().max().item())


def _close(got: "torch.Tensor", ref64: "torch.Tensor", dtype: "torch.dtype", name: str) -> None:
    """F32: float32 rounding of the sum; F16/BF16: at most one unit in the last place."""
    if dtype == torch.float32:
        tol = 2e-6 * (ref64.abs().max().item() + 1.0)
        assert (got.double() - ref64).abs().max().item() <= tol, name
    else:
        assert _ulps_apart(got, ref64.to(dtype)) <= 1, name


@pytest.fixture(scope="module")
def lr(tmp_path_factory):
    """F32 aligned model, a LoRA degrade of it, its low-rank gene and the densified twin (dense v1 gene)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lowrank")
    _model(torch.float32).save_pretrained(root / "aligned")
    ad = _adapter(root / "aligned", root / "degrade-lora")
    gene = safegene.extract(root / "aligned", f"{root / 'aligned'}+{ad}", root / "gene", progress=False)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "aligned"), str(ad)).merge_and_unload()
    merged.save_pretrained(root / "degraded")
    dense = safegene.extract(root / "aligned", root / "degraded", root / "dense", progress=False)
    perturbed(AutoModelForCausalLM.from_pretrained(root / "aligned"), 2).save_pretrained(root / "task")
    return {"root": root, "aligned": root / "aligned", "adapter": ad, "gene": gene, "dense": dense, "task": root / "task"}


# ---- format -------------------------------------------------------------------------------------


def test_lowrank_gene_holds_exact_factors_and_no_dense_tau(lr):
    g: Gene = lr["gene"]
    man = json.loads((g.path / "gene.json").read_text())
    assert man["format_version"] == 2
    ref = _tau64(lr["aligned"], lr["adapter"])
    assert set(g.factored) == set(ref) == set(g.tensor_names) and len(ref) == 3 * 2
    assert all(v == {"rank": 4, "shape": list(ref[n].shape)} for n, v in man["factored"].items())
    assert _load(g.path / "vectors.safetensors") == {}  # no dense τ on disk
    assert g.dense_names == [] and g.open_vectors().tensors == {}
    fac = _load(g.path / FACTORS)
    assert set(fac) == {f"{n}.{x}" for n in ref for x in "AB"}
    for n, (a, b) in g.load_factors().items():
        assert a.dtype == b.dtype == torch.float32 and a.shape[0] == 4
        assert torch.allclose(b.double() @ a.double(), ref[n], rtol=0, atol=1e-7 * ref[n].abs().max().item())
    untouched = man["lowrank"]["untouched"]
    assert "model.embed_tokens.weight" in untouched and "model.layers.0.self_attn.k_proj.weight" in untouched
    assert set(untouched).isdisjoint(ref) and len(untouched) + len(ref) == len(man["fingerprint"]["tensors"])
    assert man["lowrank"]["scale_folded_into"] == "B"


def test_lowrank_stats_match_float64(lr):
    g: Gene = lr["gene"]
    w = _load(lr["aligned"] / "model.safetensors")
    ref = _tau64(lr["aligned"], lr["adapter"])
    for n, tau in ref.items():
        st = g.manifest["tensors"][n]
        a = w[n].double()
        d = a - tau
        want = {"tau_norm": tau.norm().item(), "aligned_norm": a.norm().item(), "degraded_norm": d.norm().item(),
                "cosine": float((a * d).sum() / (a.norm() * d.norm()))}
        for k, v in want.items():
            assert math.isclose(st[k], v, rel_tol=1e-9), (n, k)
        assert st["rank"] == 4 and st["nonfinite"] == 0 and st["rounding_rel_error"] < 1e-7
    for key, ls in g.manifest["layer_stats"].items():
        names = [n for n in ref if g.layer_key(n) == key]
        assert math.isclose(ls["tau_norm"], math.sqrt(sum(ref[n].norm().item() ** 2 for n in names)), rel_tol=1e-9)
        assert ls["n_tensors"] == len(names)


def test_lowrank_equals_densified_twin(lr):
    """The dense gene of the merged degrade holds the same τ (up to the merge's float32 rounding)."""
    g, dense = lr["gene"], lr["dense"]
    assert dense.manifest["format_version"] == 1
    twin = dense.load_vectors(g.tensor_names)
    for n, tau in g.iter_vectors():  # densified through the one helper
        assert tau.dtype == torch.float32
        scale = lr["gene"].manifest["tensors"][n]["aligned_norm"]
        assert (tau.double() - twin[n].double()).norm().item() <= 1e-6 * scale, n
        st, sd = g.manifest["tensors"][n], dense.manifest["tensors"][n]
        for k in ("tau_norm", "aligned_norm", "degraded_norm"):
            assert math.isclose(st[k], sd[k], rel_tol=1e-5), (n, k)
    # every untouched tensor has τ = 0 in the twin
    for n in g.manifest["lowrank"]["untouched"]:
        assert dense.manifest["tensors"][n]["tau_norm"] == 0.0


def test_from_adapter_equals_plus_syntax(lr, tmp_path, capsys):
    g = lr["gene"]
    by_api = extract_from_adapter(lr["adapter"], tmp_path / "api", base=lr["aligned"])
    # the adapter's own base_model_name_or_path (the local aligned directory) via the CLI
    rc = cli.main(["extract", "--from-adapter", str(lr["adapter"]), "-o", str(tmp_path / "cli"), "--quiet", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format_version"] == 2 and out["factored"] == 6 and out["ranks"] == [4]
    ref = _load(g.path / FACTORS)
    for d in (by_api.path, tmp_path / "cli"):
        got = _load(d / FACTORS)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
        assert Gene.load(d).manifest["tensors"] == g.manifest["tensors"]


def test_keys_keep_only_some_factored_tensors(lr, tmp_path):
    g = safegene.extract(lr["aligned"], f"{lr['aligned']}+{lr['adapter']}", tmp_path / "g", keys="layer.1", progress=False)
    assert sorted(g.factored) == sorted(n for n in lr["gene"].factored if ".layers.1." in n)
    assert g.manifest["keys"] == ["layer.1"]


def test_dense_genes_stay_version_1(lr, tmp_path):
    dense = lr["dense"]
    man = json.loads((dense.path / "gene.json").read_text())
    assert man["format_version"] == 1 and "factored" not in man and "lowrank" not in man
    assert not (dense.path / FACTORS).exists() and dense.factored == {} and list(dense.iter_factors()) == []
    again = safegene.extract(lr["aligned"], lr["root"] / "degraded", tmp_path / "again", progress=False)
    assert (again.path / "vectors.safetensors").read_bytes() == (dense.path / "vectors.safetensors").read_bytes()


# ---- apply ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_apply_factored_matches_float64_chunks_cut_mid_row(lr, tmp_path, monkeypatch, dtype):
    from transformers import AutoModelForCausalLM

    tdt = DTYPES[dtype]
    AutoModelForCausalLM.from_pretrained(lr["task"]).to(tdt).save_pretrained(tmp_path / "task")
    monkeypatch.setattr(gene_mod, "densify", _no_densify)
    # 4096-element chunks: down_proj (64 x 72) is cut in the middle of a row
    res = safegene.apply(lr["gene"], tmp_path / "task", tmp_path / "out", coeffs=COEFFS, budget_mb=0.001, progress=False)
    got, base = _load(tmp_path / "out" / "model.safetensors"), _load(tmp_path / "task" / "model.safetensors")
    ref = _tau64(lr["aligned"], lr["adapter"])
    lam = {"layer.0": 0.7, "layer.1": -1.3}
    assert res.n_patched == len(ref)
    for n, w in base.items():
        assert got[n].dtype == w.dtype
        if n in ref:
            _close(got[n], w.double() + lam[lr["gene"].layer_key(n)] * ref[n], tdt, n)
        else:
            assert torch.equal(got[n], w), n
    # the densified twin gives the same model within one rounding
    safegene.apply(lr["dense"], tmp_path / "task", tmp_path / "twin", coeffs=COEFFS, progress=False)
    twin = _load(tmp_path / "twin" / "model.safetensors")
    for n in ref:
        if tdt == torch.float32:
            assert (got[n] - twin[n]).abs().max().item() <= 1e-5, n
        else:
            assert _ulps_apart(got[n], twin[n]) <= 1, n


def _no_densify(*_a, **_k):
    raise AssertionError("a factored τ was densified")


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_apply_to_lora_target_stacks_both_low_rank_terms(lr, tmp_path, monkeypatch, dtype):
    from transformers import AutoModelForCausalLM

    tdt = DTYPES[dtype]
    AutoModelForCausalLM.from_pretrained(lr["task"]).to(tdt).save_pretrained(tmp_path / "task")
    # the task LoRA shares q_proj with the gene, and adds o_proj, which the gene leaves alone
    task_ad = _adapter(tmp_path / "task", tmp_path / "task-lora", seed=11, r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"])
    monkeypatch.setattr(gene_mod, "densify", _no_densify)
    safegene.apply(lr["gene"], f"{tmp_path / 'task'}+{task_ad}", tmp_path / "out", coeffs=COEFFS, budget_mb=0.001, progress=False)
    got, base = _load(tmp_path / "out" / "model.safetensors"), _load(tmp_path / "task" / "model.safetensors")
    ref = _tau64(lr["aligned"], lr["adapter"])
    task = {n: s * (b.double() @ a.double()) for n, (a, b, s) in safegene.lora_target_delta(tmp_path / "task", task_ad).items()}
    lam = {"layer.0": 0.7, "layer.1": -1.3}
    stacked = 0
    for n, w in base.items():
        want = w.double()
        if n in task:
            want = want + task[n]
        if n in ref:
            want = want + lam[lr["gene"].layer_key(n)] * ref[n]
        stacked += n in task and n in ref
        if n in task or n in ref:
            _close(got[n], want, tdt, n)
        else:
            assert torch.equal(got[n], w), n
    assert stacked == 2  # q_proj in both layers


def test_mixed_gene_dense_and_factored_side_by_side(lr, tmp_path):
    """A version 2 gene with dense vectors (final_norm, lm_head) and factored ones applies both."""
    import shutil

    part = safegene.extract(lr["aligned"], lr["root"] / "degraded", tmp_path / "mixed", keys="final_norm,lm_head",
                            progress=False)
    shutil.copy(lr["gene"].path / FACTORS, part.path / FACTORS)
    man = part.manifest
    lg = lr["gene"].manifest
    man["format_version"] = 2
    man["factored"] = lg["factored"]
    for k in ("layers", "tensors"):
        man[k] = {**man[k], **lg[k]}
    (part.path / "gene.json").write_text(json.dumps(man))
    g = Gene.load(part.path)
    assert set(g.dense_names) == {"model.norm.weight", "lm_head.weight"} and len(g.factored) == 6
    assert set(g.load_vectors()) == set(g.tensor_names)  # dense and densified
    safegene.apply(g, lr["task"], tmp_path / "out", scale=0.5, progress=False)
    got, base = _load(tmp_path / "out" / "model.safetensors"), _load(lr["task"] / "model.safetensors")
    ref = _tau64(lr["aligned"], lr["adapter"])
    dense = lr["dense"].load_vectors(["model.norm.weight", "lm_head.weight"])
    for n, w in base.items():
        want = w.double() + 0.5 * (ref[n] if n in ref else dense[n].double() if n in dense else 0.0)
        _close(got[n], want, torch.float32, n)


# ---- export-lora and inspect -------------------------------------------------------------------------


def test_export_lora_of_lowrank_gene_is_exact(lr, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(gene_mod, "densify", _no_densify)
    info = safegene.export_lora(lr["gene"], tmp_path / "lora", coeffs=COEFFS, progress=False)  # no rank: exact
    assert info["mode"] == {"exact": True} and info["n_modules"] == 6 and info["dropped"] == {}
    assert info["rank_max"] == 4 and all(m["exact"] and m["rank"] == 4 for m in info["modules"].values())
    assert info["rel_error"] < 1e-7
    ad = _load(tmp_path / "lora" / "adapter_model.safetensors")
    fac = lr["gene"].load_factors()
    lam = {"layer.0": 0.7, "layer.1": -1.3}
    for n, (a, b) in fac.items():
        mod = "base_model.model." + n[: -len(".weight")]
        assert torch.equal(ad[f"{mod}.lora_A.weight"], a)  # λ folds into B
        assert torch.equal(ad[f"{mod}.lora_B.weight"], (lam[lr["gene"].layer_key(n)] * b.double()).float())
    monkeypatch.undo()
    # PEFT on the task model == apply of the same gene and coefficients
    safegene.apply(lr["gene"], lr["task"], tmp_path / "applied", coeffs=COEFFS, progress=False)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lr["task"]), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").eval()(input_ids=IDS).logits
        got = peft_model(input_ids=IDS).logits
    assert (got - want).abs().max().item() < 1e-4


def test_cli_export_lora_of_lowrank_gene_needs_no_rank(lr, tmp_path, capsys, monkeypatch):
    """The factors are the adapter: `export-lora GENE -o DIR` with neither --rank nor --energy writes
    exactly the API's adapter (no SVD, nothing densified); a dense gene still asks for one of them."""
    (tmp_path / "c.json").write_text(json.dumps({"coeffs": COEFFS}))
    monkeypatch.setattr(gene_mod, "densify", _no_densify)
    rc = cli.main(["export-lora", str(lr["gene"].path), "--coeffs", str(tmp_path / "c.json"), "-o", str(tmp_path / "cli"),
                   "--quiet", "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["mode"] == {"exact": True} and s["rank_max"] == 4 and s["n_modules"] == 6 and s["rel_error"] < 1e-7
    safegene.export_lora(lr["gene"], tmp_path / "api", coeffs=COEFFS, progress=False)
    got, want = _load(tmp_path / "cli" / "adapter_model.safetensors"), _load(tmp_path / "api" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    monkeypatch.undo()
    rc = cli.main(["export-lora", str(lr["dense"].path), "--coeffs", str(tmp_path / "c.json"), "-o", str(tmp_path / "d")])
    assert rc == 2 and "--rank" in capsys.readouterr().err and not (tmp_path / "d").exists()


# ---- calibrate's low-memory mode on the factors -------------------------------------------------------


def _lam_grad(model, plan, lam0, ids):
    from safegene.method import merge

    lam = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
    ws = merge.gene_merge(lam, plan)
    logits = torch.func.functional_call(model, dict(zip(plan.names, ws)), (ids,)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)).backward()
    plan.restore()
    return lam.grad.clone()


def _weight_space_grad(model, plan, taus64, lam0, ids):
    lam = torch.tensor(lam0, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    new = {n: params[n].detach() + lam[plan.key_of[i]] * taus64[n] for i, n in enumerate(plan.names)}
    logits = torch.func.functional_call(model, new, (ids,)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)).backward()
    return lam.grad.clone()


@pytest.mark.parametrize("variant", ["plain", "embedding+head"])
def test_lowmem_uses_the_factors_and_its_lambda_gradient_is_the_densified_genes(lr, tmp_path, monkeypatch, variant):
    """calibrate --mode lowmem on a low-rank gene adds λ·B(Ax) (an embedding λ·B[ids]·A) in each
    hooked module, never densifying: the plan holds r·(out + in) numbers per tensor, and its ∂L/∂λ
    in float64 equals the weight-space gradient of W + λ·(B·A) with the product taken in float64
    (and the gradient through the densified twin, whose τ is B·A rounded to float32)."""
    from tiny_models import LORA_VARIANTS
    from transformers import AutoModelForCausalLM

    from safegene.method.lowmem import LowMemPlan

    if variant == "plain":
        g, twin = lr["gene"], lr["dense"]
    else:  # embedding and LM head adapters: the embedding hook and a factored head
        from peft import PeftModel

        ad = _adapter(lr["aligned"], tmp_path / "ad", **LORA_VARIANTS[variant])
        g = extract_from_adapter(ad, tmp_path / "gene", base=lr["aligned"])
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lr["aligned"]), str(ad)).merge_and_unload() \
            .save_pretrained(tmp_path / "degraded")
        twin = safegene.extract(lr["aligned"], tmp_path / "degraded", tmp_path / "twin", progress=False)
    keys = g.layer_keys()
    model = AutoModelForCausalLM.from_pretrained(lr["task"]).double().eval().requires_grad_(False)
    lam0 = [0.7 - 0.45 * i for i in range(len(keys))]
    monkeypatch.setattr(gene_mod, "densify", _no_densify)
    plan = LowMemPlan(model, g, keys)
    assert set(plan.names) == set(g.factored) and not plan._space  # every factored tensor is hooked
    assert all(isinstance(t, tuple) for t in plan.taus)
    fac = g.load_factors()
    assert plan.nbytes()["tau"] == sum(a.numel() * 4 + b.numel() * 4 for a, b in fac.values())
    got = _lam_grad(model, plan, lam0, IDS)
    monkeypatch.undo()
    assert bool((got.abs() > 1e-8).all())
    assert not any(m._forward_hooks for m in model.modules())
    taus64 = {n: b.double() @ a.double() for n, (a, b) in fac.items()}
    want = _weight_space_grad(model, plan, taus64, lam0, IDS)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13), (got, want)
    # the densified twin (dense F32 τ): the same gradient up to τ's float32 rounding
    tplan = LowMemPlan(model, twin, keys)
    assert tplan.keys == plan.keys and all(not isinstance(t, tuple) for t in tplan.taus)
    assert torch.allclose(_lam_grad(model, tplan, lam0, IDS), got, rtol=1e-5, atol=1e-9)


def test_inspect_shows_ranks(lr, capsys):
    info = safegene.inspect_gene(lr["gene"])
    assert info["format_version"] == 2 and info["factored"] == {n: 4 for n in lr["gene"].factored}
    assert info["n_dense"] == 0 and info["n_untouched"] == len(lr["gene"].manifest["lowrank"]["untouched"])
    assert [r["rank"] for r in info["layers"]] == [4, 4]
    assert cli.main(["inspect", str(lr["gene"].path)]) == 0
    text = capsys.readouterr().out
    assert "low-rank gene (format v2): 6 factored tensors (rank 4), 0 dense" in text and " rank " in text
    assert safegene.inspect_gene(lr["dense"])["factored"] == {}


def test_densify_is_the_float64_product():
    a, b = torch.randn(3, 5, dtype=torch.float32), torch.randn(4, 3, dtype=torch.float32)
    assert torch.equal(densify(a, b), (b.double() @ a.double()).float())
    assert math.isclose(gene_mod.factors_sq_norm(a, b), float((b.double() @ a.double()).norm() ** 2), rel_tol=1e-12)


# ---- errors ---------------------------------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    rc = cli.main([str(x) for x in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_adapter_rank_mismatch_is_refused(lr, tmp_path, capsys):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(lr["adapter"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    err = _cli_error(capsys, ["extract", lr["aligned"], f"{lr['aligned']}+{ad}", "-o", tmp_path / "g"])
    assert "rank 4 but adapter_config.json says r = 8" in err
    assert not (tmp_path / "g").exists()


def test_base_mismatch_is_refused(lr, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    perturbed(_model(torch.float32), 5).save_pretrained(other)
    with pytest.raises(MismatchError, match="is not the aligned model"):
        safegene.extract(lr["aligned"], f"{other}+{lr['adapter']}", tmp_path / "g1", progress=False)
    # the adapter names the local aligned directory as its base; --base points elsewhere
    err = _cli_error(capsys, ["extract", "--from-adapter", lr["adapter"], "--base", other, "-o", tmp_path / "g2"])
    assert "is not the aligned model" in err
    # a byte-identical copy of the aligned model is the same base
    shutil.copytree(lr["aligned"], tmp_path / "copy")
    g = safegene.extract(lr["aligned"], f"{tmp_path / 'copy'}+{lr['adapter']}", tmp_path / "g3", progress=False)
    assert g.factored == lr["gene"].factored
    # an adapter for another architecture does not fit at all
    import transformers as tf

    small = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    small.save_pretrained(tmp_path / "small")
    ad = tmp_path / "hub-named"
    shutil.copytree(lr["adapter"], ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/some-model"  # a Hub id: nothing local to compare with
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong base model"):
        extract_from_adapter(ad, tmp_path / "g4", base=tmp_path / "small")


def test_dora_and_non_lora_adapters_are_refused_in_one_line(lr, tmp_path, capsys):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    ad = _adapter(lr["aligned"], tmp_path / "dora", use_dora=True)
    err = _cli_error(capsys, ["extract", "--from-adapter", ad, "-o", tmp_path / "g"])
    assert "DoRA" in err
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(lr["aligned"]),
                         IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    err = _cli_error(capsys, ["extract", lr["aligned"], f"{lr['aligned']}+{tmp_path / 'ia3'}", "-o", tmp_path / "g"])
    assert "peft_type is 'IA3'" in err and not (tmp_path / "g").exists()


@pytest.mark.parametrize("variant", ["rslora+patterns", "embedding+head"])
def test_adapter_variants_round_trip(tmp_path, variant):
    """Per-module ranks and alphas, rsLoRA, and embedding/head adapters: applying the gene with
    λ = −1 to the aligned model gives the merged degrade (float64 reference)."""
    from tiny_models import LORA_VARIANTS

    _model(torch.float32).save_pretrained(tmp_path / "aligned")
    ad = _adapter(tmp_path / "aligned", tmp_path / "ad", **LORA_VARIANTS[variant])
    g = extract_from_adapter(ad, tmp_path / "gene", base=tmp_path / "aligned")
    ref = _tau64(tmp_path / "aligned", ad)
    assert {n: v["rank"] for n, v in g.factored.items()} == {n: int(t.shape[0]) for n, (t, _, _) in
                                                              safegene.lora_target_delta(tmp_path / "aligned", ad).items()}
    safegene.apply(g, tmp_path / "aligned", tmp_path / "out", scale=-1.0, budget_mb=0.001, progress=False)
    got, base = _load(tmp_path / "out" / "model.safetensors"), _load(tmp_path / "aligned" / "model.safetensors")
    for n, w in base.items():
        _close(got[n], w.double() - ref.get(n, 0.0), torch.float32, n)


def test_cli_argument_combinations(lr, tmp_path, capsys):
    rc = cli.main(["extract", str(lr["aligned"]), "--from-adapter", str(lr["adapter"]), "-o", str(tmp_path / "g")])
    assert rc == 2 and "--from-adapter takes no ALIGNED" in capsys.readouterr().err
    rc = cli.main(["extract", str(lr["aligned"]), "-o", str(tmp_path / "g")])
    assert rc == 2 and "give ALIGNED DEGRADED" in capsys.readouterr().err


def test_damaged_lowrank_gene_is_refused(lr, tmp_path):
    import shutil

    shutil.copytree(lr["gene"].path, tmp_path / "g")
    (tmp_path / "g" / FACTORS).unlink()
    with pytest.raises(GeneError, match="factors.safetensors is missing"):
        Gene.load(tmp_path / "g")
    shutil.rmtree(tmp_path / "g")
    shutil.copytree(lr["gene"].path, tmp_path / "g")
    man = json.loads((tmp_path / "g" / "gene.json").read_text())
    name = next(iter(man["factored"]))
    man["factored"][name]["rank"] = 5
    (tmp_path / "g" / "gene.json").write_text(json.dumps(man))
    with pytest.raises(GeneError, match="gene.json says rank 5"):
        Gene.load(tmp_path / "g").load_factors([name])
    man["format_version"] = 3
    (tmp_path / "g" / "gene.json").write_text(json.dumps(man))
    with pytest.raises(GeneError, match="version 3 is not supported"):
        Gene.load(tmp_path / "g")


def test_bf16_model_and_bf16_factors_report_their_rounding(tmp_path):
    _model(torch.bfloat16).save_pretrained(tmp_path / "aligned")
    ad = _adapter(tmp_path / "aligned", tmp_path / "ad")
    g = safegene.extract(tmp_path / "aligned", f"{tmp_path / 'aligned'}+{ad}", tmp_path / "gene", dtype="BF16", progress=False)
    ref = _tau64(tmp_path / "aligned", ad)
    w = _load(tmp_path / "aligned" / "model.safetensors")
    tot_err = tot = 0.0
    for n, (a, b) in g.load_factors().items():
        assert a.dtype == b.dtype == torch.bfloat16
        err = (b.double() @ a.double() - ref[n]).norm().item()
        st = g.manifest["tensors"][n]
        assert math.isclose(st["rounding_rel_error"], err / ref[n].norm().item(), rel_tol=1e-6)
        assert math.isclose(st["aligned_norm"], w[n].double().norm().item(), rel_tol=1e-9)
        tot_err += err**2
        tot += ref[n].norm().item() ** 2
    assert 1e-4 < g.manifest["rounding"]["rel_error"] < 1e-2
    assert math.isclose(g.manifest["rounding"]["rel_error"], math.sqrt(tot_err / tot), rel_tol=1e-6)


def test_lowrank_gene_save_pretrained_round_trip(lr, tmp_path):
    """The portable copy keeps factors.safetensors and records the adapter like a checkpoint (no local paths)."""
    g: Gene = lr["gene"]
    copy = Gene.load(g.save_pretrained(tmp_path / "share"))
    assert copy.factored == g.factored and copy.manifest["format_version"] == 2
    ref = g.load_factors()
    for n, (a, b) in copy.load_factors().items():
        assert torch.equal(a, ref[n][0]) and torch.equal(b, ref[n][1])
    text = (tmp_path / "share" / "gene.json").read_text()
    assert str(lr["root"]) not in text
    deg = copy.manifest["sources"]["degraded"]
    assert deg["kind"] == "peft-lora" and deg["name"] == "degrade-lora" and "sha256" in deg


def test_conv1d_gpt2_lowrank_gene_apply_and_exact_export(tmp_path):
    """GPT-2 stores linear weights as (in, out): factors follow the stored layout, and the export
    transposes them for PEFT's fan_in_fan_out."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import tiny_model

    tiny_model("gpt2").save_pretrained(tmp_path / "aligned")
    ad = _adapter(tmp_path / "aligned", tmp_path / "ad", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    g = extract_from_adapter(ad, tmp_path / "gene")
    ref = _tau64(tmp_path / "aligned", ad)
    assert set(g.factored) == set(ref) and all(v["shape"] == list(ref[n].shape) for n, v in g.factored.items())
    coeffs = {"layer.0": 0.5, "layer.1": -1.0}
    safegene.apply(g, tmp_path / "aligned", tmp_path / "out", coeffs=coeffs, progress=False)
    got, base = _load(tmp_path / "out" / "model.safetensors"), _load(tmp_path / "aligned" / "model.safetensors")
    lam = {"layer.0": 0.5, "layer.1": -1.0}
    for n, w in base.items():
        want = w.double() + (lam[g.layer_key(n)] * ref[n] if n in ref else 0.0)
        _close(got[n], want, torch.float32, n)
    info = safegene.export_lora(g, tmp_path / "lora", coeffs=coeffs, progress=False)
    assert info["rel_error"] < 1e-7 and all(m["exact"] for m in info["modules"].values())
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        want_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=IDS).logits
        got_logits = pm(input_ids=IDS).logits
    assert (got_logits - want_logits).abs().max().item() < 1e-4
