"""The one model stack (``safegene.lm``): pickled checkpoints are refused by every command that
loads a model, and calibration encodes a prompt exactly as generation feeds it."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from safegene import lm  # noqa: E402
from safegene.errors import PickleRefusedError  # noqa: E402
from safegene.eval.evaluate import evaluate  # noqa: E402
from safegene.method.calibrate import calibrate  # noqa: E402
from safegene.method.selection import select_layers  # noqa: E402

import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def pickled(gene_family, tmp_path_factory):
    """The task model re-saved as pytorch_model.bin only (no safetensors beside it)."""
    dirs, _ = gene_family
    d = tmp_path_factory.mktemp("pickled") / "task"
    shutil.copytree(dirs["task"], d)
    model, _ = lm.load_model(dirs["task"], device="cpu")
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def test_every_model_loading_command_refuses_a_pickled_checkpoint(gene_family, pickled, monkeypatch):
    dirs, gene = gene_family

    def never(*a, **k):  # nothing may unpickle
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", never)
    msg = r"pytorch_model\.bin\); safegene never unpickles"
    with pytest.raises(PickleRefusedError, match=msg):
        lm.load_model(pickled, device="cpu")
    with pytest.raises(PickleRefusedError, match=msg):
        calibrate(gene, pickled, tm.HARMFUL, tm.BENIGN, layers="all", steps=1, log=None)
    with pytest.raises(PickleRefusedError, match=msg):
        select_layers(gene, pickled, dirs["degraded"], tm.HARMFUL, tm.BENIGN, plot=None)
    with pytest.raises(PickleRefusedError, match=msg):
        evaluate(pickled, harmful=tm.HARMFUL, progress=False)


def test_calibration_tokens_are_what_generation_is_fed(gene_family, monkeypatch):
    dirs, _ = gene_family
    model, tok = lm.load_model(dirs["task"], device="cpu")
    records = tm.HARMFUL + tm.BENIGN
    calib_prompts = [p for p, _ in lm.encode_pairs(tok, records, "t")]
    fed: list[list[int]] = []
    real = model.generate

    def spy(input_ids, attention_mask, **kw):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            fed.append([t for t, m in zip(ids, mask) if m])  # drop the left padding
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "generate", spy)
    from safegene.data import as_examples

    lm.generate(model, tok, as_examples(records), batch_size=3, max_new_tokens=2, progress=False)
    assert sorted(fed) == sorted(calib_prompts)
    assert lm.encode_prompts(tok, records) == calib_prompts
