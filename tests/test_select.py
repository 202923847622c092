"""Layer selection: the two scores, determinism, gene.json and the plot."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from safegene.errors import UsageError  # noqa: E402
from safegene.select import choose, compute_scores, layer_states, select_layers  # noqa: E402

import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from safegene.extract import extract

    root = tmp_path_factory.mktemp("family")
    dirs = tm.build_family(root)
    extract(dirs["aligned"], dirs["degraded"], root / "gene", progress=False)
    return dirs, root / "gene"


def _synthetic(n=8, L=4, d=16, shifted_layer=2, seed=0):
    """Residual states where D differs from A only in block ``shifted_layer``'s write, along the
    harmful-vs-benign direction on harmful prompts, and along a random direction on benign ones."""
    g = torch.Generator().manual_seed(seed)
    base_h = torch.randn(n, L + 1, d, generator=g)
    base_b = torch.randn(n, L + 1, d, generator=g)
    refusal = torch.zeros(d)
    refusal[0] = 1.0
    hA_h = base_h + 3.0 * refusal  # harmful prompts sit further along the refusal direction
    hA_b = base_b.clone()
    hD_h, hD_b = hA_h.clone(), hA_b.clone()
    hD_h[:, shifted_layer + 1:] -= 2.0 * refusal  # block `shifted_layer` wrote less refusal in D
    noise = torch.zeros(d)
    noise[5] = 0.5
    hD_b[:, shifted_layer + 1:] += noise
    return hA_h, hD_h, hA_b, hD_b


def test_scores_find_the_layer_that_carries_refusal():
    s = compute_scores(*_synthetic(shifted_layer=2))
    assert max(range(4), key=lambda i: s["refusal"][i]) == 2
    assert s["refusal"][2] > 0 and all(abs(v) < 1e-6 for i, v in enumerate(s["refusal"]) if i != 2)
    assert s["contrast"][2] == pytest.approx(4.0, rel=1e-5)  # ‖2r‖ / ‖0.5 e5‖
    # a block that moved harmful prompts *towards* compliance is positive under contrast
    # (it only sees a change) but negative under the refusal score
    hA_h, hD_h, hA_b, hD_b = _synthetic(shifted_layer=1)
    s = compute_scores(hD_h, hA_h, hD_b, hA_b)  # swap A and D
    assert s["refusal"][1] < 0 < s["contrast"][1]


def test_choose_rules():
    sc = {"layer.0": 0.1, "layer.1": 0.9, "layer.2": 1.0, "layer.3": 0.4}
    assert choose(sc, top_k=2) == ["layer.1", "layer.2"]
    assert choose(sc) == ["layer.1", "layer.2"]  # default: >= 0.5 × best
    assert choose(sc, threshold=0.3) == ["layer.1", "layer.2", "layer.3"]
    with pytest.raises(UsageError):
        choose(sc, top_k=0)
    with pytest.raises(UsageError):
        choose(sc, top_k=1, threshold=0.5)
    with pytest.raises(UsageError):
        choose({"layer.0": -1.0, "layer.1": 0.0})


def test_layer_states_shape_and_embedding_entry(family):
    dirs, _ = family
    hs = layer_states(dirs["aligned"], tm.HARMFUL)
    assert hs.shape == (len(tm.HARMFUL), 5, 32) and hs.dtype == torch.float32
    # index 0 is the embedding of the last prompt token; blocks change it
    assert not torch.equal(hs[:, 0], hs[:, 1])


def test_select_is_deterministic_and_writes_gene_json(family, tmp_path):
    from safegene.gene import Gene

    dirs, gene_dir = family
    runs = []
    for i in range(2):
        res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN,
                            top_k=2, score="contrast", plot=tmp_path / f"p{i}.png")
        runs.append((res, json.loads((gene_dir / "gene.json").read_text())["selection"]))
    (a, ja), (b, jb) = runs
    assert a["all_scores"] == b["all_scores"] and a["selected"] == b["selected"]
    assert {k: v for k, v in ja.items() if k != "plot"} == {k: v for k, v in jb.items() if k != "plot"}
    # the degraded copy differs from the aligned one only in blocks 2 and 3
    assert a["all_scores"]["contrast"]["layer.0"] == 0.0 and a["all_scores"]["contrast"]["layer.1"] == 0.0
    assert a["selected"] == ["layer.2", "layer.3"]
    assert Gene.load(gene_dir).selection["selected"] == ["layer.2", "layer.3"]
    assert ja["method"] == "contrast" and set(ja["all_scores"]) == {"refusal", "contrast"}
    png = (tmp_path / "p0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_select_rejects_unknown_score(family):
    dirs, gene_dir = family
    with pytest.raises(UsageError):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, score="nope")
