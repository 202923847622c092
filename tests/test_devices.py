"""Method-level tests on every available device (``conftest.DEVICES``: CPU always, CUDA when a
device and a CUDA build exist): the in-memory merge equals the streamed ``apply`` bit for bit,
and calibration's λ-gradient equals the float64 reference Σ_t ⟨∂L/∂W_t, τ_t⟩."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import safegene  # noqa: E402
from safegene import lm  # noqa: E402
from safegene.method.calibrate import _forward  # noqa: E402
from safegene.method.merge import MergePlan, gene_merge  # noqa: E402

import tiny_models as tm  # noqa: E402
from conftest import DEVICES  # noqa: E402

COEFFS = {"layer.1": 0.75, "layer.3": 1.25, "lm_head": -0.5}


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


def _batch(tok, device):
    return lm.collate(lm.encode_pairs(tok, tm.HARMFUL + tm.BENIGN, "t"), lm.pad_id_of(tok), device)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_to_model_equals_streamed_apply(family, tmp_path, device):
    dirs, gene = family
    safegene.apply(gene, dirs["task"], tmp_path / "patched", coeffs=COEFFS, progress=False)
    want, _ = lm.load_model(tmp_path / "patched", device="cpu")
    model, _ = lm.load_model(dirs["task"], device=device)
    used = safegene.apply_to_model(model, gene, COEFFS)
    assert used and set(gene.layer_key(n) for n in used) == set(COEFFS)
    got = {k: v.cpu() for k, v in model.state_dict().items()}
    for k, v in want.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("device", DEVICES)
def test_lambda_gradient_matches_float64_reference(family, device):
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device=device)
    plan = MergePlan(model, gene, ["layer.2", "layer.3"])
    assert plan.keys == ["layer.2", "layer.3"]
    lam = torch.tensor([0.6, 1.1], dtype=torch.float32, device=plan.taus[0].device, requires_grad=True)
    batch = _batch(tok, device)
    try:
        params = dict(zip(plan.names, gene_merge(lam, plan)))
        logits = _forward(model, params, batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 batch.labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        got = lam.grad.detach().double().cpu()
        # Reference: the same forward with the merged weights as leaves, then Σ ⟨∂L/∂W, τ⟩ in float64.
        plan.set(lam.detach())
        leaves = {n: w.detach().clone().requires_grad_(True) for n, w in zip(plan.names, plan.weights)}
        ref_logits = _forward(model, leaves, batch)
        torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, ref_logits.shape[-1]).float(),
                                          batch.labels[:, 1:].reshape(-1), ignore_index=-100).backward()
        want = torch.zeros(plan.num_keys, dtype=torch.float64)
        for n, t, k in zip(plan.names, plan.taus, plan.key_of):
            want[k] += (leaves[n].grad.double() * t.double()).sum().cpu()
    finally:
        plan.restore()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
