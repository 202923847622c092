"""Layer selection: the three scores, determinism, gene.json and the plot."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from safegene.errors import UsageError  # noqa: E402
from safegene.method.selection import (  # noqa: E402
    choose, compute_scores, layer_states, refusal_openings, restore_scores, select_layers, validate_k)

import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from safegene.ops.extract import extract

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
    assert choose(sc) == ["layer.1", "layer.2"]  # the threshold rule: >= 0.5 × best
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
    assert ja["method"] == "contrast" and set(ja["all_scores"]) == {"restore", "refusal", "contrast", "loo"}
    png = (tmp_path / "p0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_select_rejects_unknown_score(family):
    dirs, gene_dir = family
    with pytest.raises(UsageError):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, score="nope")


def test_restore_score_rates_every_gene_key_and_leaves_the_model_as_it_was(family):
    from safegene import lm as _fewshot
    from safegene.gene import Gene

    dirs, gene_dir = family
    gene = Gene.load(gene_dir)
    model, tok = _fewshot.load_model(dirs["degraded"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert refusal_openings(tok, tm.HARMFUL) == tok("i", add_special_tokens=False)["input_ids"][:1]
    s = restore_scores(gene, (model, tok), tm.HARMFUL, tm.BENIGN)
    assert list(s) == gene.layer_keys() and "lm_head" in s  # not only decoder blocks
    # degraded differs from aligned only in blocks 2 and 3: elsewhere τ = 0 changes nothing
    assert s["layer.0"] == 0.0 and s["layer.1"] == 0.0 and s["lm_head"] == 0.0
    assert s["layer.2"] != 0.0 or s["layer.3"] != 0.0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # patched keys copied back exactly
    # adding the whole τ to D gives back A: the restored refusal probability is A's
    from safegene.method.selection import refusal_probability

    ids = refusal_openings(tok, tm.HARMFUL)
    a_model, _ = _fewshot.load_model(dirs["aligned"])
    pA = refusal_probability(a_model, tok, tm.HARMFUL, ids)
    pD = refusal_probability(model, tok, tm.HARMFUL, ids)
    assert pA.shape == (len(tm.HARMFUL),) and bool(((pA >= 0) & (pA <= 1)).all()) and not torch.equal(pA, pD)
    from safegene.method.merge import apply_to_model

    apply_to_model(model, gene, {k: 1.0 for k in gene.layer_keys()})
    pDtau = refusal_probability(model, tok, tm.HARMFUL, ids)
    # D + (A − D) is A up to one float32 rounding per weight
    torch.testing.assert_close(pDtau, pA, rtol=0, atol=1e-5)
    assert float((pA - pD).abs().max()) > 1e-4  # the comparison is not vacuous


def test_restore_is_the_default_and_needs_refusals(family):
    dirs, gene_dir = family
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, top_k=2, write=False)
    assert res["method"] == "restore" and len(res["selected"]) == 2
    best = sorted(res["scores"], key=lambda k: -res["scores"][k])[:2]
    assert set(res["selected"]) == set(best)
    bare = [{"prompt": r["prompt"]} for r in tm.HARMFUL]
    with pytest.raises(UsageError, match="refusal"):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], bare, tm.BENIGN, top_k=2, write=False)
    # the activation scores need no refusals; a refusal text stands in for missing completions
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], bare, tm.BENIGN, top_k=2, score="refusal",
                        write=False)
    assert set(res["all_scores"]) == {"refusal", "contrast"}
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], bare, tm.BENIGN, top_k=2,
                        refusal="i cannot help with that .", write=False)
    assert "lm_head" in res["all_scores"]["restore"]


# ---- how many keys: flat scores, validation, the joint score ---------------------------------

def test_flat_scores_keep_every_key():
    from safegene.method.selection import is_flat

    flat = {"layer.0": 0.11, "layer.1": 0.10, "layer.2": 0.12, "lm_head": 0.105}
    assert is_flat(flat, 0.02) and choose(flat, noise=0.02) == list(flat)
    assert choose(flat, noise={"layer.0": 0.001, "layer.1": 0.02}) == list(flat)  # the largest se counts
    # the same scores with little noise are a real ranking: the threshold applies
    assert choose(flat, noise=1e-4) == list(flat)  # all within 0.5 x best anyway
    peaked = {"layer.0": 0.5, "layer.1": 0.05, "layer.2": 0.04, "lm_head": 0.3}
    assert not is_flat(peaked, 0.02) and choose(peaked, noise=0.02) == ["layer.0", "lm_head"]
    # nothing positive: no ranking to trust, keep every key (the plain threshold rule refuses)
    assert is_flat({"layer.0": -0.1, "layer.1": 0.0}, None)
    assert choose({"layer.0": -0.1, "layer.1": 0.0}, noise=0.01) == ["layer.0", "layer.1"]


def test_smallest_k_within_one_standard_error():
    from safegene.method.selection import smallest_within_noise

    curve = [{"k": 1, "loss": 2.0, "se": 0.1}, {"k": 2, "loss": 1.05, "se": 0.1},
             {"k": 3, "loss": 1.0, "se": 0.1}, {"k": 4, "loss": 1.02, "se": 0.1}]
    chosen, best, bound = smallest_within_noise(curve)
    assert best["k"] == 3 and bound == pytest.approx(1.1) and chosen["k"] == 2
    assert smallest_within_noise(curve, z=0.0)[0]["k"] == 3
    # a curve that keeps falling beyond the noise keeps every key
    falling = [{"k": k, "loss": 2.0 - 0.5 * k, "se": 0.01} for k in range(1, 5)]
    assert smallest_within_noise(falling)[0]["k"] == 4


def test_validate_k_never_keeps_a_key_that_adds_nothing(family):
    from safegene import lm as _lm
    from safegene.gene import Gene
    from safegene.method.selection import validate_k

    dirs, gene_dir = family
    gene = Gene.load(gene_dir)
    model, tok = _lm.load_model(dirs["degraded"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # τ is exactly zero outside blocks 2 and 3: ranked after them, blocks 0 and 1 change nothing
    res = validate_k(gene, model, tok, ["layer.2", "layer.3", "layer.0", "layer.1"], tm.HARMFUL, tm.BENIGN)
    c = res["curve"]
    assert [e["k"] for e in c] == [1, 2, 3, 4]
    assert c[2]["loss"] == c[1]["loss"] == c[3]["loss"]
    assert res["k"] <= 2 and set(res["selected"]) <= {"layer.2", "layer.3"}
    # ranked first, they are all a k=1/k=2 curve flat at the degraded model's loss, so the
    # smallest k within noise of the best is the first k that contains the whole change (or k=1)
    res = validate_k(gene, model, tok, ["layer.0", "layer.1", "layer.2", "layer.3"], tm.HARMFUL, tm.BENIGN)
    c = res["curve"]
    assert c[0]["loss"] == c[1]["loss"]
    assert res["k"] in (1, 3, 4) and res["k"] == min(e["k"] for e in c if e["loss"] <= res["bound"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validate_k_forward_search_is_greedy_on_the_development_loss(family):
    """search='forward': each step adds the remaining key whose addition gives the lowest loss (ties
    by rank), so a key ranked last still comes in first when it alone lowers the loss most; the
    sets are nested; a key that carries no τ never comes before one that helps."""
    from safegene import lm as _lm
    from safegene.gene import Gene
    from safegene.method.selection import validate_k

    dirs, gene_dir = family
    gene = Gene.load(gene_dir)
    model, tok = _lm.load_model(dirs["degraded"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranked = ["layer.0", "layer.1", "layer.2", "layer.3"]  # τ is zero on blocks 0 and 1
    fwd = validate_k(gene, model, tok, ranked, tm.HARMFUL, tm.BENIGN, search="forward")
    c = fwd["curve"]
    assert [e["k"] for e in c] == [1, 2, 3, 4]
    assert all(set(a["keys"]) < set(b["keys"]) for a, b in zip(c, c[1:]))
    # the first step is the best single key: one of the two blocks that carry τ, if either helps
    singles = {k: validate_k(gene, model, tok, [k], tm.HARMFUL, tm.BENIGN)["curve"][0]["loss"] for k in ranked}
    best_single = min(ranked, key=lambda k: (singles[k], ranked.index(k)))
    assert c[0]["keys"] == [best_single] and c[0]["loss"] == singles[best_single]
    # the second step: the remaining key whose addition gives the lowest loss, ties by rank
    rest = [k for k in ranked if k != best_single]
    pairs = {k: validate_k(gene, model, tok, [best_single, k], tm.HARMFUL, tm.BENIGN)["curve"][1]["loss"] for k in rest}
    second = min(rest, key=lambda k: (pairs[k], rest.index(k)))
    assert c[1]["keys"] == [best_single, second] and c[1]["loss"] == pairs[second]
    # the last step holds every key: the same loss as the prefix search's last point
    pre = validate_k(gene, model, tok, ranked, tm.HARMFUL, tm.BENIGN)
    assert c[-1]["loss"] == pytest.approx(pre["curve"][-1]["loss"], rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="unknown validation search 'backward'"):
        validate_k(gene, model, tok, ranked, tm.HARMFUL, tm.BENIGN, search="backward")
    with pytest.raises(UsageError, match="unknown validation search"):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, validate_search="x",
                      write=False)


def test_validate_rule_records_both_scores_and_the_curve(family):
    dirs, gene_dir = family
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL * 2, tm.BENIGN * 2,
                        rule="validate", write=False)
    assert {"restore", "loo"} <= set(res["all_scores"]) and {"restore", "loo"} <= set(res["score_noise"])
    # blocks 0/1, embed, norm and head carry no τ: both scores are exactly zero there
    for name in ("restore", "loo"):
        assert all(res["all_scores"][name][k] == 0.0 for k in ("layer.0", "layer.1", "lm_head"))
    v = res["rule"]["validation"]
    assert res["rule"]["rule"] == "validate"
    if v["flat"]:
        assert res["selected"] == list(res["scores"])
    else:
        assert res["selected"] == v["selected"] and len(v["curve"]) == len(res["scores"])
    # validation is the default rule; an explicit top_k / threshold asks for the threshold rule
    from safegene.method.selection import DEFAULT_RULE

    assert DEFAULT_RULE == "validate"
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL * 2, tm.BENIGN * 2, write=False)
    assert res["rule"]["rule"] == "validate"
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, threshold=0.5,
                        write=False)
    assert res["rule"] == {"threshold": 0.5}
    with pytest.raises(UsageError):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, rule="validate",
                      top_k=2, write=False)
    with pytest.raises(UsageError):
        select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL, tm.BENIGN, rule="nope", write=False)


def test_leave_one_out_is_the_joint_effect(family):
    from safegene import lm as _lm
    from safegene.gene import Gene
    from safegene.method.selection import refusal_probability

    dirs, gene_dir = family
    gene = Gene.load(gene_dir)
    model, tok = _lm.load_model(dirs["degraded"])
    joint, noise = {}, {}
    restore_scores(gene, (model, tok), tm.HARMFUL, tm.BENIGN, joint=joint, noise=noise)
    assert set(joint) == set(gene.layer_keys()) and set(noise) == {"restore", "loo"}
    # with two keys carrying τ, leaving one out of the full gene = adding the other alone to D,
    # measured from A: j_3 = [p(A) − p(D + τ_2)]_H − [same]_B
    ids = refusal_openings(tok, tm.HARMFUL)
    a_model, _ = _lm.load_model(dirs["aligned"])
    pA_H, pA_B = (refusal_probability(a_model, tok, x, ids) for x in (tm.HARMFUL, tm.BENIGN))
    from safegene.method.merge import apply_to_model

    apply_to_model(model, gene, {"layer.2": 1.0})
    p2_H, p2_B = (refusal_probability(model, tok, x, ids) for x in (tm.HARMFUL, tm.BENIGN))
    want = float((pA_H - p2_H).mean() - (pA_B - p2_B).mean())
    assert joint["layer.3"] == pytest.approx(want, abs=1e-5)


def test_select_loads_each_model_once_and_scores_as_one_load_per_pass_did(family, monkeypatch):
    """The models are loaded once per select (aligned, then degraded), and every score, the noise
    and the validation curve are exactly those of the former path, which loaded a fresh model for
    each of the four state passes and another degraded one for restore / leave-one-out / validation."""
    from safegene import lm as _lm
    from safegene.gene import Gene
    from safegene.method import selection

    dirs, gene_dir = family
    harm, ben = tm.HARMFUL * 2, tm.BENIGN * 2
    real = _lm.load_model
    loads: list[str] = []

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_lm, "load_model", counting)
    # noise_z=0: no score is flat, so validation runs on the degraded model too
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], harm, ben, write=False, noise_z=0.0)
    assert loads == [str(dirs["aligned"]), str(dirs["degraded"])]
    loads.clear()
    thr = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], harm, ben, top_k=2, write=False)
    assert loads == [str(dirs["aligned"]), str(dirs["degraded"])]
    loads.clear()
    pairs = select_layers(gene_dir, real(dirs["aligned"]), real(dirs["degraded"]), harm, ben, top_k=2, write=False)
    assert loads == [] and pairs["all_scores"] == thr["all_scores"]
    monkeypatch.undo()

    # the former path, one load per pass
    gene = Gene.load(gene_dir)
    h, b, dev_h, dev_b = harm[0::2], ben[0::2], harm[1::2], ben[1::2]
    st = {tag + k: layer_states(d, recs) for tag, d in (("A", dirs["aligned"]), ("D", dirs["degraded"]))
          for k, recs in (("H", h), ("B", b))}
    raw = compute_scores(st["AH"], st["DH"], st["AB"], st["DB"])
    joint: dict = {}
    noise: dict = {}
    restore = restore_scores(gene, dirs["degraded"], h, b, joint=joint, noise=noise)
    r = selection._r
    assert res["all_scores"]["restore"] == {k: r(v) for k, v in restore.items()}
    assert res["all_scores"]["loo"] == {k: r(v) for k, v in joint.items()}
    for name in ("refusal", "contrast"):
        assert res["all_scores"][name] == {f"layer.{i}": r(v) for i, v in enumerate(raw[name])}
    assert res["score_noise"] == {n: {k: r(v) for k, v in d.items()} for n, d in noise.items()}
    v = res["rule"]["validation"]
    assert v["flat"] is False
    val = validate_k(gene, *real(dirs["degraded"]), selection.rank(res["scores"]), dev_h, dev_b)
    assert v["curve"] == val["curve"] and v["selected"] == val["selected"] == res["selected"]


def test_select_progress_bar_and_quiet(family, capsys):
    dirs, gene_dir = family
    res = select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL * 2, tm.BENIGN * 2, write=False,
                        progress=True, noise_z=0.0)
    assert res["rule"]["validation"]["flat"] is False  # the bar's total grows by validation's passes
    err = capsys.readouterr().err
    import re

    done = re.findall(r"select:\s*100%.*?(\d+)/(\d+)", err)
    assert done and done[-1][0] == done[-1][1]  # the bar ends full: its total counts every pass
    select_layers(gene_dir, dirs["aligned"], dirs["degraded"], tm.HARMFUL * 2, tm.BENIGN * 2, write=False)
    assert "select:" not in capsys.readouterr().err  # no bar unless asked (the CLI asks unless --quiet)


def test_select_cli_flags(family, monkeypatch, tmp_path):
    from safegene.cli import cmd_select

    seen: dict = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {"all_scores": {"restore": {"layer.0": 1.0}}, "selected": ["layer.0"], "method": "restore",
                "plot": None}

    monkeypatch.setattr(cmd_select, "select_layers", fake)
    dirs, gene_dir = family
    (tmp_path / "dh.jsonl").write_text('{"prompt": "x"}\n')
    argv = [str(gene_dir), "--aligned", "A", "--degraded", "D", "--harmful", "h", "--benign", "b"]
    opts = cmd_select.COMMAND.parse(argv + ["--rule", "validate", "--dev-harmful", "dh.jsonl", "--dev-benign",
                                            "db.jsonl", "--validate-z", "0.5", "--noise-z", "3", "--quiet"])
    assert cmd_select.handle_select(opts) == 0
    assert seen["rule"] == "validate" and seen["dev_harmful"] == "dh.jsonl" and seen["dev_benign"] == "db.jsonl"
    assert seen["validate_z"] == 0.5 and seen["noise_z"] == 3.0 and seen["progress"] is False
    cmd_select.handle_select(cmd_select.COMMAND.parse(argv))
    assert seen["rule"] is None and seen["progress"] is True and seen["dev_harmful"] is None
    import inspect

    api = inspect.signature(select_layers).parameters
    assert all(seen[k] == api[k].default for k in ("rule", "dev_harmful", "dev_benign", "validate_z", "noise_z"))
    with pytest.raises(SystemExit):
        cmd_select.COMMAND.parse(argv + ["--rule", "nope"])
