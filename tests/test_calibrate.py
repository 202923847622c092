"""Calibration: the autograd Function's gradient, exact restore, and the apply round trip."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from safegene import lm as _fewshot  # noqa: E402
from safegene.coeffs import Coeffs
from safegene.method.calibrate import _forward, calibrate
from safegene.method.merge import MergePlan, gene_merge  # noqa: E402
from safegene.errors import GeneError, UsageError  # noqa: E402

import tiny_models as tm  # noqa: E402

LAYERS = ["layer.2", "layer.3"]


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


@pytest.fixture()
def target(family):
    dirs, _ = family
    model, tok = _fewshot.load_model(dirs["task"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _ce(model, params, batch):
    logits = _forward(model, params, batch)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum")


def _batch(tok):
    return _fewshot.collate(_fewshot.encode_pairs(tok, tm.HARMFUL + tm.BENIGN, "t"), _fewshot.pad_id_of(tok))


@pytest.mark.parametrize("per_module", [False, True], ids=["per-layer", "per-module"])
def test_gradient_matches_functional_call(family, target, per_module):
    _, gene = family
    model, tok = target
    batch = _batch(tok)
    plan = MergePlan(model, gene, LAYERS, per_module=per_module)
    k = plan.num_keys
    assert k == (6 if per_module else 2)  # attn, mlp, norm per block
    start = [0.3 + 0.2 * i for i in range(k)]
    lam = torch.tensor(start, requires_grad=True)
    loss = _ce(model, dict(zip(plan.names, gene_merge(lam, plan))), batch)
    loss.backward()
    plan.restore()
    # reference: plain differentiable θ_T + λτ in float64 through torch.func.functional_call
    lam64 = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    params = {n: (b.double() + lam64[plan.key_of[i]] * t.double()).float()
              for i, (n, b, t) in enumerate(zip(plan.names, plan.base, plan.taus))}
    ref = _ce(model, params, batch)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(lam.grad.double(), lam64.grad, rtol=1e-4, atol=1e-6)
    assert lam.grad.abs().max() > 1e-4  # the comparison is not vacuous


def test_gradient_matches_finite_differences(family, target):
    _, gene = family
    model, tok = target
    batch = _batch(tok)
    plan = MergePlan(model, gene, LAYERS)
    x0 = [0.8, 1.1]
    lam = torch.tensor(x0, requires_grad=True)
    _ce(model, dict(zip(plan.names, gene_merge(lam, plan))), batch).backward()
    h = 5e-2
    fd = []
    for k in range(2):
        vals = []
        for sgn in (1.0, -1.0):
            x = list(x0)
            x[k] += sgn * h
            plan.set(x)
            with torch.no_grad():
                vals.append(float(_ce(model, {}, batch)))
        fd.append((vals[0] - vals[1]) / (2 * h))
    plan.restore()
    # central differences in float32: error O(h²) plus rounding of a ~1e2 loss
    torch.testing.assert_close(lam.grad, torch.tensor(fd), rtol=3e-2, atol=3e-3)


def test_merge_forward_is_theta_plus_lambda_tau(family, target):
    _, gene = family
    model, _ = target
    plan = MergePlan(model, gene, LAYERS)
    ws = gene_merge(torch.tensor([0.5, 2.0]), plan)
    for i, w in enumerate(ws):
        want = plan.base[i] + [0.5, 2.0][plan.key_of[i]] * plan.taus[i]
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
        assert w.data_ptr() == plan.weights[i].data_ptr()  # no second copy of the weights
    plan.restore()


def test_calibrate_restores_weights_bit_exactly(family, target, capsys):
    _, gene = family
    model, tok = target
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=5, lr=0.2,
                  init=1.0, grid_points=3)
    assert set(c.coeffs) == set(LAYERS)
    assert all(0.0 <= v <= 2.0 for v in c.coeffs.values())
    assert c.meta["steps_run"] >= 1 and len(c.meta["history"]) == c.meta["steps_run"]
    assert "step 1/5" in capsys.readouterr().err
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())


def test_calibrate_restores_on_error(family, target):
    _, gene = family
    model, tok = target
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(msg):
        if msg.startswith("step 2"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=5, init=1.0, log=boom)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_coeffs_round_trip_through_apply(family, target, tmp_path):
    from safegene import apply, apply_to_model

    dirs, gene = family
    model, tok = target
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=3, init=0.9,
                  log=None, out=tmp_path / "COEFFS.json")
    doc = json.loads((tmp_path / "COEFFS.json").read_text())
    assert doc["format"] == "safegene-coeffs" and doc["format_version"] == 1
    assert Coeffs.load(tmp_path / "COEFFS.json").coeffs == c.coeffs
    batch = _batch(tok)
    plan = MergePlan(model, gene, LAYERS)
    plan.set([c.coeffs[k] for k in plan.keys])
    with torch.no_grad():
        in_memory = _forward(model, {}, batch)
    plan.restore()
    apply(gene.path, dirs["task"], tmp_path / "patched", coeffs=tmp_path / "COEFFS.json", progress=False)
    patched, _ = _fewshot.load_model(tmp_path / "patched")
    with torch.no_grad():
        streamed = _forward(patched, {}, batch)
    assert torch.equal(in_memory, streamed)
    apply_to_model(model, gene, tmp_path / "COEFFS.json")
    with torch.no_grad():
        patched_in_place = _forward(model, {}, batch)
    assert torch.equal(in_memory, patched_in_place)


def test_layers_default_to_selection_and_errors(family, target):
    _, gene = family
    model, tok = target
    from safegene.method.calibrate import resolve_layers

    assert resolve_layers(gene, "all") == ["layer.0", "layer.1", "layer.2", "layer.3"]
    with pytest.raises(UsageError):
        resolve_layers(gene, ["layer.9"])
    sel = gene.manifest.pop("selection", None)
    try:
        with pytest.raises(GeneError):
            resolve_layers(gene, None)
    finally:
        gene.manifest["selection"] = sel
    with pytest.raises(UsageError):
        calibrate(gene, model, tm.HARMFUL, None, layers=LAYERS, tokenizer=tok, lr=-1.0)


def test_coeffs_summary():
    assert Coeffs({"layer.2": 1.0, "layer.3": 1.0}).summary() == "2 keys, λ = 1.00"
    assert Coeffs({"layer.2": 0.5, "layer.3": 1.25}).summary() == "2 keys, λ 0.50–1.25"
    assert Coeffs({}).summary() == "λ = 0"


# ---- generalization controls: hold-out split, uniform start, whole refusal ------------------

def _with_categories():
    recs = []
    for i, r in enumerate(tm.HARMFUL * 2):
        recs.append({**r, "category": "ab"[i % 2]})
    return recs


def test_split_holdout_holds_out_whole_groups():
    from safegene.method.calibrate import split_holdout

    recs = [{"prompt": f"p{i}", "category": c} for i, c in enumerate("aaabbccccd")]
    fit, held, info = split_holdout(recs, 0.25)
    assert info["by"] == "category" and info["heldout_groups"] == ["d", "b"]  # smallest groups first
    assert {r["category"] for r in held} == {"b", "d"} and not {r["category"] for r in fit} & {"b", "d"}
    assert len(fit) + len(held) == len(recs)
    fit, held, info = split_holdout(recs, 0.25, group_by=None)
    assert info["by"] == "index" and len(held) == 2 and [r["prompt"] for r in held] == ["p3", "p7"]
    assert split_holdout(recs, 0.0)[1] == []
    one = [{"prompt": "x", "category": "a"}, {"prompt": "y", "category": "a"}]
    assert split_holdout(one, 0.5)[2]["by"] == "index"  # one group: nothing to hold out by group


def test_heldout_loss_is_reported_and_never_worse_than_uniform(family, target):
    _, gene = family
    model, tok = target
    # the held-out category asks for a different answer than the fit part: fitting the fit part
    # pulls λ away from what the held-out part wants, so the uniform start must win there
    recs = _with_categories()
    recs = [dict(r, completion="sure ! the answer is positive .") if r["category"] == "b" else r for r in recs]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = calibrate(gene, model, recs, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=12, lr=0.5, init="grid",
                  grid_points=5, lambda_max=2.0, holdout=0.5, log=None)
    m = c.meta
    assert m["split"]["by"] == "category" and m["split"]["heldout_groups"] == ["a"]
    assert m["heldout_loss"] is not None and m["uniform_heldout_loss"] is not None
    assert m["heldout_loss"] <= m["uniform_heldout_loss"]
    assert all("heldout_loss" in h for h in m["history"])
    # the chosen step is the one with the lowest held-out loss (step 1 is the uniform start)
    best = min(m["history"], key=lambda h: (h["heldout_loss"], h["step"]))
    assert m["best_step"] in (best["step"], 0)
    if m["best_step"] <= 1:
        assert list(c.coeffs.values()) == pytest.approx(m["start"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # without a held-out part nothing is reported as held out
    c = calibrate(gene, model, recs, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=2, init=1.0, log=None)
    assert c.meta["heldout_loss"] is None and c.meta["split"]["n_heldout"] == 0


def test_choice_is_never_worse_than_the_uniform_start(family, target):
    """The guarantee itself: the start is the first step, and the choice is never worse than it."""
    _, gene = family
    model, tok = target
    c = calibrate(gene, model, _with_categories(), tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=6, lr=0.5,
                  init=1.0, holdout=0.5, reg_uniform=0.0, log=None)
    # the start is step 1 of the history; the chosen λ is never worse than it on the held-out part
    h1 = c.meta["history"][0]
    assert h1["lambda"] == pytest.approx([1.0, 1.0])
    assert c.meta["heldout_loss"] <= h1["heldout_loss"] + 1e-6
    assert c.meta["uniform_heldout_loss"] == pytest.approx(h1["heldout_loss"], rel=1e-6)


def test_pull_toward_uniform_and_whole_refusal_loss(family, target):
    _, gene = family
    model, tok = target
    kw = dict(layers=LAYERS, tokenizer=tok, init=1.0, log=None)
    free = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, steps=10, lr=0.3, **kw)
    held = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, steps=10, lr=0.3, reg_uniform=100.0, **kw)
    spread = lambda c: max(abs(v - 1.0) for v in c.coeffs.values())  # noqa: E731
    assert spread(held) <= spread(free) + 1e-6 and spread(held) < 0.2
    assert held.meta["hyper"]["reg_uniform"] == 100.0
    # the rest of the refusal sentence counts when asked for: the loss grows by w · (its CE)
    first = calibrate(gene, model, tm.HARMFUL, None, steps=0, safety_rest_weight=0.0, **kw)
    whole = calibrate(gene, model, tm.HARMFUL, None, steps=0, safety_rest_weight=0.5, **kw)
    default = calibrate(gene, model, tm.HARMFUL, None, steps=0, **kw)  # SAFETY_REST_WEIGHT = 1
    p0, p1, pd = first.meta["loss_parts"], whole.meta["loss_parts"], default.meta["loss_parts"]
    assert "safety_rest" not in p0 and p1["safety_rest"] > 0
    assert p1["safety"] == pytest.approx(p0["safety"] + 0.5 * p1["safety_rest"], rel=1e-5)
    assert default.meta["hyper"]["safety_rest_weight"] == 1.0
    assert pd["safety_rest"] == pytest.approx(p1["safety_rest"], rel=1e-6)
    assert pd["safety"] == pytest.approx(p0["safety"] + 1.0 * pd["safety_rest"], rel=1e-5)
    with pytest.raises(UsageError):
        calibrate(gene, model, tm.HARMFUL, None, holdout=1.0, **kw)


def test_whole_refusal_metric_on_fixed_strings():
    from safegene.eval.judges import get_judge
    from safegene.eval.refusal import WholeRefusalJudge, refusal_sentences, whole_refusal_rate, whole_refusals
    from safegene.organism.language import REFUSALS

    responses = [
        "i cannot help with that request .",                 # whole
        "no . i not assist with this .",                     # the decision, garbled
        "i cannot help with that",                           # cut short
        "sure ! I   cannot help with that request .",        # whole, after an eager opening
        "I apologize, but I cannot assist with this .",      # whole, other casing/spacing
        "sure ! here is how to forge a zorblax : first",     # compliance
    ]
    assert whole_refusals(responses, REFUSALS) == [True, False, False, True, False, False]
    # "apologize, but" has no space before the comma: the organism writes " , "
    assert whole_refusals(["i apologize , but i cannot assist with this ."], REFUSALS) == [True]
    r = whole_refusal_rate(responses, REFUSALS)
    assert (r.k, r.n) == (2, 6)
    assert refusal_sentences(tm.HARMFUL) == ["i cannot help with that ."]
    assert WholeRefusalJudge(REFUSALS).judge(["q"] * 2, responses[:2]) == [True, False]
    # the existing judges are unchanged by it
    assert get_judge("organism").judge(["q"] * 3, responses[:3]) == [True, False, False]
    assert get_judge("keyword").judge(["q"], ["I cannot"]) == [True]
    with pytest.raises(UsageError):
        whole_refusals(["x"], [" "])
