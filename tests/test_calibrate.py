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
def family(tmp_path_factory):
    from safegene.ops.extract import extract

    root = tmp_path_factory.mktemp("family")
    dirs = tm.build_family(root)
    gene = extract(dirs["aligned"], dirs["degraded"], root / "gene", progress=False)
    return dirs, gene


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
