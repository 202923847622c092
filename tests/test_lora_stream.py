"""``apply GENE BASE+ADAPTER``: a PEFT LoRA task update merged chunk by chunk inside the stream.

References: a float64 merge ``round(round(W + s·B@A) + λτ)`` per tensor, and PEFT's own
``merge_and_unload()`` followed by ``apply_to_model`` for logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import safegene  # noqa: E402
from safegene import cli  # noqa: E402
from safegene.coeffs import resolve_coeffs  # noqa: E402
from safegene.engine.stream import Plan, run_plan  # noqa: E402
from safegene.io.checkpoint import OutTensor, create_files, open_checkpoint, plan_file  # noqa: E402
from safegene.errors import SafeGeneError  # noqa: E402

from conftest import perturbed, tiny_model  # noqa: E402
from tiny_models import LORA_VARIANTS as VARIANTS, make_adapter  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 71], [4, 4, 8, 15, 16, 23, 42, 90]])
COEFFS = {"layer.1": 0.7, "final_norm": 1.0, "lm_head": 0.5}  # layer 0 keeps λ = 0: LoRA on a copied tensor


def _family(root: Path, arch: str, dtype: "torch.dtype") -> dict:
    aligned = tiny_model(arch).to(dtype)
    degraded = perturbed(aligned, 1, scale=0.2)
    task = perturbed(degraded, 2)
    out = {}
    for name, m in (("aligned", aligned), ("degraded", degraded), ("task", task)):
        m.save_pretrained(root / name)
        out[name] = root / name
    out["gene"] = safegene.extract(out["aligned"], out["degraded"], root / "gene", progress=False)
    return out


def _round(x: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    return x.to(torch.float32).to(dtype).to(torch.float64)


def _ulps_apart(a: "torch.Tensor", b: "torch.Tensor") -> int:
    """Largest distance in units of the last place between two same-dtype tensors (finite, same sign region)."""
    ia = a.contiguous().view(torch.int16 if a.element_size() == 2 else torch.int32).to(torch.int64)
    ib = b.contiguous().view(torch.int16 if b.element_size() == 2 else torch.int32).to(torch.int64)
    return int((ia - ib).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["F32", "BF16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_lora_target_matches_float64_merge_then_apply(tmp_path, variant, dtype):
    from safetensors.torch import load_file

    fam = _family(tmp_path, "llama", dtype)
    make_adapter(fam["task"], tmp_path / "ad", **VARIANTS[variant])
    res = safegene.apply(fam["gene"], f"{fam['task']}+{tmp_path / 'ad'}", tmp_path / "out", coeffs=COEFFS, progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(fam["task"] / "model.safetensors")
    tau = load_file(fam["gene"].path / "vectors.safetensors")
    lam = resolve_coeffs(fam["gene"], None, COEFFS)
    deltas = safegene.lora_target_delta(fam["task"], tmp_path / "ad")
    assert deltas and all(n in got for n in deltas)
    assert res.n_patched == len(set(deltas) | {n for n, c in lam.items() if c})
    for n, w in base.items():
        ref = w.double()
        if n in deltas:
            a, b, s = deltas[n]
            ref = _round(ref + s * (b.double() @ a.double()), dtype)
        if lam.get(n, 0.0):
            ref = _round(ref + lam[n] * tau[n].double(), dtype)
        assert got[n].dtype == w.dtype
        if dtype == torch.float32:
            tol = 1e-6 * (ref.abs().max().item() + 1.0)
            assert (got[n].double() - ref).abs().max().item() <= tol, n
        else:  # two roundings in float32 against float64 sums: at most one bf16 ulp apart
            assert _ulps_apart(got[n], ref.to(dtype)) <= 1, n
        if n not in deltas and not lam.get(n, 0.0):
            assert torch.equal(got[n], w), n  # untouched tensors keep their exact bytes


def test_streamed_lora_logits_equal_peft_merge_and_unload_then_patch(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam = _family(tmp_path, "llama", torch.float32)
    make_adapter(fam["task"], tmp_path / "ad", **VARIANTS["plain"])
    safegene.apply(fam["gene"], f"{fam['task']}+{tmp_path / 'ad'}", tmp_path / "out", coeffs=COEFFS, progress=False)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam["task"]), str(tmp_path / "ad")).merge_and_unload()
    safegene.apply_to_model(merged, fam["gene"], COEFFS)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = merged.eval()(input_ids=IDS).logits.double()
        got = streamed(input_ids=IDS).logits.double()
        plain = AutoModelForCausalLM.from_pretrained(fam["task"]).eval()(input_ids=IDS).logits.double()
    assert (got - want).abs().max().item() < 1e-5
    assert (got - plain).abs().max().item() > 1e-2  # the adapter and the gene both moved the model


def test_streamed_lora_on_conv1d_gpt2(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam = _family(tmp_path, "gpt2", torch.float32)
    make_adapter(fam["task"], tmp_path / "ad", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    coeffs = {"layer.0": 0.5, "layer.1": 1.0}
    safegene.apply(fam["gene"], f"{fam['task']}+{tmp_path / 'ad'}", tmp_path / "out", coeffs=coeffs, progress=False)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam["task"]), str(tmp_path / "ad")).merge_and_unload()
    safegene.apply_to_model(merged, fam["gene"], coeffs)
    with torch.no_grad():
        want = merged.eval()(input_ids=IDS).logits.double()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(input_ids=IDS).logits.double()
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(301, 77, 5), (37, 600, 3)])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_core_lowrank_term_with_chunks_cut_mid_row(tmp_path, dtype, shape):
    """Chunks of 4096 elements and kernel blocks of 1024 cut a 301 x 77 matrix mid-row (and 77
    columns leave a tail after the kernel's 16-column tiles); 600 columns span three of the
    four-row path's packed column blocks (256, 256, 88: five tiles and an 8-column tail), and a
    4096-element chunk holds one group of four whole rows between two partial ones."""
    rows, cols, rank = shape
    rng = np.random.default_rng(0)
    tdt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)).to(tdt)
    v = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    a = rng.standard_normal((rank, cols)).astype(np.float32)
    b = rng.standard_normal((rows, rank)).astype(np.float32)
    from safetensors.torch import save_file as save_t

    save_t({"w": w, "v": v}, str(tmp_path / "in.safetensors"))
    ck = open_checkpoint(tmp_path / "in.safetensors")
    outs = [OutTensor("w", dtype, (rows, cols), w.numel() * w.element_size()), OutTensor("c", dtype, (rows, cols), w.numel() * w.element_size())]
    f = plan_file(tmp_path / "out.safetensors", outs)
    create_files([f])
    plan = Plan().expect(ck.files)
    plan.add(f.path, f.tensors[0].offset, dtype, rows * cols, [(ck.tensors["w"], 1.0), (ck.tensors["v"], 0.25)], lowrank=(a, b, 0.5))
    plan.add(f.path, f.tensors[1].offset, dtype, rows * cols, [(ck.tensors["w"], 1.0)], lowrank=(a, b, -2.0))  # copy path
    res = run_plan(plan, 1, "t", progress=False, stats="guard")
    assert res["chunk_elems"] == 4096
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out.safetensors")
    ba = torch.from_numpy(b).double() @ torch.from_numpy(a).double()
    ref_w = _round(w.double() + 0.5 * ba, tdt)
    ref_w = _round(ref_w + 0.25 * v.double(), tdt)
    ref_c = _round(w.double() + (-2.0) * ba, tdt)
    for g_, r in ((got["w"], ref_w), (got["c"], ref_c)):
        if dtype == "F32":
            assert (g_.double() - r).abs().max().item() <= 1e-5 * r.abs().max().item()
        else:
            # two roundings into the dtype (the term merged into the input, then the sum): a
            # float32 B·A a hair from a rounding boundary can move the first one by one ulp
            assert _ulps_apart(g_, r.to(tdt)) <= 2
    # exact bits: the term is (B @ A) in float32, summed over the rank in order (no contraction),
    # then scaled, then added to the input in float32, then one rounding -- whichever path of the
    # kernel (four whole rows at a time, one row segment, column tiles and their tails) ran
    d = np.zeros((rows, cols), dtype=np.float32)
    for q in range(rank):
        d = d + b[:, q:q + 1] * a[q:q + 1, :]
    assert torch.equal(got["c"], (w.float() + torch.from_numpy(d) * -2.0).to(tdt))


def test_core_refuses_bad_lowrank_terms(tmp_path):
    from safegene.engine.native import core
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(6, 4), "i": torch.zeros(6, 4, dtype=torch.int32)}, str(tmp_path / "in.safetensors"))
    ck = open_checkpoint(tmp_path / "in.safetensors")
    f = plan_file(tmp_path / "o.safetensors", [OutTensor("w", "F32", (6, 4), 96), OutTensor("i", "I32", (6, 4), 96)])
    create_files([f])
    a, b = np.ones((2, 4), np.float32), np.ones((6, 2), np.float32)

    def run(terms, job="w"):
        plan = Plan().expect(ck.files)
        t = ck.tensors[job]
        plan.add(f.path, f.tensors[0 if job == "w" else 1].offset, t.dtype, 24, [(t, 1.0)])
        return core().run_stream(plan.in_paths, plan.in_sizes, plan.in_mtimes, plan.out_paths, plan.jobs, 1 << 20, 4, None,
                                 core().StatsLevel.GUARD, terms)

    run([(0, a, b, 1.0)])
    with pytest.raises(core().CoreError, match="names job 3"):
        run([(3, a, b, 1.0)])
    with pytest.raises(core().CoreError, match="rank >= 1"):
        run([(0, a, np.ones((6, 3), np.float32), 1.0)])
    with pytest.raises(core().CoreError, match="low-rank term of 6 x 5 for 24 elements"):
        run([(0, np.ones((2, 5), np.float32), b, 1.0)])
    with pytest.raises(core().CoreError, match="two low-rank terms"):
        run([(0, a, b, 1.0), (0, a, b, 1.0)])
    with pytest.raises(core().CoreError, match="non-float input"):
        run([(0, a, b, 1.0)], job="i")


def test_cli_apply_lora_target(tmp_path, capsys):
    fam = _family(tmp_path, "llama", torch.float32)
    make_adapter(fam["task"], tmp_path / "ad", **VARIANTS["plain"])
    (tmp_path / "c.json").write_text(json.dumps(COEFFS))
    rc = cli.main(["apply", str(fam["gene"].path), f"{fam['task']}+{tmp_path / 'ad'}", "-o", str(tmp_path / "out"),
                   "--coeffs", str(tmp_path / "c.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "out" / "config.json").is_file()
    # the adapter directory is an input: writing into it is refused
    rc = cli.main(["apply", str(fam["gene"].path), f"{fam['task']}+{tmp_path / 'ad'}", "-o", str(tmp_path / "ad" / "x"),
                   "--scale", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "inside the input" in err and str(tmp_path / "ad") in err
    with pytest.raises(SafeGeneError, match="DoRA"):
        make_adapter(fam["task"], tmp_path / "dora", r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
        safegene.apply(fam["gene"], f"{fam['task']}+{tmp_path / 'dora'}", tmp_path / "out2", scale=1.0, progress=False)


def test_calibrate_and_eval_loaders_take_a_lora_target(tmp_path):
    """The one model loader (``safegene.lm.load_model``, used by select, calibrate and eval) sees the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safegene import lm

    import tiny_models

    fam = _family(tmp_path, "llama", torch.float32)
    tiny_models.make_tokenizer().save_pretrained(fam["task"])
    make_adapter(fam["task"], tmp_path / "ad", **VARIANTS["rslora+patterns"])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fam["task"]), str(tmp_path / "ad")).merge_and_unload().eval()
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        m, _tok = lm.load_model(f"{fam['task']}+{tmp_path / 'ad'}", device="cpu")
        assert (m(input_ids=IDS).logits - want).abs().max().item() < 1e-5
    with pytest.raises(SafeGeneError, match="nowhere: no such file or directory"):
        lm.load_model(f"{fam['task']}+{tmp_path / 'nowhere'}")
    with pytest.raises(SafeGeneError, match="not a PEFT adapter directory"):
        lm.load_model(f"{fam['task']}+{fam['aligned']}")
