"""LoRA out (gene -> PEFT adapter) and LoRA in (PEFT adapter -> per-tensor deltas)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import safegene  # noqa: E402
from safegene import cli  # noqa: E402
from safegene.errors import CheckpointError, GeneError, UsageError  # noqa: E402
from safegene import export_lora, lora_target_delta, merge_lora_into_model  # noqa: E402

from conftest import perturbed, tiny_model  # noqa: E402
from tiny_models import LORA_VARIANTS as VARIANTS, make_adapter  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 71], [4, 4, 8, 15, 16, 23, 42, 90]])


def _logits(model) -> "torch.Tensor":
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    aligned = tiny_model("llama")
    degraded = perturbed(aligned, 1, scale=0.2)
    task = perturbed(degraded, 2)
    out = {"root": root}
    for name, m in (("aligned", aligned), ("degraded", degraded), ("task", task)):
        m.save_pretrained(root / name)
        out[name] = root / name
    out["gene"] = safegene.extract(out["aligned"], out["degraded"], root / "gene", progress=False)
    return out


def _task(fam):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fam["task"]).eval()


def _peft_logits(fam, adapter: Path):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_task(fam), str(adapter)).eval()
    return pm, _logits(pm)


COEFFS = {"layer.1": 0.7, "layer.2": 1.3, "final_norm": 1.0}


def test_full_rank_adapter_loads_in_peft_and_matches_dense_apply(fam):
    from transformers import AutoModelForCausalLM

    info = export_lora(fam["gene"], fam["root"] / "full", coeffs=COEFFS, rank=64, progress=False)
    cfg = json.loads((fam["root"] / "full" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == 32  # capped at min(out, in)
    # a local aligned model has no Hub id to record, and a local path would not travel: unset, with a
    # warning (a Hub-cached aligned model is recorded by id and commit: tests/test_hub_interop.py)
    assert cfg["base_model_name_or_path"] is None and cfg["revision"] is None and cfg["fan_in_fan_out"] is False
    # k/v projections are 16 x 32 (two KV heads): their full rank 16 reaches PEFT through rank_pattern
    assert cfg["rank_pattern"] == {rf"model\.layers\.{i}\.self_attn\.{m}": 16 for i in (1, 2) for m in ("k_proj", "v_proj")}
    # only the 7 linear weights of each of the two layers with λ ≠ 0
    assert len(cfg["target_modules"]) == 14
    assert all(m.startswith(("model.layers.1.", "model.layers.2.")) for m in cfg["target_modules"])
    assert info["rel_error"] < 1e-5 and info["max_module_rel_error"] < 1e-5
    # dense apply on disk, exactly as users run it
    dense_dir = safegene.apply(fam["gene"], fam["task"], fam["root"] / "dense", coeffs=COEFFS, progress=False).out
    dense = _logits(AutoModelForCausalLM.from_pretrained(dense_dir).eval())
    # the dense result also moved the final norm and the layer norms, which LoRA cannot carry:
    # compare against dense apply restricted to the exported modules
    lin = {m + ".weight": c for m, c in ((m, info["modules"][m]["lambda"]) for m in info["modules"])}
    ref_model = _task(fam)
    safegene.apply_to_model(ref_model, fam["gene"], lin)
    ref = _logits(ref_model)
    _, got = _peft_logits(fam, fam["root"] / "full")
    assert (got - ref).abs().max().item() < 1e-4
    base = _logits(_task(fam))
    assert (dense - base).abs().max().item() > 1e-2  # the patch does something
    # dropped tensors are reported with their share of ‖λτ‖
    assert set(info["dropped"]) == {"model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                                    "model.layers.2.input_layernorm.weight", "model.layers.2.post_attention_layernorm.weight",
                                    "model.norm.weight"}
    assert all("norm" in d["reason"] or "non-linear" in d["reason"] for d in info["dropped"].values())
    sq = sum(d["norm"] ** 2 for d in info["dropped"].values())
    tot = sq + sum(m["norm"] ** 2 for m in info["modules"].values())
    assert info["dropped_share"] == pytest.approx(math.sqrt(sq / tot), rel=1e-9)
    assert 0 < info["dropped_share"] < 0.5
    side = json.loads((fam["root"] / "full" / "safegene_lora.json").read_text())
    assert side["modules"].keys() == info["modules"].keys() and side["rel_error"] == info["rel_error"]


@pytest.mark.parametrize("rank", [3])
def test_low_rank_error_is_the_reported_error_and_logits_move_toward_dense(fam, rank):
    out = fam["root"] / f"r{rank}"
    info = export_lora(fam["gene"], out, coeffs={"layer.1": 0.7, "layer.2": 1.3}, rank=rank, progress=False)
    assert {m["rank"] for m in info["modules"].values()} == {rank}
    pm, got = _peft_logits(fam, out)
    merged = pm.merge_and_unload()
    want_model = _task(fam)
    applied = safegene.apply_to_model(want_model, fam["gene"], {m + ".weight": v["lambda"] for m, v in info["modules"].items()})
    assert len(applied) == len(info["modules"])
    task_sd = _task(fam).state_dict()
    md, wd = merged.state_dict(), want_model.state_dict()
    for mod, v in info["modules"].items():
        n = mod + ".weight"
        err = (md[n].double() - wd[n].double()).norm() / (wd[n].double() - task_sd[n].double()).norm()
        assert err.item() == pytest.approx(v["rel_error"], rel=1e-3, abs=1e-6)
        assert 0.05 < v["rel_error"] < 1.0  # a random τ is far from low rank
    # the adapter moves the outputs toward the dense result
    dense, base = _logits(want_model), _logits(_task(fam))
    assert (got - dense).norm() < (base - dense).norm()


def test_energy_picks_the_smallest_rank_reaching_the_fraction(fam):
    info = export_lora(fam["gene"], fam["root"] / "e90", coeffs={"layer.0": 1.0}, energy=0.9, progress=False)
    cfg = json.loads((fam["root"] / "e90" / "adapter_config.json").read_text())
    ranks = {m: v["rank"] for m, v in info["modules"].items()}
    assert len(set(ranks.values())) > 1  # q/k/v/o/mlp differ, so the rank pattern is used
    assert cfg["r"] == max(ranks.values()) and cfg["rank_pattern"] == cfg["alpha_pattern"]
    taus = info["gene"]
    g = safegene.Gene.load(taus)
    for mod, v in info["modules"].items():
        s = torch.linalg.svdvals(g.load_vectors([mod + ".weight"])[mod + ".weight"].double())
        e = (s**2).cumsum(0) / (s**2).sum()
        assert e[v["rank"] - 1] >= 0.9 - 1e-9
        assert v["rank"] == 1 or e[v["rank"] - 2] < 0.9
        assert v["rel_error"] == pytest.approx(math.sqrt(1 - v["energy"]), rel=1e-3)
    # the per-module ranks reach PEFT through rank_pattern
    pm, _ = _peft_logits(fam, fam["root"] / "e90")
    for mod, r in ranks.items():
        layer = pm.get_submodule("base_model.model." + mod)
        assert layer.r["default"] == r and layer.scaling["default"] == 1.0


def test_export_refusals(fam, tmp_path):
    with pytest.raises(UsageError, match="exactly one of a rank"):
        export_lora(fam["gene"], tmp_path / "x", rank=2, energy=0.5, progress=False)
    with pytest.raises(UsageError, match="exactly one of a rank"):
        export_lora(fam["gene"], tmp_path / "x", progress=False)
    with pytest.raises(UsageError, match="energy must be"):
        export_lora(fam["gene"], tmp_path / "x", energy=1.5, progress=False)
    with pytest.raises(UsageError, match="no linear weight|none of the"):
        export_lora(fam["gene"], tmp_path / "x", coeffs={"final_norm": 1.0}, rank=2, progress=False)
    with pytest.raises(GeneError, match="does not have"):
        export_lora(fam["gene"], tmp_path / "x", coeffs={"layer.9": 1.0}, rank=2, progress=False)
    assert not (tmp_path / "x").exists()


def test_conv1d_models_export_with_fan_in_fan_out(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = tiny_model("gpt2")
    a.save_pretrained(tmp_path / "a")
    perturbed(a, 1).save_pretrained(tmp_path / "d")
    g = safegene.extract(tmp_path / "a", tmp_path / "d", tmp_path / "g", progress=False)
    info = export_lora(g, tmp_path / "x", coeffs={"layer.1": 0.8}, rank=32, progress=False)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert sorted(info["modules"]) == [f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert info["rel_error"] < 1e-5 and any("bias" in d["reason"] for d in info["dropped"].values())
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    safegene.apply_to_model(want, g, {m + ".weight": 0.8 for m in info["modules"]})
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval(), str(tmp_path / "x")).eval()
    assert (_logits(got) - _logits(want)).abs().max().item() < 1e-4
    # and LoRA-in reads it back with the transposition undone
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    merge_lora_into_model(merged, tmp_path / "x")
    assert (_logits(merged) - _logits(want)).abs().max().item() < 1e-4


def test_cli_export_lora(fam, capsys):
    out = fam["root"] / "cli"
    (fam["root"] / "c.json").write_text(json.dumps({"coeffs": {"layer.2": 1.0}}))
    rc = cli.main(["export-lora", str(fam["gene"].path), "--coeffs", str(fam["root"] / "c.json"), "--rank", "3", "-o", str(out), "--json", "--quiet",
                   "--base-model", "org/task-model"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/task-model"
    assert s["n_modules"] == 7 and s["rank_max"] == 3 and len(s["dropped"]) == 2
    rc = cli.main(["export-lora", str(fam["gene"].path), "--rank", "3", "-o", str(out), "--quiet"])
    assert rc == 1 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli.main(["export-lora", str(fam["gene"].path), "--rank", "3", "--energy", "0.5", "-o", str(out)])
    assert ei.value.code == 2


# ---- LoRA in -----------------------------------------------------------------------------------


N_CHANGED = {"plain": 9, "rslora+patterns": 9, "embedding+head": 2}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_peft_merge_and_unload(fam, tmp_path, variant):
    from peft import PeftModel

    kw = VARIANTS[variant]
    make_adapter(fam["task"], tmp_path / "ad", **kw)
    want_model = PeftModel.from_pretrained(_task(fam), str(tmp_path / "ad")).merge_and_unload()
    model = _task(fam)
    changed = merge_lora_into_model(model, tmp_path / "ad")
    assert len(changed) == N_CHANGED[variant]
    want, got, base = _logits(want_model), _logits(model), _logits(_task(fam))
    assert (got - want).abs().max().item() < 1e-5
    assert (base - want).abs().max().item() > 1e-2
    deltas = lora_target_delta(fam["task"], tmp_path / "ad")
    if variant == "embedding+head":
        a, b, s = deltas["model.embed_tokens.weight"]
        assert a.shape == (3, 32) and b.shape == (96, 3) and s == 2.0  # (vocab, dim) = B @ A after the transposition
        return
    a, b, s = deltas["model.layers.1.self_attn.q_proj.weight"]
    if variant == "plain":
        assert a.shape == (4, 32) and s == 2.0
    else:
        assert a.shape == (2, 32) and s == pytest.approx(16 / math.sqrt(2))
        assert deltas["model.layers.0.self_attn.o_proj.weight"][2] == pytest.approx(3 / 2)
        assert deltas["model.layers.0.mlp.up_proj.weight"][2] == pytest.approx(16 / 2)


def test_lora_in_refusals(fam, tmp_path):
    make_adapter(fam["task"], tmp_path / "dora", r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        lora_target_delta(fam["task"], tmp_path / "dora")
    make_adapter(fam["task"], tmp_path / "ok", r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    cfg["r"] = 3
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank 2 but adapter_config.json says r = 3"):
        lora_target_delta(fam["task"], tmp_path / "ok")
    cfg["r"], cfg["target_modules"] = 2, ["k_proj"]
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not in target_modules"):
        lora_target_delta(fam["task"], tmp_path / "ok")
    cfg["target_modules"], cfg["peft_type"] = ["q_proj"], "IA3"
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        lora_target_delta(fam["task"], tmp_path / "ok")
    # an adapter that stores a different embedding base weight (resized vocabulary) is refused
    make_adapter(fam["task"], tmp_path / "emb", r=2, lora_alpha=2, target_modules=["embed_tokens"])
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "emb" / "adapter_model.safetensors")
    k = "base_model.model.model.embed_tokens.base_layer.weight"
    assert k in sd and lora_target_delta(fam["task"], tmp_path / "emb")
    sd[k] = sd[k] + 1.0
    save_file(sd, tmp_path / "emb" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="replaces the base weight of 'model.embed_tokens.weight'"):
        lora_target_delta(fam["task"], tmp_path / "emb")
    # a different base (gpt2 names) is refused by name
    g = tiny_model("gpt2")
    g.save_pretrained(tmp_path / "gpt2")
    cfg["peft_type"] = "LORA"
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong base model"):
        lora_target_delta(tmp_path / "gpt2", tmp_path / "ok")
