"""A loaded model on a device other than the process default (issue #16): calibrate, select and
eval take their inputs to the model's own device without being told the device again.

On a machine whose default device is ``cuda`` a user may well pass a model that lives on the CPU
(or on ``cuda:1``); here the default is made ``cuda`` on a machine without one, so any input,
τ or copy sent to the default device instead of the model's would fail."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safegene import lm  # noqa: E402
from safegene.eval import judges  # noqa: E402
from safegene.eval.evaluate import evaluate  # noqa: E402
from safegene.method.calibrate import calibrate  # noqa: E402
from safegene.method.selection import select_layers  # noqa: E402

import tiny_models as tm  # noqa: E402

LAYERS = ["layer.2", "layer.3"]


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


@pytest.fixture
def cuda_default(monkeypatch):
    """The process default device is ``cuda`` (absent here); the models stay on the CPU."""
    monkeypatch.setattr(lm, "default_device", lambda: "cuda")
    monkeypatch.setattr(judges, "default_device", lambda: "cuda")
    seen: list[str] = []
    real = lm.collate
    monkeypatch.setattr(lm, "collate", lambda pairs, pad, dev="cpu": seen.append(str(dev)) or real(pairs, pad, dev))
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where 'cuda' is not a device")
@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_calibrate_a_model_off_the_default_device(family, cuda_default, mode):
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = calibrate(gene, model, tm.HARMFUL, tm.BENIGN, layers=LAYERS, tokenizer=tok, steps=2, init=1.0, log=None,
                  mode=mode)
    assert set(c.coeffs) == set(LAYERS)
    assert cuda_default and set(cuda_default) == {"cpu"}
    assert all(p.device.type == "cpu" and torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the same λ as the model loaded from its directory with the device named
    want = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, layers=LAYERS, steps=2, init=1.0, log=None,
                     mode=mode, device="cpu")
    assert c.coeffs == want.coeffs


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where 'cuda' is not a device")
def test_select_and_eval_a_model_off_the_default_device(family, cuda_default):
    dirs, gene = family
    aligned = lm.load_model(dirs["aligned"], device="cpu")
    degraded = lm.load_model(dirs["degraded"], device="cpu")
    res = select_layers(gene, aligned, degraded, tm.HARMFUL, tm.BENIGN, top_k=2, write=False)
    assert len(res["selected"]) == 2
    rep = evaluate(degraded, harmful=tm.HARMFUL, benign=tm.BENIGN, max_new_tokens=3, progress=False)
    assert rep.asr is not None and rep.asr.n == len(tm.HARMFUL)
    assert all(p.device.type == "cpu" for m in (aligned[0], degraded[0]) for p in m.parameters())
