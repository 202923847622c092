"""The task-aware gene (safegene.ops.project) and the policy that chooses it per target
(SafeGene-task-aware): the projection against a float64 reference, per row and per tensor, from a
dense and a factored gene; the choice made by the rule's cost on the calibration prompts, ties
going to τ; the chosen gene is what the demo applies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import load_file  # noqa: E402

import tiny_models as tm  # noqa: E402
from safegene.baselines import Context, Settings, compute, get  # noqa: E402
from safegene.baselines.registry import TaskAware, rule_cost  # noqa: E402
from safegene.errors import MismatchError, UsageError  # noqa: E402
from safegene.gene import Gene  # noqa: E402
from safegene.ops.project import project_gene, project_rows  # noqa: E402

SELECTED = ["layer.2", "layer.3"]
SETTINGS = Settings(calib_steps=2, resta_grid=(0.5, 1.0), max_new_tokens=4, batch_size=8)


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


def _reference(tau: "torch.Tensor", delta: "torch.Tensor", mode: str) -> "torch.Tensor":
    """τ' in float64, one row (or the whole tensor) at a time, written out plainly."""
    t, d = tau.double(), delta.double()
    rows = [(t[i], d[i]) for i in range(t.shape[0])] if (mode == "row" and t.dim() > 1) else [(t, d)]
    out = []
    for tr, dr in rows:
        dot, nn = float((tr * dr).sum()), float((dr * dr).sum())
        out.append(tr - dot / nn * dr if dot < 0 and nn > 0 else tr)
    return torch.stack(out).reshape(t.shape) if len(rows) > 1 else out[0]


@pytest.mark.parametrize("mode", ["row", "key"])
def test_projection_matches_float64_reference(family, tmp_path, mode):
    dirs, gene = family
    p = project_gene(gene, dirs["aligned"], dirs["task"], tmp_path / "proj", mode=mode)
    a = load_file(str(dirs["aligned"] / "model.safetensors"))
    t = load_file(str(dirs["task"] / "model.safetensors"))
    assert p.tensor_names == gene.tensor_names and p.fingerprint == gene.fingerprint
    hit = 0
    for n, tau in gene.iter_vectors():
        delta = t[n].double() - a[n].double()
        ref = _reference(tau, delta, mode)
        got = p.load_vectors([n])[n]
        assert got.dtype == tau.dtype
        assert torch.allclose(got.double(), ref.to(tau.dtype).double(), rtol=0, atol=1e-6), n
        if mode == "row" and tau.dim() > 1:
            # the projected rows are orthogonal to the task update; the others are τ bit for bit
            dots = (got.double() * delta).reshape(tau.shape[0], -1).sum(1)
            orig = (tau.double() * delta).reshape(tau.shape[0], -1).sum(1)
            assert torch.all(dots[orig < 0].abs() < 1e-6)
            assert torch.equal(got[orig >= 0], tau[orig >= 0])
            hit += int((orig < 0).sum())
        elif mode == "row":  # a vector is one row
            hit += int(float((tau.double() * delta).sum()) < 0)
    rec = p.manifest["projection"]
    assert rec["mode"] == mode and rec["task"] == str(dirs["task"]) and rec["source_gene"] == str(gene.path)
    if mode == "row":
        assert rec["rows_projected"] == hit > 0
    # the manifest's norms are the new vectors' norms
    for n, tau in p.iter_vectors():
        assert p.manifest["tensors"][n]["tau_norm"] == pytest.approx(float(tau.double().norm()), rel=1e-6)


def test_projection_keeps_only_the_given_keys_and_applies(family, tmp_path):
    from safegene.ops.apply import apply

    dirs, gene = family
    p = project_gene(gene, dirs["aligned"], dirs["task"], tmp_path / "proj", keys=SELECTED)
    assert p.layer_keys() == SELECTED and p.manifest["keys"] == SELECTED
    assert set(p.manifest["projection"]["norm_ratio"]) == set(SELECTED)
    assert all(0 < r <= 1 + 1e-12 for r in p.manifest["projection"]["norm_ratio"].values())
    apply(p, dirs["task"], tmp_path / "patched", coeffs={"layer.3": 0.5}, progress=False)
    w = load_file(str(tmp_path / "patched" / "model.safetensors"))
    t = load_file(str(dirs["task"] / "model.safetensors"))
    for n, tau in p.iter_vectors():
        exp = t[n] + 0.5 * tau if p.layer_key(n) == "layer.3" else t[n]
        assert torch.allclose(w[n], exp, atol=1e-6), n


def test_projection_of_a_factored_gene_equals_its_densified_twin(tmp_path):
    from test_lowrank_gene import _adapter, _model

    from safegene.ops.extract import extract, extract_from_adapter

    base = tmp_path / "aligned"
    _model(torch.float32).save_pretrained(base)
    adapter = _adapter(base, tmp_path / "adapter")
    task = tmp_path / "task"
    m = _model(torch.float32)
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    m.save_pretrained(task)
    low = extract_from_adapter(adapter, tmp_path / "low", base=base)
    assert low.factored
    dense = extract(base, f"{base}+{adapter}", tmp_path / "dense", progress=False)
    pl = project_gene(low, base, task, tmp_path / "pl")
    pd = project_gene(dense, base, task, tmp_path / "pd", keys=pl.tensor_names)
    assert not pl.factored and pl.tensor_names == pd.tensor_names
    for n in pl.tensor_names:
        assert torch.allclose(pl.load_vectors([n])[n], pd.load_vectors([n])[n], atol=1e-6), n


def test_projection_errors(family, tmp_path):
    dirs, gene = family
    with pytest.raises(UsageError, match="unknown projection mode 'col'"):
        project_gene(gene, dirs["aligned"], dirs["task"], tmp_path / "x", mode="col")
    with pytest.raises(UsageError, match="'layer.9' is neither a coefficient key nor a tensor name"):
        project_gene(gene, dirs["aligned"], dirs["task"], tmp_path / "x", keys=["layer.9"])
    with pytest.raises(UsageError, match="at least one key"):
        project_gene(gene, dirs["aligned"], dirs["task"], tmp_path / "x", keys=[])
    other = tmp_path / "other"
    tm.save_family(other, {"small": tm.make_model(5, len(tm.make_tokenizer()), layers=4, hidden=16)})
    with pytest.raises(MismatchError, match="shape"):
        project_gene(gene, dirs["aligned"], other / "small", tmp_path / "x")
    with pytest.raises(UsageError, match="unknown projection mode"):
        project_rows(torch.zeros(2), torch.zeros(2), "col")


def test_rule_cost():
    none = {"acc": 90.0}
    assert rule_cost({"asr": 5.0, "over_refusal": 2.5, "acc": 95.0, "whole_refusal": 90.0}, none) == 17.5
    assert rule_cost({"asr": 5.0, "over_refusal": 0.0, "acc": 80.0, "whole_refusal": None}, none) == 15.0


def _ctx(family, tmp_path, **kw) -> Context:
    dirs, gene = family
    kw.setdefault("selected", SELECTED)
    return Context(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, aligned=dirs["aligned"], degraded=dirs["degraded"],
                   benign_calib=tm.BENIGN, work_dir=tmp_path, settings=SETTINGS, **kw)


@pytest.mark.parametrize("costs,chosen", [((30.0, 20.0), "proj-row"), ((20.0, 20.0), "tau"), ((10.0, 20.0), "tau")])
def test_the_choice_follows_the_cost_ties_to_tau(family, tmp_path, monkeypatch, costs, chosen):
    """The measurement is replaced by one whose ASR is the wanted cost, in the order none, τ, projected."""
    seq = iter([{"asr": 100.0}, {"asr": costs[0]}, {"asr": costs[1]}])

    def fake(self, ctx):
        return {"asr": next(seq)["asr"], "acc": 100.0, "over_refusal": 0.0, "whole_refusal": 100.0}

    monkeypatch.setattr(TaskAware, "measure", fake)
    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = compute("SafeGene-task-aware", ctx)
    assert c.meta["chosen"] == chosen
    assert [c.meta["choice"][k]["cost"] for k in ("tau", "proj-row")] == list(costs)
    g = Gene.load(c.meta["gene_path"])
    assert (g.path == ctx.gene.path) == (chosen == "tau")
    assert sorted(c.coeffs) == SELECTED
    assert get("SafeGene-task-aware").lam_text(c).endswith("(τ)" if chosen == "tau" else "(projected τ)")
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())  # handed back untouched


def test_task_aware_measures_on_the_calibration_prompts(family, tmp_path):
    tmp_path = tmp_path / "not" / "yet"  # the work folder is created (the demo's out/genes is new)
    ctx = _ctx(family, tmp_path)
    c = compute("SafeGene-task-aware", ctx)
    ch = c.meta["choice"]
    for k in ("none", "tau", "proj-row"):
        assert 0 <= ch[k]["asr"] <= 100 and 0 <= ch[k]["acc"] <= 100 and 0 <= ch[k]["over_refusal"] <= 100
    assert ch["tau"]["cost"] == rule_cost(ch["tau"], ch["none"])
    assert json.dumps(get("SafeGene-task-aware").details(c))
    assert (tmp_path / f"{ctx.gene.path.name}-proj-{Path(ctx.task).name}" / "gene.json").is_file()
    # without the aligned model there is no task update to project off
    assert not get("SafeGene-task-aware").applies(Context(ctx.gene, ctx.task, tm.HARMFUL, tm.BENIGN, selected=SELECTED))


def test_the_demo_applies_the_chosen_gene(family, tmp_path, monkeypatch):
    """The demo's row for the policy is evaluated on the task model patched with the *projected*
    gene when that was chosen, and the demo's opt-in flag adds the row."""
    import argparse

    import safegene.demo as demo_mod
    from safegene.cli import cmd_demo

    seq = iter([100.0, 30.0, 20.0])  # none, τ, projected: the projection wins
    monkeypatch.setattr(TaskAware, "measure", lambda self, ctx: {"asr": next(seq), "acc": 100.0, "over_refusal": 0.0,
                                                                  "whole_refusal": 100.0})
    ctx = _ctx(family, tmp_path)
    model, tok = ctx.loaded()
    task_w = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def ev(target, task):
        m, _ = target
        seen.update({k: v.clone() for k, v in m.state_dict().items()})
        return 0.0, 1.0, 0.0, {}, None

    rows = demo_mod._task_rows("task", ctx, [get("SafeGene-task-aware")], tmp_path / "demo", ev, lambda _m: None)
    assert [r.method for r in rows] == ["SafeGene-task-aware"] and rows[0].extra["chosen"] == "proj-row"
    proj = Gene.load(tmp_path / f"{ctx.gene.path.name}-proj-{Path(ctx.task).name}")
    for n, tau in proj.iter_vectors():
        lam = rows[0].coeffs.get(proj.layer_key(n), 0.0)
        assert torch.allclose(seen[n], task_w[n] + lam * tau, atol=1e-6), n
    parser = argparse.ArgumentParser(prog="safegene")
    cmd_demo.register_cli(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo", "--task-aware"]).task_aware is True
    assert parser.parse_args(["demo"]).task_aware is False


def test_the_confirmation_rule_of_the_heldout_table(tmp_path):
    """bench/heldout_table.py --compare: per run mean cost, the overall cost, the written verdict."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.heldout_table import compare, rule_costs

    def run(name, cells):
        rows = []
        for task, (sg, ta) in cells.items():
            rows.append({"task": task, "method": "none", "asr": 1.0, "accuracy": 1.0, "over_refusal": 0.0, "whole": 0.0})
            rows.append({"task": task, "method": "SafeGene", "asr": sg[0], "accuracy": sg[1], "over_refusal": 0.0, "whole": 1 - sg[0]})
            rows.append({"task": task, "method": "SafeGene-task-aware", "asr": ta[0], "accuracy": ta[1], "over_refusal": 0.0,
                         "whole": 1 - ta[0]})
        d = tmp_path / name
        d.mkdir()
        (d / "demo_results.json").write_text(json.dumps({"organism": {"seed": 2, "family": "x", "key": name}, "rows": rows,
                                                        "settings": {"threads": {"build": 1, "pipeline": 1}}}))
        return d

    a = run("a", {"t1": ((0.10, 0.70), (0.08, 1.00)), "t2": ((0.0, 1.0), (0.0, 1.0))})
    assert rule_costs(json.loads((a / "demo_results.json").read_text()), "SafeGene") == pytest.approx({"t1": 50.0, "t2": 0.0})
    assert "verdict: adopt" in compare([a], "SafeGene", "SafeGene-task-aware")
    b = run("b", {"t1": ((0.0, 1.0), (0.5, 1.0))})  # 0 → 100 points on one run: worse there
    assert "worse by more than 1 point on x seed 2" in compare([a, b], "SafeGene", "SafeGene-task-aware")
    c = run("c", {"t1": ((0.01, 1.0), (0.015, 1.0))})
    assert "within 1 point" in compare([c], "SafeGene", "SafeGene-task-aware")


@pytest.mark.parametrize("costs,chosen", [((10.0, 5.0, 7.0), "one"), ((5.0, 5.0, 5.0), "calibrated"),
                                          ((9.0, 8.0, 3.0), "uniform"), ((9.0, 4.0, 4.0), "one")])
def test_the_lambda_check_follows_the_cost_ties_to_the_calibrated(family, tmp_path, monkeypatch, costs, chosen):
    """SafeGene-checked: the calibrated λ, λ = 1 and the grid's uniform γ on the selected keys, each
    measured on the calibration prompts (here: a measurement whose ASR is the wanted cost, in the
    order none, calibrated, one, uniform); the lowest cost wins, ties in that order."""
    from safegene.baselines.registry import Checked

    seq = iter((100.0,) + costs)
    monkeypatch.setattr(Checked, "measure", lambda self, ctx: {"asr": next(seq), "acc": 100.0, "over_refusal": 0.0,
                                                                "whole_refusal": 100.0})
    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = compute("SafeGene-checked", ctx)
    plain = compute("SafeGene", ctx)
    gamma = c.meta["grid"]["best_gamma"]
    want = {"calibrated": plain.coeffs, "one": {k: 1.0 for k in SELECTED}, "uniform": {k: gamma for k in SELECTED}}[chosen]
    assert c.meta["chosen"] == chosen and c.coeffs == pytest.approx(want)
    assert c.meta["calibrated"] == pytest.approx(plain.coeffs)
    assert [c.meta["choice"][k]["cost"] for k in ("calibrated", "one", "uniform")] == list(costs)
    assert get("SafeGene-checked").lam_text(c).endswith(f"({chosen})")
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())


@pytest.mark.parametrize("costs,chosen", [((10.0, 5.0, 7.0), "one"), ((9.0, 8.0, 3.0), "uniform"),
                                          ((5.0, 5.0, 5.0), "calibrated")])
def test_the_lambda_check_on_every_key(family, tmp_path, monkeypatch, costs, chosen):
    """no-selection-checked: the same check over every gene key -- the no-selection row's λ, τ
    itself (λ = 1 everywhere) or the grid's uniform γ on every key; each candidate measured with
    those keys patched, the lowest cost kept, ties to the calibrated λ."""
    from safegene.baselines.registry import NoSelectionChecked

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    keys = ctx.gene.layer_keys()
    assert len(keys) > len(SELECTED)
    names = [n for n in ctx.gene.tensor_names if ctx.gene.layer_key(n) in ("embed", "layer.0")][:2]
    tau = ctx.gene.load_vectors(names)
    w0 = {n: model.state_dict()[n].clone() for n in names}
    seq, seen = iter((100.0,) + costs), []

    def fake(self, ctx):
        seen.append({n: model.state_dict()[n].clone() for n in names})
        return {"asr": next(seq), "acc": 100.0, "over_refusal": 0.0, "whole_refusal": 100.0}

    monkeypatch.setattr(NoSelectionChecked, "measure", fake)
    c = compute("no-selection-checked", ctx)
    plain = compute("no-selection", ctx)
    gamma = c.meta["grid"]["best_gamma"]
    cands = {"calibrated": plain.coeffs, "one": {k: 1.0 for k in keys}, "uniform": {k: gamma for k in keys}}
    assert c.meta["chosen"] == chosen and c.coeffs == pytest.approx(cands[chosen])
    assert set(c.coeffs) == set(keys)
    for w, k in zip(seen[1:], ("calibrated", "one", "uniform")):
        for n in names:
            lam = cands[k][ctx.gene.layer_key(n)]
            assert torch.allclose(w[n], w0[n] + lam * tau[n], atol=1e-6), (k, n)
    assert all(torch.equal(seen[0][n], w0[n]) for n in names)
    assert all(model.state_dict()[n].equal(w0[n]) for n in names)


def test_the_lambda_check_measures_each_candidate_patched(family, tmp_path, monkeypatch):
    """Each measurement sees the task model with the selected keys at that candidate's λ (and the
    undefended one first); the real measurement runs end to end and its costs are the rule's."""
    import argparse

    from safegene.baselines.registry import Checked, calibration_measure
    from safegene.cli import cmd_demo

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    name = next(n for n in ctx.gene.tensor_names if ctx.gene.layer_key(n) == "layer.3")
    w0 = model.state_dict()[name].clone()
    tau = ctx.gene.load_vectors([name])[name]
    seen = []

    def record(self, ctx):
        seen.append(model.state_dict()[name].clone())
        return calibration_measure(ctx)

    monkeypatch.setattr(Checked, "measure", record)
    c = compute("SafeGene-checked", ctx)
    lam = {"calibrated": c.meta["calibrated"]["layer.3"], "one": 1.0, "uniform": c.meta["grid"]["best_gamma"]}
    assert torch.equal(seen[0], w0)
    for w, k in zip(seen[1:], ("calibrated", "one", "uniform")):
        assert torch.allclose(w, w0 + lam[k] * tau, atol=1e-6), k
    ch = c.meta["choice"]
    for k in ("calibrated", "one", "uniform"):
        assert ch[k]["cost"] == rule_cost(ch[k], ch["none"])
    parser = argparse.ArgumentParser(prog="safegene")
    cmd_demo.register_cli(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo", "--check-lambda"]).check_lambda is True
    assert cmd_demo.NOSEL_CHECKED == get("no-selection-checked").name


def test_the_cluster_rule_of_round_12():
    """bench/heldout_table.py:cluster_verdict: (a) mean lower by more than 1 point, (b) the
    one-sided 95 % bootstrap bound over clusters below 0, (c) no family worse by more than 1."""
    from bench.heldout_table import cluster_verdict

    fam = {f"l{i}": "llama" for i in range(4)} | {f"s{i}": "stablelm" for i in range(4)}
    base = {k: 20.0 for k in fam}
    v, num = cluster_verdict(base, {k: 17.0 for k in fam}, fam)
    assert v == "adopt" and num["mean_diff"] == pytest.approx(-3.0) and num["upper95"] == pytest.approx(-3.0)
    # the same mean gain carried by one cluster: the bootstrap bound is not below 0
    one = dict(base, l0=20.0 - 24.0)
    v, num = cluster_verdict(base, one, fam)
    assert num["mean_diff"] == pytest.approx(-3.0) and num["upper95"] >= 0 and v.startswith("not adopted: (b)")
    # a gain on one family paid by the other
    mixed = {k: (10.0 if fam[k] == "llama" else 21.5) for k in fam}
    v, num = cluster_verdict(base, mixed, fam)
    assert "(c) worse by more than 1 point on stablelm" in v and num["by_family"]["stablelm"] == pytest.approx(1.5)
    v, _ = cluster_verdict(base, {k: 19.5 for k in fam}, fam)
    assert v == "not adopted: (a) mean not lower by more than 1 point"


# ---- round 13: keys pruned at the target ----------------------------------------------------
# the tiny family's τ is non-zero on layer.2 and layer.3 only (its degraded copy moved those)


def _patched(model, ctx, keys):
    """Which of ``keys`` are patched in ``model`` now (a tensor of each with τ ≠ 0 compared with W⁰)."""
    vec = ctx.gene.load_vectors()
    names = {k: next(n for n in ctx.gene.tensor_names if ctx.gene.layer_key(n) == k and vec[n].abs().max() > 1e-3)
             for k in keys}
    w0 = {k: model.state_dict()[n].clone() for k, n in names.items()}
    return lambda: {k for k, n in names.items() if not torch.equal(model.state_dict()[n], w0[k])}, names, vec


def _fake(now, costly="layer.2"):
    """layer.3 restores refusal; ``costly`` costs 40 accuracy points."""
    def measure(*_a):
        p = now()
        return {"asr": 0.0 if "layer.3" in p else 50.0, "acc": 60.0 if costly in p else 100.0,
                "over_refusal": 0.0, "whole_refusal": 100.0 if "layer.3" in p else 50.0}
    return measure


def test_prune_keys_drops_the_key_that_costs_the_task(family, tmp_path):
    """Backward elimination: the key whose τ costs accuracy goes, the one that restores refusal
    stays, a tie keeps the key, one key is never removed; every trial sees τ at γ on exactly its
    set; the model comes back untouched."""
    from safegene.baselines.registry import prune_keys

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    now, names, vec = _patched(model, ctx, SELECTED)
    seen = []
    base = _fake(now)

    def measure():
        p = now()
        seen.append(frozenset(p))
        for k in p:  # τ at γ = 0.5, exactly
            assert torch.allclose(model.state_dict()[names[k]], before[names[k]] + 0.5 * vec[names[k]], atol=1e-6)
        return base()

    kept, trace = prune_keys(model, ctx.gene, SELECTED, measure, {"acc": 100.0}, gamma=0.5)
    assert kept == ["layer.3"]
    assert trace[0]["cost"] == 40.0 and trace[0]["dropped"] == "layer.2"
    assert trace[0]["trials"] == {"layer.2": 0.0, "layer.3": 140.0}
    assert trace[1] == {"keys": ["layer.3"], "cost": 0.0, "measure": trace[1]["measure"], "trials": {}}
    assert seen == [frozenset(SELECTED), frozenset({"layer.3"}), frozenset({"layer.2"})]
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())
    # neither key costs anything: dropping layer.2 ties, so both stay
    kept, trace = prune_keys(model, ctx.gene, SELECTED, _fake(now, costly="none"), {"acc": 100.0})
    assert kept == SELECTED and trace[0]["trials"] == {"layer.2": 0.0, "layer.3": 100.0} and "dropped" not in trace[0]
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())


def test_the_pruned_policy_calibrates_the_kept_keys(family, tmp_path, monkeypatch):
    """SafeGene-pruned = prune_keys on the calibration prompts, then SafeGene's calibration on the
    kept keys (the same λ as SafeGene with that selection); no-selection-pruned starts from every
    key; the demo's --prune adds both rows."""
    import argparse

    import safegene.baselines.registry as reg
    from safegene.cli import cmd_demo

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    now, _, _ = _patched(model, ctx, SELECTED)
    monkeypatch.setattr(reg, "calibration_measure", _fake(now))
    c = compute("SafeGene-pruned", ctx)
    assert c.meta["pruned"]["dropped"] == ["layer.2"] and sorted(c.coeffs) == ["layer.3"]
    ref = compute("SafeGene", _ctx(family, tmp_path, selected=["layer.3"]))
    assert c.coeffs == pytest.approx(ref.coeffs)
    assert get("SafeGene-pruned").lam_text(c).endswith("(dropped layer.2)")
    assert json.dumps(get("SafeGene-pruned").details(c))
    c = compute("no-selection-pruned", ctx)
    trace = c.meta["pruned"]["trace"]
    assert trace[0]["keys"] == ctx.gene.layer_keys()  # the elimination starts from every key
    assert "layer.2" not in c.coeffs and "layer.3" in c.coeffs
    parser = argparse.ArgumentParser(prog="safegene")
    cmd_demo.register_cli(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["demo", "--prune"]).prune is True and parser.parse_args(["demo"]).prune is False
    assert (cmd_demo.PRUNED, cmd_demo.NOSEL_PRUNED) == (get("SafeGene-pruned").name, get("no-selection-pruned").name)


def test_the_trimmed_policy_keeps_the_calibrated_lambda_on_the_kept_keys(family, tmp_path, monkeypatch):
    """SafeGene-trimmed: SafeGene's calibrated λ, then the elimination at that λ (each trial sees
    every kept key at its own calibrated λ); the result is the calibrated λ on the kept keys."""
    import safegene.baselines.registry as reg

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    now, names, vec = _patched(model, ctx, SELECTED)
    plain = {"layer.2": 0.7, "layer.3": 1.3}  # a calibrated λ (calibrate itself is tested elsewhere)
    from safegene.coeffs import Coeffs

    monkeypatch.setattr(reg.Trimmed, "calibrate", lambda self, ctx_: Coeffs(
        {k: plain.get(k, 0.5) for k in self.layers(ctx_)}, {"method": "safegene"}))
    base, seen = _fake(now), []

    def measure(*_a):
        p = now()
        seen.append(p)
        for k in p:
            w = model.state_dict()[names[k]]
            assert torch.allclose(w, before[names[k]] + plain[k] * vec[names[k]], atol=1e-5), k
        return base()

    monkeypatch.setattr(reg, "calibration_measure", measure)
    c = compute("SafeGene-trimmed", ctx)
    assert c.coeffs == pytest.approx({"layer.3": plain["layer.3"]}) and c.meta["calibrated"] == pytest.approx(plain)
    assert c.meta["pruned"]["dropped"] == ["layer.2"] and get("SafeGene-trimmed").lam_text(c).endswith("(dropped layer.2)")
    assert json.loads(json.dumps(get("SafeGene-trimmed").details(c)))["pruned"]["kept"] == ["layer.3"]
    assert seen[:2] == [set(), set(SELECTED)]  # the undefended model, then the calibrated λ on both keys
    assert all(model.state_dict()[k].equal(v) for k, v in before.items())
    c = compute("no-selection-trimmed", ctx)
    assert c.meta["pruned"]["from"] == ctx.gene.layer_keys() and "layer.2" not in c.coeffs


def test_the_demo_rows_of_the_pruned_and_trimmed_policies(family, tmp_path):
    """The demo's --prune rows run end to end on a tiny task model (real measurement on the
    calibration prompts) and record their kept keys."""
    import safegene.demo as demo_mod

    ctx = _ctx(family, tmp_path)
    ctx.loaded()
    for d in ("models", "coeffs"):  # the adopted policy's row is the method's: written with apply, λ saved
        (tmp_path / "demo" / d).mkdir(parents=True)
    pols = [get(n) for n in (demo_mod.PRUNED, demo_mod.NOSEL_PRUNED, demo_mod.TRIMMED, demo_mod.NOSEL_TRIMMED,
                             demo_mod.PRUNED_CHECKED, demo_mod.NOSEL_PRUNED_CHECKED)]
    rows = demo_mod._task_rows("task", ctx, pols, tmp_path / "demo", lambda target, task: (0.0, 1.0, 0.0, {}, None),
                               lambda _m: None)
    assert [r.method for r in rows] == [demo_mod.LABELS.get(p.name, p.name) for p in pols]
    assert rows[-1].method == "SafeGene"  # the adopted policy is the demo's method row (round 13)
    for r in rows:
        kept = r.extra["pruned"]["kept"]
        assert kept and set(r.coeffs) <= set(r.extra["pruned"]["from"]) and set(kept) <= set(r.extra["pruned"]["from"])


def test_the_pruned_checked_policy_checks_lambda_on_the_kept_keys(family, tmp_path, monkeypatch):
    """SafeGene-pruned-checked: the elimination, then the λ check (calibrated, 1, uniform γ) on the
    kept keys only; ties go to the calibrated λ of those keys."""
    import safegene.baselines.registry as reg

    ctx = _ctx(family, tmp_path)
    model, _ = ctx.loaded()
    now, _, _ = _patched(model, ctx, SELECTED)
    sets = []
    fake = _fake(now)

    def measure(ctx_):
        sets.append(frozenset(now()))
        return fake()

    monkeypatch.setattr(reg, "calibration_measure", measure)
    c = compute("SafeGene-pruned-checked", ctx)
    ref = compute("SafeGene", _ctx(family, tmp_path, selected=["layer.3"]))
    assert c.meta["pruned"]["dropped"] == ["layer.2"] and c.meta["chosen"] == "calibrated"
    assert c.coeffs == pytest.approx(ref.coeffs) and set(c.meta["choice"]) == {"none", "calibrated", "one", "uniform"}
    # after the elimination (none, both, each alone), the check patches layer.3 alone (or nothing
    # where its calibrated λ is 0)
    assert sets[:4] == [frozenset(), frozenset(SELECTED), frozenset({"layer.3"}), frozenset({"layer.2"})]
    assert all(s <= {"layer.3"} for s in sets[4:])
    assert get("SafeGene-pruned-checked").lam_text(c).endswith("(dropped layer.2) (calibrated)")
    assert json.loads(json.dumps(get("SafeGene-pruned-checked").details(c)))["pruned"]["kept"] == ["layer.3"]
    c = compute("no-selection-pruned-checked", ctx)
    assert c.meta["pruned"]["from"] == ctx.gene.layer_keys() and "layer.2" not in c.coeffs


def _jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_calibrate_cli_runs_a_whole_policy(family, tmp_path, capsys):
    """`safegene calibrate --method P` writes the coefficients the registry's policy P computes on
    the same context (the demo's SafeGene row from the command line), and refuses the calibration
    options it does not carry, by name."""
    from safegene import cli
    from safegene.coeffs import Coeffs

    dirs, gene = family
    harm, ben = _jsonl(tmp_path / "harm.jsonl", tm.HARMFUL), _jsonl(tmp_path / "ben.jsonl", tm.BENIGN)
    out = tmp_path / "coeffs.json"
    args = [str(gene.path), str(dirs["task"]), "--safety", str(harm), "--utility", str(ben), "--steps", "2",
            "--max-new-tokens", "4", "--benign-calib", str(ben), "-o", str(out)]
    capsys.readouterr()
    assert cli.main(["calibrate", *args, "--method", "no-selection-pruned-checked", "--quiet"]) == 0
    got = Coeffs.load(out)
    ref = compute("no-selection-pruned-checked",
                  Context(gene, dirs["task"], str(harm), str(ben), utility=[str(ben)], benign_calib=str(ben),
                          settings=Settings(calib_steps=2, max_new_tokens=4, lambda_max=4.0, max_examples=16,
                                            optimizer="adam", lr=0.05)))
    assert got.coeffs == pytest.approx(ref.coeffs, abs=1e-6)
    assert got.meta["policy"] == "no-selection-pruned-checked"
    assert got.meta["pruned"]["from"] == gene.layer_keys() and got.meta["chosen"] in ("calibrated", "one", "uniform")
    capsys.readouterr()
    assert cli.main(["calibrate", *args, "--method", "no-selection-pruned-checked", "--json"]) == 0
    res = capsys.readouterr()  # stdout: the JSON summary only; progress goes to stderr
    assert json.loads(res.out) == {"output": str(out), "coeffs": got.coeffs, "method": "no-selection-pruned-checked"}
    assert "no-selection-pruned-checked:" in res.err and "wrote" in res.err
    code = cli.main(["calibrate", *args, "--method", "SafeGene-checked", "--beta", "2", "--per-module"])
    err = capsys.readouterr().err
    assert code == 2 and "--method SafeGene-checked does not take --beta, --per-module" in err
    code = cli.main(["calibrate", str(gene.path), str(dirs["task"]), "--safety", str(harm), "-o", str(out),
                          "--method", "SafeGene-checked"])
    assert code == 2 and "needs --task-calib" in capsys.readouterr().err
    code = cli.main(["calibrate", str(gene.path), str(dirs["task"]), "--safety", str(harm), "-o", str(out),
                     "--judge", "organism", "--task-calib", str(ben)])
    assert code == 2 and "--task-calib, --judge only work with --method" in capsys.readouterr().err


def _moved_task(dirs, tmp_path: Path, rows: list[int], tiny_row: int) -> tuple[Path, str]:
    """A task model that is the aligned model with a few token-embedding rows moved (as a fine-tune
    moves the rows of the tokens its data contains), one row moved by a rounding-size amount, and
    one block weight moved; the embedding tensor's name."""
    import shutil

    from safetensors.torch import save_file

    task = tmp_path / "moved-task"
    shutil.copytree(dirs["aligned"], task)
    w = load_file(str(task / "model.safetensors"))
    emb = next(n for n in w if n.endswith("embed_tokens.weight"))
    g = torch.Generator().manual_seed(3)
    for r in rows:
        w[emb][r] += 0.1 * torch.randn(w[emb].shape[1], generator=g)
    w[emb][tiny_row] += 1e-7
    blk = next(n for n in w if "layers.1." in n and n.endswith("weight") and w[n].dim() == 2)
    w[blk] += 0.05
    save_file(w, str(task / "model.safetensors"), metadata={"format": "pt"})
    return task, emb


def test_touched_mode_masks_the_embedding_rows_the_task_moved(family, tmp_path):
    """mode="touched", only=["embed"]: τ's embedding rows the task update moved (above 1e-3 of the
    largest row update) are exactly zero, every other row and every other key is τ bit for bit."""
    from safegene.ops.project import moved_rows

    dirs, gene = family
    task, emb = _moved_task(dirs, tmp_path, rows=[3, 5, 11], tiny_row=7)
    p = project_gene(gene, dirs["aligned"], task, tmp_path / "masked", mode="touched", only=["embed"])
    assert p.tensor_names == gene.tensor_names and p.layer_keys() == gene.layer_keys()
    for n, tau in gene.iter_vectors():
        got = p.load_vectors([n])[n]
        if n == emb:
            moved = torch.zeros(tau.shape[0], dtype=torch.bool)
            moved[[3, 5, 11]] = True
            assert torch.all(got[moved] == 0) and torch.equal(got[~moved], tau[~moved])
        else:  # the moved block weight is not masked: only the embedding key is transformed
            assert torch.equal(got, tau), n
    rec = p.manifest["projection"]
    assert rec["mode"] == "touched" and rec["transformed"] == [emb] and rec["rows_projected"] == 3
    assert rec["rel_tol"] == 1e-3
    assert moved_rows(torch.tensor([0.0, 0.0])).tolist() == [False, False]
    with pytest.raises(UsageError, match="rel_tol must be >= 0"):
        project_gene(gene, dirs["aligned"], task, tmp_path / "x", mode="touched", rel_tol=-1.0)


def test_the_embed_masked_policy_runs_the_adopted_procedure_on_the_masked_gene(family, tmp_path, monkeypatch):
    """no-selection-pruned-checked-embed-masked = no-selection-pruned-checked on the masked gene:
    the same coefficients as that policy given the masked gene, and the masked gene's path in meta
    (the gene the demo applies)."""
    import safegene.baselines.registry as reg

    dirs, gene = family
    task, _emb = _moved_task(dirs, tmp_path, rows=[2, 4], tiny_row=6)
    ctx = Context(gene, task, tm.HARMFUL, tm.BENIGN, aligned=dirs["aligned"], benign_calib=tm.BENIGN,
                  work_dir=tmp_path / "w", settings=SETTINGS)
    watch: dict = {}

    def measure(ctx_):  # the fake measurement of each context's own model (first seen pristine)
        m, _ = ctx_.loaded()
        if id(m) not in watch:
            watch[id(m)] = _patched(m, ctx_, ["layer.2", "layer.3"])[0]
        return _fake(watch[id(m)])()

    monkeypatch.setattr(reg, "calibration_measure", measure)
    c = compute("no-selection-pruned-checked-embed-masked", ctx)
    masked = Gene.load(c.meta["gene_path"])
    assert masked.path.parent == tmp_path / "w" and c.meta["masked"]["rows_projected"] == 2
    ref = compute("no-selection-pruned-checked", Context(masked, task, tm.HARMFUL, tm.BENIGN, benign_calib=tm.BENIGN,
                                                          settings=SETTINGS))
    assert c.coeffs == pytest.approx(ref.coeffs) and c.meta["pruned"]["kept"] == ref.meta["pruned"]["kept"]
    assert get("no-selection-pruned-checked-embed-masked").lam_text(c).endswith("(2 embed rows masked)")
    assert not get("no-selection-pruned-checked-embed-masked").applies(
        Context(gene, task, tm.HARMFUL, tm.BENIGN, settings=SETTINGS))
