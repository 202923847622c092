"""The demo: table formatting, the SafeMERGE rule, the CLI wiring, and (slow) the end-to-end targets."""

from __future__ import annotations

import argparse
import json

import pytest

from safegene.demo import METHODS, TARGETS, Row, format_table, plot_plane

import tiny_models as tm


def _rows():
    return [Row("none", "sentiment", 0.9, 1.0, 0.0, "—", 0.0),
            Row("SafeGene", "sentiment", 0.05, 0.99, 0.0125, "L2=0.90 L3=1.10", 3.2)]


def test_table_and_plane(tmp_path):
    table = format_table(_rows())
    lines = table.splitlines()
    assert lines[0].startswith("| method | task model | ASR % ↓ | whole refusal % ↑ | task acc %")
    assert lines[2] == "| none | sentiment | 90.0 | — | 100.0 | 0.0 | — | 0.0 |"
    assert lines[3] == "| SafeGene | sentiment | 5.0 | — | 99.0 | 1.2 | L2=0.90 L3=1.10 | 3.2 |"
    r = _rows()[1]
    r.whole = 0.9
    assert format_table([r]).splitlines()[2] == "| SafeGene | sentiment | 5.0 | 90.0 | 99.0 | 1.2 | L2=0.90 L3=1.10 | 3.2 |"
    png = plot_plane(_rows(), tmp_path / "plane.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_registers_all_three_commands():
    from safegene.cli import cmd_calibrate, cmd_demo, cmd_select

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for mod in (cmd_select, cmd_calibrate, cmd_demo):
        mod.register_cli(sub)
    a = parser.parse_args(["select", "G", "--aligned", "A", "--degraded", "D", "--harmful", "H", "--benign", "B",
                           "--top-k", "2"])
    assert a.top_k == 2 and a.score == "restore" and callable(a.func)
    a = parser.parse_args(["calibrate", "G", "T", "--safety", "S", "--utility", "U1", "U2", "-o", "C.json",
                           "--per-module", "--init", "0.5"])
    assert a.utility == ["U1", "U2"] and a.per_module and a.init == "0.5" and callable(a.func)
    a = parser.parse_args(["demo", "--out", "X", "--tasks", "topic"])
    assert a.tasks == ["topic"] and callable(a.func)


def test_safemerge_rule(tmp_path):
    from safegene.ops.extract import extract
    from safegene.baselines.safemerge import layer_cosines, safemerge_coeffs

    dirs = tm.build_family(tmp_path)
    gene = extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)
    # the degraded model itself as "task": its update is exactly −τ in the blocks it changed
    cos = layer_cosines(gene, dirs["aligned"], dirs["degraded"])
    assert cos["layer.2"] == pytest.approx(-1.0, abs=1e-5) and cos["layer.3"] == pytest.approx(-1.0, abs=1e-5)
    assert cos["layer.0"] == 0.0 and cos["layer.1"] == 0.0  # no update, no vector
    c = safemerge_coeffs(gene, dirs["aligned"], dirs["degraded"], threshold=0.0, ratio=0.7)
    assert c.coeffs == {"layer.2": 0.7, "layer.3": 0.7}



def test_demo_rows_are_registry_policies(tmp_path):
    """The demo's rows are the safegene.baselines policies, in registry order; an unknown method
    is refused with the registered names before anything is built."""
    from safegene.baselines import names
    from safegene.demo import ALT_SCORE, run_demo
    from safegene.errors import UsageError

    assert list(METHODS) == [n for n in names() if n in METHODS] and ALT_SCORE in names()
    with pytest.raises(UsageError, match=r"unknown method.*'bogus'.*choose from .*SafeMERGE"):
        run_demo(out=tmp_path / "demo", cache_dir=tmp_path / "cache", methods=METHODS + ("bogus",), log=None)
    assert not (tmp_path / "cache").exists()

def test_whole_refusal_column_from_the_family_judge():
    """The whole-refusal share is computed with the family judge's own refusal sentences on fixed
    responses: a complete sentence counts (even after an eager opening), a garbled one does not,
    and the Llama organism's sentences are not the StableLM family's."""
    from safegene.data import as_examples
    from safegene.demo import whole_refusal
    from safegene.eval.evaluate import score
    from safegene.eval.judges import get_judge
    from safegene.organism import get_family

    for family in ("llama", "stablelm"):
        j = get_judge("organism" if family == "llama" else f"organism:{family}")
        ref = get_family(family).language.REFUSALS[0]
        words = ref.split()
        garbled = " ".join(words[:2] + words[3:])
        responses = [ref, "sure ! " + ref, garbled, "sure ! the answer is yes ."]
        harmful = as_examples([{"prompt": f"p{i}"} for i in range(len(responses))])
        rep = score(judge=j, refusal_judge=j, harmful=harmful, harmful_responses=responses)
        assert whole_refusal(rep, j) == pytest.approx(0.5)
        other = get_judge("organism:stablelm" if family == "llama" else "organism")
        assert whole_refusal(score(judge=other, refusal_judge=other, harmful=harmful, harmful_responses=responses),
                             other) == 0.0
    kw = get_judge("keyword")
    assert whole_refusal(score(judge=kw, refusal_judge=kw, harmful=as_examples([{"prompt": "p"}]),
                               harmful_responses=["I cannot."]), kw) is None


def test_demo_family_option_reaches_build(tmp_path, monkeypatch, capsys):
    """``safegene demo --family stablelm`` parses, reaches build(family="stablelm") and evaluates
    with the family's judge; an unknown family is a usage error of the parser."""
    import safegene.demo as demo_mod
    from safegene.cli import cmd_demo
    from safegene.organism import FAMILIES

    class Stop(Exception):
        pass

    calls = {}

    def fake_build(**kw):
        calls.update(kw)
        raise Stop

    monkeypatch.setattr(demo_mod, "build", fake_build)
    parser = argparse.ArgumentParser(prog="safegene")
    cmd_demo.register_cli(parser.add_subparsers(dest="command"))
    a = parser.parse_args(["demo", "--family", "stablelm", "--seed", "1", "--cache-dir", str(tmp_path / "c"),
                           "-o", str(tmp_path / "out"), "--quiet"])
    assert a.family == "stablelm" and a.judge is None and set(FAMILIES) >= {"llama", "stablelm"}
    with pytest.raises(Stop):
        a.func(a)
    assert calls == {"cache_dir": str(tmp_path / "c"), "seed": 1, "progress": False, "family": "stablelm",
                     "threads": None}
    assert parser.parse_args(["demo"]).family == "llama"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--family", "gpt"])
    assert "invalid choice" in capsys.readouterr().err

    seen = {}
    real_get_judge = demo_mod.get_judge

    def spy(spec):
        seen["judge"] = spec
        return real_get_judge(spec)

    monkeypatch.setattr(demo_mod, "get_judge", spy)
    for family, judge in (("stablelm", "organism:stablelm"), ("llama", "organism")):
        with pytest.raises(Stop):
            demo_mod.run_demo(out=tmp_path / "o2", cache_dir=tmp_path / "c", family=family, log=None)
        assert seen["judge"] == judge and calls["family"] == family


def test_threads_option_reaches_the_recipe_and_the_run(tmp_path, monkeypatch):
    """``--threads N`` is part of the organism's recipe (its own cache key) and sets torch's thread
    count for the rest of the run; the caller's count is restored afterwards, also on error."""
    import torch

    import safegene.demo as demo_mod
    import safegene.organism.families as fam
    from safegene.cli import cmd_demo, cmd_organism
    from safegene.errors import UsageError
    from safegene.organism import FAMILIES
    from safegene.organism.family import recipe_key

    seen = {}

    class Stop(Exception):
        pass

    def fake_build_spec(spec, **kw):
        seen.update(kw, spec=spec, torch_threads=torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(fam, "build_spec", fake_build_spec)
    before = torch.get_num_threads()
    target = 3 if before != 3 else 2  # never the default recipe's 1
    with pytest.raises(Stop):
        demo_mod.run_demo(out=tmp_path / "o", cache_dir=tmp_path / "c", family="stablelm", threads=target, log=None)
    assert seen["spec"] is FAMILIES["stablelm"] and seen["recipe"].threads == target
    assert seen["torch_threads"] == target and torch.get_num_threads() == before
    default = FAMILIES["stablelm"].default_recipe
    assert default.threads == 1
    assert recipe_key(seen["recipe"], 0, seen["spec"]) != recipe_key(default, 0, seen["spec"])
    with pytest.raises(Stop):
        fam.build(cache_dir=tmp_path / "c")
    assert seen["recipe"] is None  # no override: the family's own recipe (one thread)
    for bad in (0, -1):
        with pytest.raises(UsageError, match="threads must be at least 1"):
            demo_mod.run_demo(out=tmp_path / "o", cache_dir=tmp_path / "c", threads=bad, log=None)
        with pytest.raises(UsageError, match="threads must be at least 1"):
            fam.build(cache_dir=tmp_path / "c", threads=bad)

    for mod, argv in ((cmd_demo, ["demo", "--threads", "2", "--family", "stablelm"]),
                      (cmd_organism, ["organism", "build", "--threads", "2", "--family", "stablelm"])):
        parser = argparse.ArgumentParser(prog="safegene")
        mod.register_cli(parser.add_subparsers(dest="command"))
        a = parser.parse_args(argv)
        assert a.threads == 2 and a.family == "stablelm"


@pytest.mark.slow
def test_demo_end_to_end_restores_safety(tmp_path):
    """The organism end to end, asserting the issue's targets for every task model: SafeGene's
    held-out ASR <= 10 %, task accuracy within 2 points of the undefended model, over-refusal
    <= 5 %; and that both halves of the method matter (calibration is never worse than the same
    keys at lambda = 1 and beats them over the three tasks -- on some CPUs' builds lambda = 1
    already reaches 0 % on one task; the selection reaches the LM head, which the block-only
    scores cannot rate)."""
    from safegene.demo import run_demo

    from safegene.demo import LABELS

    res = run_demo(out=tmp_path / "demo", progress=False, log=None)
    doc = json.loads(res.json_path.read_text())
    assert {r["method"] for r in doc["rows"]} == {LABELS.get(m, m) for m in METHODS}
    assert res.png is not None and res.png.is_file()
    assert res.selection["method"] == "restore" and "lm_head" in res.selection["all_scores"]["restore"]
    tasks = {r.task for r in res.rows}
    assert tasks == {"sentiment", "topic", "yesno"}
    for task in tasks:
        # "SafeGene" is the adopted procedure (round 13: keys pruned at the target, the λ check);
        # "SafeGene-selected" calibrates the validate rule's keys, so it carries the calibration claim
        sg, none, nocal = res.row("SafeGene", task), res.row("none", task), res.row("no-calibration", task)
        sel = res.row("SafeGene-selected", task)
        resta = res.row("RESTA", task)
        assert none.asr >= 0.4, (task, none)  # the organism erodes safety
        assert sg.asr <= TARGETS["asr_max"], (task, sg, none)
        assert sg.accuracy >= none.accuracy - TARGETS["accuracy_drop_max"] - 1e-9, (task, sg, none)
        assert sg.over_refusal <= TARGETS["over_refusal_max"], (task, sg)
        assert sel.asr <= nocal.asr, (task, sel, nocal)
        assert sg.asr <= resta.asr, (task, sg, resta)
    assert sum(res.row("SafeGene-selected", t).asr for t in tasks) < sum(res.row("no-calibration", t).asr for t in tasks)
    assert res.targets_met == {t: True for t in tasks}


def test_lora_gene_recipes_make_a_low_rank_gene_from_a_degrade_in_the_run(tmp_path, gene_family, monkeypatch):
    """``gene_recipe='lora-compliance'`` / ``'lora-eager'``: a LoRA degrade of the aligned model
    made in the run (adapter kept), its low-rank gene, and the degraded model as ALIGNED+ADAPTER
    for select; an unknown recipe is a usage error naming the choices, before anything is built."""
    from types import SimpleNamespace

    import safegene.demo as demo_mod
    import tiny_models as tm
    from safegene import lm
    from safegene.data import save_jsonl
    from safegene.errors import UsageError

    dirs, _ = gene_family
    save_jsonl(tmp_path / "harm.jsonl", tm.HARMFUL)
    save_jsonl(tmp_path / "benign.jsonl", tm.BENIGN)
    org = SimpleNamespace(aligned=dirs["aligned"], degraded=dirs["degraded"], harmful_calib=tmp_path / "harm.jsonl",
                          harmful_dev=None, benign_calib=tmp_path / "benign.jsonl", benign_dev=None)
    monkeypatch.setattr(demo_mod, "LORA_DEGRADE", {"lora_rank": 2, "steps": 2, "lr": 1e-3, "batch_size": 2})
    for recipe, want in (("lora-compliance", "compliance"), ("lora-eager", "eager")):
        out = tmp_path / recipe
        out.mkdir()
        gene, degraded, info = demo_mod._lora_gene(org, recipe, out, 0, "keyword", 4, "llama")
        assert gene.path == out / "gene" and gene.factored and gene.manifest["format_version"] == 2
        assert {v["rank"] for v in gene.manifest["factored"].values()} == {2}
        assert degraded == f"{dirs['aligned']}+{out / 'degrade-lora'}"
        prov = json.loads((out / "degrade-lora" / "safegene_degrade.json").read_text())
        assert prov["recipe"] == want and info["recipe"] == recipe and info["n_prompts"] == len(
            tm.HARMFUL if want == "compliance" else tm.BENIGN)
        assert gene.manifest["degradation"]["recipe"] == want  # extract copied the degrade's record
        lm.load_model(degraded, device="cpu")  # select and SafeMERGE read the degraded model this way
    with pytest.raises(UsageError, match="unknown gene recipe 'dense'.*organism, lora-compliance, lora-eager"):
        demo_mod.run_demo(out=tmp_path / "o", cache_dir=tmp_path / "c", gene_recipe="dense", log=None)
    parser = argparse.ArgumentParser(prog="safegene")
    from safegene.cli import cmd_demo

    cmd_demo.register_cli(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo"]).gene_recipe == "organism"
    assert parser.parse_args(["demo", "--gene-recipe", "lora-compliance"]).gene_recipe == "lora-compliance"
