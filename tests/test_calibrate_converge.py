"""Calibration that converges (issue 15, item 5): plateau stop and its report, L-BFGS, the
distilled safety target, and the benign (over-refusal) term."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from safegene import lm  # noqa: E402
from safegene.errors import UsageError  # noqa: E402
from safegene.method.calibrate import _Objective, _pred_positions, calibrate  # noqa: E402
from safegene.method.merge import MergePlan, gene_merge  # noqa: E402

import tiny_models as tm  # noqa: E402

LAYERS = ["layer.2", "layer.3"]


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


def _load(path):
    model, tok = lm.load_model(path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@pytest.fixture()
def target(family):
    return _load(family[0]["task"])


def _in_bounds(c, lambda_max):
    hi = lambda_max * (1 + 1e-6)  # λ is float32: float32(1.2) = 1.2000000477 > 1.2
    return all(0.0 <= v <= hi for h in c.meta["history"] for v in h["lambda"]) and all(
        0.0 <= v <= hi for v in c.coeffs.values())


def test_plateau_stops_before_max_steps_and_reports_curves(family, target):
    _, gene = family
    model, tok = target
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=300, lr=0.3, init=1.0,
                  patience=3, tol=1e-3, log=None)
    m = c.meta
    assert m["stopped"] == "plateau" and m["final_step"] < 300
    assert m["final_step"] == m["steps_run"] == len(m["history"]) == m["evaluations"]
    curve = m["curve"]
    assert curve["step"] == list(range(1, m["final_step"] + 1))
    assert len(curve["loss"]) == len(curve["grad_norm"]) == len(curve["projected_grad_norm"]) == m["final_step"]
    assert curve["heldout_loss"] == [None] * m["final_step"]  # no held-out part
    assert all(g >= 0 for g in curve["grad_norm"]) and curve["grad_norm"][0] > 0
    assert all(p <= g + 1e-12 for p, g in zip(curve["projected_grad_norm"], curve["grad_norm"]))
    # it stopped because the last `patience` steps did not improve on the best by tol
    best = min(curve["loss"][: m["best_step"]])
    assert m["best_step"] == m["final_step"] - 3
    assert all(v > best - 1e-3 * max(abs(best), 1.0) for v in curve["loss"][m["best_step"]:])
    assert curve["loss"][m["best_step"] - 1] < curve["loss"][0]  # it did improve first
    assert m["hyper"]["tol"] == 1e-3 and m["optimizer"] == "adam"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # too few steps to reach the plateau: reported as such
    short = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=2, lr=0.3, init=1.0,
                      log=None)
    assert short.meta["stopped"] == "max_steps" and short.meta["final_step"] == 2
    zero = calibrate(gene, model, tm.HARMFUL, None, layers=LAYERS, tokenizer=tok, steps=0, init=1.0, log=None)
    assert zero.meta["stopped"] == "no_steps" and zero.meta["curve"]["loss"] == []
    with pytest.raises(UsageError):
        calibrate(gene, model, tm.HARMFUL, None, layers=LAYERS, tokenizer=tok, optimizer="sgd", log=None)


def test_plateau_on_the_heldout_loss(family, target):
    _, gene = family
    model, tok = target
    recs = [dict(r, category=c) for r, c in zip(tm.HARMFUL + tm.HARMFUL, "aabbccdd")]
    c = calibrate(gene, model, recs, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=200, lr=0.3, init=1.0,
                  holdout=0.25, patience=3, log=None)
    m = c.meta
    assert m["split"]["n_heldout"] > 0 and m["stopped"] == "plateau" and m["final_step"] < 200
    held = m["curve"]["heldout_loss"]
    assert None not in held and len(held) == m["final_step"]
    # the chosen step and the stop are the held-out loss's
    assert m["best_step"] == m["final_step"] - 3
    assert held[m["best_step"] - 1] == pytest.approx(min(held), rel=1e-3)


def test_lbfgs_no_worse_than_adam_at_equal_evaluations_and_clamped(family, target):
    _, gene = family
    model, tok = target
    kw = dict(layers=LAYERS, tokenizer=tok, init=1.0, log=None, patience=50)
    for lambda_max in (4.0, 1.2):  # 1.2: the bound is active
        lb = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, steps=8, lr=1.0, optimizer="lbfgs", lambda_max=lambda_max,
                       **kw)
        n = lb.meta["evaluations"]
        assert n >= lb.meta["final_step"] and lb.meta["optimizer"] == "lbfgs"
        ad = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, steps=n, lambda_max=lambda_max, **kw)
        assert ad.meta["evaluations"] == n
        assert lb.meta["loss"] <= ad.meta["loss"] + 1e-4 * max(1.0, abs(ad.meta["loss"])), (lambda_max, lb.meta,
                                                                                           ad.meta)
        assert _in_bounds(lb, lambda_max) and _in_bounds(ad, lambda_max)
        if lambda_max == 1.2:  # the bound is active for Adam's iterates: the clamp held them
            assert max(v for h in ad.meta["history"] for v in h["lambda"]) == pytest.approx(1.2)
        start = lb.meta["history"][0]["loss"]
        assert lb.meta["loss"] < start  # it moved


def _distill_objective(model, tok, teacher, k: int):
    prompts = lm.encode_prompts(tok, tm.HARMFUL)
    pairs = list(zip(prompts, lm.generate_ids(teacher, tok, prompts, max_new_tokens=k)))
    return _Objective(model, tok, pairs, [], 3.0, 0.0, "kl", k, "cpu", 0.0, 0.0, teacher=teacher), pairs


def test_distill_target_zero_gradient_at_the_aligned_model(family):
    dirs, gene = family
    aligned, tok = _load(dirs["aligned"])
    teacher = copy.deepcopy(aligned)
    k = 4
    lam0 = torch.zeros(2, requires_grad=True)
    # the patched model at λ = 0 *is* the aligned one: the KL is zero and so is its gradient
    obj, _ = _distill_objective(aligned, tok, teacher, k)
    plan = MergePlan(aligned, gene, LAYERS)
    try:
        loss, parts = obj.backward(lambda: dict(zip(plan.names, gene_merge(lam0, plan))), lam0)
    finally:
        plan.restore()
    assert abs(float(loss)) < 1e-6 and parts["safety"] == pytest.approx(0.0, abs=1e-6)
    assert float(lam0.grad.abs().max()) < 1e-5

    # the task model: a positive KL equal to a float64 reference, and a non-zero gradient
    model, _ = _load(dirs["task"])
    obj, pairs = _distill_objective(model, tok, teacher, k)
    lam = torch.tensor([0.6, 1.3], requires_grad=True)
    plan = MergePlan(model, gene, LAYERS)
    try:
        loss, _ = obj.backward(lambda: dict(zip(plan.names, gene_merge(lam, plan))), lam)
        base64 = {n: (b.double() + [0.6, 1.3][plan.key_of[i]] * t.double())
                  for i, (n, b, t) in enumerate(zip(plan.names, plan.base, plan.taus))}
    finally:
        plan.restore()
    batch = lm.collate(pairs, lm.pad_id_of(tok))
    r, p, _t = _pred_positions(batch)
    m64, t64 = copy.deepcopy(model).double(), copy.deepcopy(teacher).double()
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        logp = torch.log_softmax(torch.func.functional_call(m64, base64, (), kw).logits[r, p], -1)
        q = torch.log_softmax(t64(**kw).logits[r, p], -1)
    tok_kl = (q.exp() * (q - logp)).sum(-1)
    rows = torch.stack([tok_kl[r == i].mean() for i in range(len(pairs))])
    ref = float(rows.mean())
    assert ref > 1e-4  # the task model is not the aligned one: the comparison below is not vacuous
    assert float(loss) == pytest.approx(ref, rel=1e-4)
    assert float(lam.grad.abs().max()) > 1e-4


def test_distill_through_calibrate(family, target):
    dirs, gene = family
    model, tok = target
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=3, init=1.0,
                  safety_target="distill", aligned=dirs["aligned"], distill_k=4, log=None)
    assert c.meta["hyper"]["safety_target"] == "distill" and c.meta["hyper"]["distill_k"] == 4
    assert c.meta["history"][0]["safety"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # micro-batched: the same loss
    mb = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=3, init=1.0,
                   safety_target="distill", aligned=dirs["aligned"], distill_k=4, micro_batch_size=3,
                   benign=tm.BENIGN, log=None)
    whole = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=3, init=1.0,
                      safety_target="distill", aligned=dirs["aligned"], distill_k=4, benign=tm.BENIGN, log=None)
    # the total (~5e-3) sums KL terms that are differences of O(1) float32 log-probabilities, so
    # padding to another length moves it by ~1e-7 absolute on some CPUs (1.6e-5 relative seen)
    assert mb.meta["history"][0]["loss"] == pytest.approx(whole.meta["history"][0]["loss"], rel=1e-4)
    # the benign KL is ~3e-4, a difference of O(1) float32 log-probabilities: padding to another length
    # moves it by ~1e-8 absolute (5e-5 relative)
    assert mb.meta["history"][0]["benign"] == pytest.approx(whole.meta["history"][0]["benign"], rel=1e-3)
    with pytest.raises(UsageError):
        calibrate(gene, model, tm.HARMFUL, None, layers=LAYERS, tokenizer=tok, safety_target="distill", log=None)


def test_benign_term_gradient_matches_float64_finite_differences(family, target):
    _, gene = family
    model, tok = target
    bk, beta, w = 3, 3.0, 0.7
    prompts = lm.encode_prompts(tok, tm.BENIGN)
    b_pairs = list(zip(prompts, lm.generate_ids(model, tok, prompts, max_new_tokens=bk)))
    s_pairs = lm.encode_pairs(tok, tm.HARMFUL, "safety")
    x0 = [0.8, 1.1]

    def grad(benign):
        obj = _Objective(model, tok, s_pairs, [], beta, 0.0, "kl", 2, "cpu", 1.0, 0.0,
                         benign_pairs=b_pairs if benign else None, benign_weight=w)
        lam = torch.tensor(x0, requires_grad=True)
        plan = MergePlan(model, gene, LAYERS)
        try:
            _loss, parts = obj.backward(lambda: dict(zip(plan.names, gene_merge(lam, plan))), lam)
        finally:
            plan.restore()
        return lam.grad.clone(), parts

    g_with, parts = grad(True)
    g_without, parts0 = grad(False)
    assert "benign" in parts and "benign" not in parts0 and parts["benign"] > 0
    # float64 reference of the benign term: KL(θ_T ‖ θ(λ)) on θ_T's own first bk tokens
    batch = lm.collate(b_pairs, lm.pad_id_of(tok))
    r, p, _t = _pred_positions(batch)
    m64 = copy.deepcopy(model).double()
    plan = MergePlan(model, gene, LAYERS)
    base, taus, names, key_of = ([b.double() for b in plan.base], [t.double() for t in plan.taus], list(plan.names),
                                 list(plan.key_of))
    plan.restore()
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def benign64(x):
        params = {n: b + x[key_of[i]] * t for i, (n, b, t) in enumerate(zip(names, base, taus))}
        with torch.no_grad():
            logp = torch.log_softmax(torch.func.functional_call(m64, params, (), kw).logits[r, p], -1)
            q = torch.log_softmax(m64(**kw).logits[r, p], -1)
        tok_kl = (q.exp() * (q - logp)).sum(-1)
        return float(torch.stack([tok_kl[r == i].mean() for i in range(len(b_pairs))]).mean())

    assert benign64(x0) == pytest.approx(parts["benign"], rel=1e-3)  # float32 KL of ~2e-4 vs float64
    h = 1e-4
    j = 1  # one λ
    fd = (benign64([x0[0], x0[1] + h]) - benign64([x0[0], x0[1] - h])) / (2 * h)
    assert abs(fd) > 1e-4  # not vacuous
    assert float(g_with[j] - g_without[j]) == pytest.approx(beta * w * fd, rel=2e-3, abs=1e-6)
