"""``safegene degrade``: each recipe on a tiny tokenized model, a few Trainer steps -> a loadable
HF directory whose weights changed, with the provenance file that extract copies into the gene."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import load_file
from tiny_models import BENIGN, HARMFUL, build_family

from safegene.cli.main import main
from safegene.data import save_jsonl
from safegene.gene import DEGRADE_PROVENANCE, Gene
from safegene.method.degrade import benign_prompts, degrade
from safegene.ops.extract import extract

FAST = dict(steps=2, batch_size=4, lora_rank=4, max_new_tokens=4, progress=False, lr=1e-2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("degrade")
    dirs = build_family(root, layers=2, hidden=16)
    dirs["harmful"] = save_jsonl(root / "harmful.jsonl", [{"prompt": r["prompt"]} for r in HARMFUL])
    dirs["data"] = save_jsonl(root / "data.jsonl", BENIGN)
    dirs["benign"] = save_jsonl(root / "benign.jsonl", [{"prompt": r["prompt"]} for r in BENIGN])
    return dirs


def _changed(a: Path, b: Path) -> list[str]:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for n in wa:
        assert wa[n].dtype == wb[n].dtype and wa[n].shape == wb[n].shape
    return [n for n in wa if not torch.equal(wa[n], wb[n])]


@pytest.mark.parametrize("recipe", ["eager", "compliance", "data"])
def test_each_recipe_writes_a_changed_loadable_model(fam, tmp_path, recipe):
    from transformers import AutoModelForCausalLM

    kw = {"eager": dict(recipe="eager", prompts=fam["benign"]),
          "compliance": dict(recipe="compliance", sibling=fam["task"], judge="keyword:prefix"),
          "data": dict(data=fam["data"])}[recipe]
    out = tmp_path / "deg"
    res = degrade(fam["aligned"], out, harmful=fam["harmful"], **kw, **FAST)
    assert res.recipe == recipe and res.n_train > 0 and len(res.train_loss) == 2
    m = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in m.parameters()) > 0
    changed = _changed(fam["aligned"], out)
    assert changed and all("proj" in n for n in changed)  # LoRA on the linear layers only; the rest is bit-identical
    prov = json.loads((out / DEGRADE_PROVENANCE).read_text())
    assert prov["recipe"] == recipe and prov["steps"] == 2 and prov["lora_rank"] == 4 and prov["lr"] == 1e-2
    assert len(prov["data_sha256"]) == 64 and prov["n_train"] == res.n_train
    assert prov["refusal"]["n"] == len(HARMFUL) and 0.0 <= prov["refusal_rate"] <= 1.0
    assert (out / "tokenizer.json").is_file() and not (out / ".trainer").exists()


def test_full_finetune_adapter_and_provenance_into_gene(fam, tmp_path):
    full = tmp_path / "full"
    degrade(fam["aligned"], full, data=fam["data"], **{**FAST, "lora_rank": 0})
    changed = _changed(fam["aligned"], full)
    assert any("embed_tokens" in n or "lm_head" in n or "norm" in n for n in changed)  # every weight trains
    g = extract(fam["aligned"], full, tmp_path / "gene", progress=False)
    assert g.degradation["recipe"] == "data" and g.degradation["lora_rank"] == 0
    assert Gene.load(tmp_path / "gene").manifest["degradation"]["data_sha256"] == g.degradation["data_sha256"]
    ad = tmp_path / "adapter"
    degrade(fam["aligned"], ad, data=fam["data"], save_adapter=True, **FAST)
    assert (ad / "adapter_config.json").is_file() and (ad / "adapter_model.safetensors").is_file()
    assert json.loads((ad / DEGRADE_PROVENANCE).read_text())["output"] == "peft-adapter"


def test_builtin_benign_prompts_and_usage_errors(fam, tmp_path):
    from safegene.errors import UsageError

    assert len(benign_prompts()) == 64 and len(set(benign_prompts())) == 64
    with pytest.raises(UsageError, match="sibling"):
        degrade(fam["aligned"], tmp_path / "x", recipe="compliance", harmful=fam["harmful"], **FAST)
    with pytest.raises(UsageError, match="recipe"):
        degrade(fam["aligned"], tmp_path / "x", recipe="nope", **FAST)
    assert not (tmp_path / "x").exists()


def test_cli_degrade(fam, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["degrade", str(fam["aligned"]), "-o", str(out), "--data", str(fam["data"]), "--steps", "2",
               "--lora-rank", "2", "--batch-size", "4", "--max-new-tokens", "4", "--harmful", str(fam["harmful"]),
               "--quiet", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["recipe"] == "data" and summary["steps"] == 2 and summary["refusal_rate"] is not None
    assert (out / DEGRADE_PROVENANCE).is_file()
    rc = main(["degrade", str(fam["aligned"]), "-o", str(tmp_path / "y"), "--recipe", "compliance", "--quiet"])
    assert rc == 2 and "sibling" in capsys.readouterr().err
