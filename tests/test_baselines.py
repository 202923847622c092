"""The registry of coefficient policies (safegene.baselines): every policy turns one context into
a Coeffs over the gene's keys, the demo and bench/real loop over it, and a wrong name says which
names exist."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")

from safegene import baselines  # noqa: E402
from safegene.baselines import Context, Settings, compute, get, names, select  # noqa: E402
from safegene.coeffs import Coeffs, resolve_coeffs  # noqa: E402
from safegene.errors import UsageError  # noqa: E402

import tiny_models as tm  # noqa: E402

SELECTED = ["layer.2", "layer.3"]
SETTINGS = Settings(calib_steps=2, resta_grid=(0.5, 1.0), max_new_tokens=4, batch_size=8)


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


def _ctx(family, **kw) -> Context:
    dirs, gene = family
    args = dict(aligned=dirs["aligned"], degraded=dirs["degraded"], selected=SELECTED,
                other_selections={"refusal": ["layer.3"]}, settings=SETTINGS)
    args.update(kw)
    return Context(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, **args)


@pytest.mark.parametrize("name", names())
def test_every_policy_returns_coeffs_over_gene_keys(family, name):
    ctx = _ctx(family)
    model, _ = ctx.loaded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = get(name)
    c = compute(name, ctx)
    assert isinstance(c, Coeffs)
    assert set(c.coeffs) <= set(ctx.gene.layer_keys()), c.coeffs
    assert all(isinstance(v, float) and math.isfinite(v) for v in c.coeffs.values())
    assert c.meta["policy"] == name and c.meta["policy_seconds"] >= 0
    resolve_coeffs(ctx.gene, None, c)  # what apply / apply_to_model accept
    assert isinstance(policy.lam_text(c), str) and json.dumps(policy.details(c))
    # the task model the caller lent is handed back untouched
    after = model.state_dict()
    assert all(after[k].equal(v) for k, v in before.items())


def test_none_is_empty(family):
    c = compute("none", _ctx(family))
    assert c.coeffs == {} and get("none").lam_text(c) == "—"


def test_resta_is_one_gamma_on_every_key_and_equals_apply_scale(family, tmp_path):
    from safegene.ops.apply import apply

    ctx = _ctx(family)
    c = compute("RESTA", ctx)
    gamma = c.meta["gamma"]
    assert gamma in SETTINGS.resta_grid
    assert c.coeffs == {k: gamma for k in ctx.gene.layer_keys()}
    assert get("RESTA").lam_text(c) == f"γ = {gamma:g} (all tensors)"
    # the per-key form writes exactly the checkpoint RESTA's `apply --scale γ` writes
    apply(ctx.gene, ctx.task, tmp_path / "keys", coeffs=c, progress=False)
    apply(ctx.gene, ctx.task, tmp_path / "scale", scale=gamma, progress=False)
    assert (tmp_path / "keys" / "model.safetensors").read_bytes() == (tmp_path / "scale" / "model.safetensors").read_bytes()


def test_key_sets_of_the_ablations(family):
    ctx = _ctx(family)
    assert compute("no-calibration", ctx).coeffs == {k: 1.0 for k in SELECTED}
    assert sorted(compute("SafeGene", ctx).coeffs) == SELECTED
    assert sorted(compute("no-selection", ctx).coeffs) == sorted(ctx.gene.layer_keys())
    alt = get("SafeGene-alt-score")
    assert alt.applies(ctx) and alt.label(ctx) == "SafeGene[refusal]"
    assert sorted(compute(alt, ctx).coeffs) == ["layer.3"]
    assert not alt.applies(_ctx(family, other_selections={"refusal": []}))


def test_safemerge_flags_blocks_against_the_aligned_model(family):
    dirs, gene = family
    # the degraded model as "task": its update is exactly −τ in the blocks it changed
    ctx = Context(gene, dirs["degraded"], tm.HARMFUL, tm.BENIGN, aligned=dirs["aligned"])
    c = compute("SafeMERGE", ctx)
    assert c.coeffs == {"layer.2": 1.0, "layer.3": 1.0}
    assert get("SafeMERGE").lam_text(c) == "2 layers at 1.0"
    with pytest.raises(UsageError, match="aligned"):
        compute("SafeMERGE", Context(gene, dirs["degraded"], tm.HARMFUL, tm.BENIGN))


def test_selection_comes_from_the_gene_or_a_clear_error(family):
    ctx = _ctx(family, selected=None)
    with pytest.raises(UsageError, match="no layer selection"):
        compute("SafeGene", ctx)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(UsageError) as exc:
        get("SafeGene2")
    msg = str(exc.value)
    assert "'SafeGene2'" in msg and all(n in msg for n in names())
    with pytest.raises(UsageError, match="unknown method.*bogus.*choose from"):
        select(["none", "bogus"])


def test_registry_order_is_the_table_order():
    assert names()[: len(baselines.DEFAULT_METHODS)] == list(baselines.DEFAULT_METHODS)
    assert [p.name for p in select(["SafeGene", "none", "RESTA"])] == ["none", "RESTA", "SafeGene"]
    slugs = [p.slug for p in baselines.iter_policies()]
    assert len(set(slugs)) == len(slugs) and all(s.isidentifier() for s in slugs)


def test_resta_loss_is_the_grid_point_of_lowest_calibration_loss(family):
    """RESTA-loss: one γ on every key, the resta_grid point where SafeGene's own few-shot objective
    (same examples, same loss) is lowest: equal to scoring each γ separately (calibrate with
    steps=0 from that uniform start), the other code path."""
    from safegene.method.calibrate import calibrate

    grid = (0.25, 0.5, 1.0, 2.0)
    ctx = _ctx(family, settings=Settings(resta_grid=grid))
    c = compute("RESTA-loss", ctx)
    keys = ctx.gene.layer_keys()
    gamma = c.meta["gamma"]
    assert c.coeffs == {k: gamma for k in keys} and get("RESTA-loss").lam_text(c) == f"γ = {gamma:g} (all tensors, by loss)"
    model, tok = ctx.loaded()
    losses = {g: calibrate(ctx.gene, model, ctx.safety, ctx.utility, layers=keys, tokenizer=tok, steps=0, init=g,
                           lambda_max=max(grid), log=None).meta["loss"] for g in grid}
    assert [p["gamma"] for p in c.meta["grid"]["points"]] == list(grid)
    for p in c.meta["grid"]["points"]:
        assert p["loss"] == pytest.approx(losses[p["gamma"]], rel=1e-5)
    assert gamma == min(grid, key=lambda g: (losses[g], g))
    assert len(set(round(v, 6) for v in losses.values())) > 1  # the grid points differ: the choice means something
    with pytest.raises(UsageError, match="grid_values must be"):
        calibrate(ctx.gene, model, ctx.safety, ctx.utility, layers=keys, tokenizer=tok, steps=0, grid_values=[0.5, 9.0],
                  lambda_max=4.0, log=None)


def test_calibrate_options_reach_the_calibrated_policies(family):
    """Settings.optimizer / safety_target / benign go to calibrate for SafeGene and no-selection
    (issue 15: the converging optimiser, the aligned model's own refusals as the target, benign
    prompts in the utility term), and distillation without the aligned model is a clear error."""
    s = Settings(calib_steps=2, optimizer="lbfgs", safety_target="distill", benign=tm.BENIGN)
    for name in ("SafeGene", "no-selection"):
        c = compute(name, _ctx(family, settings=s))
        h = c.meta["hyper"]
        assert c.meta["optimizer"] == h["optimizer"] == "lbfgs" and h["safety_target"] == "distill"
        assert h["aligned"] == str(_ctx(family).aligned) and h["n_benign"] > 0
    plain = compute("SafeGene", _ctx(family, settings=Settings(calib_steps=2)))
    assert plain.meta["optimizer"] == "adam" and plain.meta["hyper"]["safety_target"] == "string"
    assert plain.meta["hyper"]["n_benign"] == 0
    with pytest.raises(UsageError, match="needs the aligned model"):
        compute("SafeGene", _ctx(family, aligned=None, settings=Settings(calib_steps=1, safety_target="distill")))


def test_resta_loss_scores_the_same_objective_as_safegene(family):
    """RESTA-loss reads the objective's knobs (safety target, benign term, example count) from the
    same Settings as SafeGene: with the aligned model's own refusals as the target and benign
    prompts in the utility term, each grid point's loss is calibrate's loss at that uniform γ
    under those options, not the plain-string loss."""
    from safegene.method.calibrate import calibrate

    grid = (0.5, 1.0, 2.0)
    opts = dict(safety_target="distill", benign=tm.BENIGN, max_examples=4)
    ctx = _ctx(family, settings=Settings(resta_grid=grid, optimizer="lbfgs", **opts))
    c = compute("RESTA-loss", ctx)
    plain = compute("RESTA-loss", _ctx(family, settings=Settings(resta_grid=grid)))
    model, tok = ctx.loaded()
    keys = ctx.gene.layer_keys()
    for p in c.meta["grid"]["points"]:
        ref = calibrate(ctx.gene, model, ctx.safety, ctx.utility, layers=keys, tokenizer=tok, steps=0, init=p["gamma"],
                        lambda_max=max(grid), aligned=ctx.aligned, log=None, **opts).meta["loss"]
        assert p["loss"] == pytest.approx(ref, rel=1e-5)
    assert [p["loss"] for p in c.meta["grid"]["points"]] != pytest.approx([p["loss"] for p in plain.meta["grid"]["points"]])
    with pytest.raises(UsageError, match="needs the aligned model"):
        compute("RESTA-loss", _ctx(family, aligned=None, settings=Settings(resta_grid=grid, safety_target="distill")))


def test_the_step_size_setting_reaches_calibrate(family):
    """Settings.lr is calibrate's lr for every calibrating policy (None keeps calibrate's 0.05)."""
    import dataclasses

    for lr, want in ((None, 0.05), (0.5, 0.5)):
        ctx = _ctx(family, settings=dataclasses.replace(SETTINGS, lr=lr))
        for name in ("SafeGene", "no-selection"):
            c = compute(name, ctx)
            assert c.meta["hyper"]["lr"] == want and get(name).details(c)["lr"] == want
