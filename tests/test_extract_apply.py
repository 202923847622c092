"""extract and apply on real tiny HF checkpoints, against float64 references."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import safegene
from safegene import cli
from safegene.io.checkpoint import read_header

from conftest import perturbed, tiny_model


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    sign_bit = 1 << (torch.finfo(a.dtype).bits - 1)

    def ordered(x):
        i = x.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i + sign_bit), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


COEFFS = {"embed": 0.25, "layer.0": 0.5, "layer.1": 1.5, "lm_head": -0.75}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_extract_and_apply_match_float64_reference(family, tmp_path, arch, dtype):
    fam = family(arch, dtype, shards=(None, "6KB", "9KB"))
    gene = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "gene", progress=False)
    A, D, T = (load_dir(fam[k]) for k in ("aligned", "degraded", "task"))
    tau = load_file(str(gene.vectors_path))
    assert set(tau) == set(A)
    for n, t in tau.items():
        assert t.dtype == torch.float32
        if dtype == "F32":
            assert torch.equal(t, A[n] - D[n])  # one float32 rounding
        else:
            assert torch.equal(t.double(), A[n].double() - D[n].double())  # exact: lossless F32 policy

    coeffs = {k: v for k, v in COEFFS.items() if k in gene.layer_keys()}  # GPT-2 ties lm_head: no such key
    res = safegene.apply(gene, fam["task"], tmp_path / "out", coeffs=coeffs, progress=False)
    out = load_dir(tmp_path / "out")
    assert set(out) == set(T)
    for n, w in out.items():
        lam = coeffs.get(gene.layer_key(n), 0.0)
        lam32 = float(np.float32(lam))
        assert w.dtype == T[n].dtype  # the target's dtype is kept
        if lam == 0.0:
            assert torch.equal(w.view(torch.uint8), T[n].view(torch.uint8))  # copied byte for byte
            continue
        ref = T[n].double() + lam32 * tau[n].double()
        if dtype == "F32":
            bound = 2**-24 * (ref.abs() + (lam32 * tau[n].double()).abs()) * 1.001
            assert bool(((w.double() - ref).abs() <= bound).all()), n
        else:
            assert ulp_distance(w, ref.to(w.dtype)) <= 1, n
    assert res.n_patched == sum(1 for n in T if coeffs.get(gene.layer_key(n), 0.0) != 0.0) > 0


def test_output_is_a_complete_hf_directory_with_identical_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = family("llama", "BF16", shards=("5KB", None, "7KB"))
    safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "gene", progress=False)
    safegene.apply(tmp_path / "gene", fam["task"], tmp_path / "out", coeffs={"layer.1": 0.8, "layer.2": 1.2}, progress=False)
    out = tmp_path / "out"
    n_in = len(list(fam["task"].glob("*.safetensors")))
    shards = sorted(out.glob("*.safetensors"))
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n_in:05d}.safetensors" for i in range(1, n_in + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards for t in read_header(s).tensors.values())
    assert all(read_header(s).metadata == {"format": "pt"} for s in shards)
    assert (out / "config.json").read_text() == (fam["task"] / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".out.safegene-tmp-*"))

    # Reference: the same merge done in float64 on the loaded task model.
    task = AutoModelForCausalLM.from_pretrained(fam["task"])
    A, D = load_dir(fam["aligned"]), load_dir(fam["degraded"])
    sd = task.state_dict()
    with torch.no_grad():
        for n, p in sd.items():
            lam = {"layer.1": 0.8, "layer.2": 1.2}.get(safegene.layer_key(n), 0.0)
            lam = float(np.float32(lam))
            p.copy_((p.double() + lam * (A[n].double() - D[n].double())).to(p.dtype))
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 40, 2]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, task(ids).logits)


def test_stats_match_numpy(family, tmp_path):
    fam = family("llama", "F32")
    gene = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "gene", progress=False)
    A, D = load_dir(fam["aligned"]), load_dir(fam["degraded"])
    for n, st in gene.manifest["tensors"].items():
        a, d = A[n].double().numpy().ravel(), D[n].double().numpy().ravel()
        tau = (A[n] - D[n]).double().numpy().ravel()
        assert st["tau_norm"] == pytest.approx(np.linalg.norm(tau), rel=1e-5)
        assert st["aligned_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-5)
        assert st["degraded_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
        assert st["rel_change"] == pytest.approx(np.linalg.norm(tau) / np.linalg.norm(a), rel=1e-5)
        assert st["cosine"] == pytest.approx(a @ d / (np.linalg.norm(a) * np.linalg.norm(d)), rel=1e-5)
        assert st["layer"] == safegene.layer_key(n)
    m = gene.manifest
    assert m["fingerprint"]["model_type"] == "llama"
    assert m["fingerprint"]["tensors"]["lm_head.weight"] == {"shape": [96, 32], "dtype": "F32"}
    assert m["sources"]["aligned"]["files"][0]["header_sha256"] == __import__("hashlib").sha256(
        (fam["aligned"] / "model.safetensors").read_bytes()[8 : 8 + read_header(fam["aligned"] / "model.safetensors").header_len]
    ).hexdigest()
    assert m["sources"]["degraded"]["config"]["model_type"] == "llama"


def test_bf16_storage_reports_its_rounding_error(family, tmp_path):
    fam = family("llama", "F32")
    g = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "gene", dtype="BF16", progress=False)
    A, D = load_dir(fam["aligned"]), load_dir(fam["degraded"])
    stored = load_file(str(g.vectors_path))
    num = den = 0.0
    for n, t in stored.items():
        exact = (A[n] - D[n]).double()
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, (A[n] - D[n]).to(torch.bfloat16))  # RNE of the float32 difference
        num += float(((t.double() - exact) ** 2).sum())
        den += float((exact**2).sum())
    assert g.manifest["rounding"]["rel_error"] == pytest.approx(math.sqrt(num / den), rel=1e-4)
    assert 1e-4 < g.manifest["rounding"]["rel_error"] < 4e-3  # about half a bf16 ulp, relative


def test_tiny_budget_splits_tensors_and_gives_the_same_bytes(family, tmp_path):
    fam = family("llama", "BF16")
    g1 = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "g1", progress=False)
    g2 = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "g2", budget_mb=0.01, progress=False)
    assert g2.manifest["stream"]["buffer_bytes"] < g1.manifest["stream"]["buffer_bytes"]
    assert (tmp_path / "g1/vectors.safetensors").read_bytes() == (tmp_path / "g2/vectors.safetensors").read_bytes()
    safegene.apply(g1, fam["task"], tmp_path / "o1", scale=0.7, progress=False)
    safegene.apply(g1, fam["task"], tmp_path / "o2", scale=0.7, budget_mb=0.01, progress=False)
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o2/model.safetensors").read_bytes()


@pytest.mark.parametrize("mode", ["kick", "pace:1"])
def test_writeback_pacing_writes_the_same_bytes(family, tmp_path, monkeypatch, mode):
    """SAFEGENE_WRITEBACK (sync_file_range after each chunk; ``pace:1`` waits once more than 1 MiB
    of this stream is dirty, i.e. after nearly every chunk of a tiny budget) changes when the
    kernel writes, never what: extract and apply give the default's bytes."""
    fam = family("llama", "BF16")
    ref = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "g0", budget_mb=0.05, progress=False)
    safegene.apply(ref, fam["task"], tmp_path / "o0", scale=0.7, budget_mb=0.05, progress=False)
    monkeypatch.setenv("SAFEGENE_WRITEBACK", mode)
    g = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "g1", budget_mb=0.05, progress=False)
    safegene.apply(g, fam["task"], tmp_path / "o1", scale=0.7, budget_mb=0.05, progress=False)
    assert (tmp_path / "g1/vectors.safetensors").read_bytes() == (tmp_path / "g0/vectors.safetensors").read_bytes()
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o0/model.safetensors").read_bytes()


def test_several_targets_and_apply_to_model_agree(family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = family("qwen2", "BF16")
    other = perturbed(AutoModelForCausalLM.from_pretrained(fam["task"]), 7)
    other.save_pretrained(tmp_path / "task2")
    g = safegene.extract(fam["aligned"], fam["degraded"], tmp_path / "gene", progress=False)
    res = safegene.apply(g, [fam["task"], tmp_path / "task2"], [tmp_path / "o1", tmp_path / "o2"], scale=1.0, progress=False)
    assert [r.out for r in res] == [tmp_path / "o1", tmp_path / "o2"]
    for tgt, o in ((fam["task"], "o1"), (tmp_path / "task2", "o2")):
        m = AutoModelForCausalLM.from_pretrained(tgt)
        used = safegene.apply_to_model(m, g, scale=1.0)
        assert len(used) == len(g.tensor_names)
        disk = load_dir(tmp_path / o)
        for n, p in m.state_dict().items():
            assert torch.equal(p, disk[n]), n


def test_apply_to_model_patches_tied_weights_once(tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    a = tf.LlamaForCausalLM(cfg)
    d = perturbed(a, 1)
    a.save_pretrained(tmp_path / "a")
    d.save_pretrained(tmp_path / "d")
    g = safegene.extract(tmp_path / "a", tmp_path / "d", tmp_path / "g", progress=False)
    m = perturbed(a, 2)
    m.tie_weights()
    before = m.model.embed_tokens.weight.detach().clone()
    assert "lm_head" not in g.layer_keys()  # tied: the checkpoint stores the embedding once
    used = safegene.apply_to_model(m, g, {"embed": 1.0})
    assert list(used) == ["model.embed_tokens.weight"]
    tau = load_file(str(g.vectors_path))["model.embed_tokens.weight"]
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(m.model.embed_tokens.weight, before + tau, atol=1e-6)


# ---- bad input: one line, exit 1 (2 for usage), nothing left behind -------------------------------------
def run_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what the fixtures printed
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def assert_one_error(code, err, match, want=1):
    # What a terminal shows: a progress bar clears itself with carriage returns.
    lines = [l.split("\r")[-1] for l in err.split("\n")]
    lines = [l for l in lines if l.strip()]
    assert code == want, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    import re

    assert re.search(match, lines[0]), lines[0]


def no_output(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}.safegene-tmp-*"))


def test_cli_happy_path(family, tmp_path, capsys):
    fam = family("llama", "BF16")
    code, _ = run_cli(capsys, "extract", fam["aligned"], fam["degraded"], "-o", tmp_path / "gene", "--quiet")
    assert code == 0
    (tmp_path / "c.json").write_text(json.dumps({"format": "safegene-coeffs", "format_version": 1, "coeffs": {"layer.2": 1.0}}))
    code = cli.main(["apply", str(tmp_path / "gene"), str(fam["task"]), "-o", str(tmp_path / "out"), "--coeffs", str(tmp_path / "c.json"), "--quiet", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["patched"] == 9


def test_bad_inputs(family, tmp_path, capsys):
    fam = family("llama", "F32")
    gene = tmp_path / "gene"
    assert run_cli(capsys, "extract", fam["aligned"], fam["degraded"], "-o", gene, "--quiet")[0] == 0
    out = tmp_path / "out"

    code, err = run_cli(capsys, "extract", tmp_path / "missing", fam["degraded"], "-o", out)
    assert_one_error(code, err, "missing: no such file or directory")
    assert no_output(out)

    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    code, err = run_cli(capsys, "apply", gene, pk, "-o", out, "--scale", "1")
    assert_one_error(code, err, r"pytorch_model.bin: pickled checkpoints are refused")
    assert no_output(out)

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    raw = (fam["degraded"] / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    code, err = run_cli(capsys, "extract", fam["aligned"], trunc, "-o", out)
    assert_one_error(code, err, r"trunc/model.safetensors: .*truncated")
    assert no_output(out)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops" + raw[100:])
    code, err = run_cli(capsys, "extract", fam["aligned"], corrupt, "-o", out)
    assert_one_error(code, err, "header is not valid JSON")

    other = tmp_path / "other"
    tiny_model("qwen2").save_pretrained(other)
    code, err = run_cli(capsys, "extract", fam["aligned"], other, "-o", out)
    assert_one_error(code, err, "different tensors|different architectures|'qwen2'")
    assert no_output(out)
    code, err = run_cli(capsys, "apply", gene, other, "-o", out, "--scale", "1")
    assert_one_error(code, err, r"extracted from model_type 'llama' but .* is 'qwen2'")
    assert no_output(out)

    wide = tmp_path / "wide"
    sd = load_dir(fam["task"])
    sd["lm_head.weight"] = torch.zeros(96, 33)
    wide.mkdir()
    save_file(sd, str(wide / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_cli(capsys, "apply", gene, wide, "-o", out, "--scale", "1")
    assert_one_error(code, err, r"tensor 'lm_head.weight' has shape \[96, 33\] in the target")
    assert no_output(out)

    f64 = tmp_path / "f64"
    f64.mkdir()
    save_file({k: v.double() for k, v in load_dir(fam["degraded"]).items()}, str(f64 / "model.safetensors"))
    code, err = run_cli(capsys, "extract", fam["aligned"], f64, "-o", out)
    assert_one_error(code, err, "is F64, which safegene does not compute on")

    code, err = run_cli(capsys, "apply", gene, fam["task"], "-o", fam["task"] / "sub", "--scale", "1")
    assert_one_error(code, err, "would overwrite, contain or land inside the input")
    code, err = run_cli(capsys, "apply", gene, fam["task"], "-o", fam["task"], "--scale", "1")
    assert_one_error(code, err, "would overwrite, contain or land inside the input")

    code, err = run_cli(capsys, "apply", gene, fam["task"], "-o", out, "--coeffs", tmp_path / "nocoeffs.json")
    assert_one_error(code, err, "no such coefficients file", want=2)
    (tmp_path / "badkey.json").write_text(json.dumps({"coeffs": {"layer.99": 1.0}}))
    code, err = run_cli(capsys, "apply", gene, fam["task"], "-o", out, "--coeffs", tmp_path / "badkey.json")
    assert_one_error(code, err, r"\['layer.99'\] which the gene")
    assert no_output(out)

    with pytest.raises(SystemExit) as exc:
        cli.main(["apply", str(gene), str(fam["task"]), "-o", str(out)])
    assert exc.value.code == 2

    out.mkdir()
    (out / "keep").write_text("x")
    code, err = run_cli(capsys, "apply", gene, fam["task"], "-o", out, "--scale", "1")
    assert_one_error(code, err, "already exists; choose a new path or pass --overwrite")
    assert (out / "keep").read_text() == "x"


def test_nonfinite_values_are_refused_unless_allowed(family, tmp_path, capsys):
    fam = family("llama", "F32")
    sd = load_dir(fam["degraded"])
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, err = run_cli(capsys, "extract", fam["aligned"], bad, "-o", tmp_path / "g")
    assert_one_error(code, err, r"non-finite values .*'model.layers.0.mlp.up_proj.weight'.*--allow-nonfinite")
    assert no_output(tmp_path / "g")
    assert run_cli(capsys, "extract", fam["aligned"], bad, "-o", tmp_path / "g", "--allow-nonfinite", "--quiet")[0] == 0
    code, err = run_cli(capsys, "apply", tmp_path / "g", fam["task"], "-o", tmp_path / "o", "--scale", "1")
    assert_one_error(code, err, "would hold NaN/Inf")
    assert no_output(tmp_path / "o")
