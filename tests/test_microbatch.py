"""Calibration in micro-batches and with gradient checkpointing: the loss and the λ-gradient are
the full-batch ones (float64 reference, uneven micro-batches), in both calibration modes, and
the trained λ agree."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

from safegene import lm  # noqa: E402
from safegene.errors import UsageError  # noqa: E402
from safegene.method.calibrate import _Objective, calibrate, checkpointed_blocks  # noqa: E402
from safegene.method.lowmem import LowMemPlan  # noqa: E402
from safegene.method.merge import MergePlan, gene_merge  # noqa: E402

import tiny_models as tm  # noqa: E402

KEYS = ["layer.1", "layer.3", "lm_head"]


@pytest.fixture(scope="module")
def family(gene_family):
    return gene_family


@pytest.fixture(scope="module")
def model64(family):
    dirs, _ = family
    model, tok = lm.load_model(dirs["task"], device="cpu", dtype="f32")
    return model.double().requires_grad_(False), tok


@functools.lru_cache(maxsize=4)
def _pairs_of(model, tok) -> tuple:
    return _pairs(model, tok)


def _pairs(model, tok):
    """5 safety records (uneven micro-batches of 3) and 6 utility records: greedy answers (KL),
    task answers (CE under "auto") and a prompt without any completion (KL at its last token)."""
    safety = lm.encode_pairs(tok, tm.HARMFUL + tm.HARMFUL[:1], "safety")
    prompts = lm.encode_prompts(tok, tm.BENIGN[:3])
    utility = list(zip(prompts, lm.generate_ids(model, tok, prompts, max_new_tokens=6)))
    utility += lm.encode_pairs(tok, tm.BENIGN[3:], "utility") + [(prompts[0], [])]
    tasks = lm.encode_pairs(tok, tm.BENIGN[:1], "utility")
    return safety, utility + tasks


def _grad(model, tok, plan, bind, lam, mbs, ckpt, utility_loss="auto"):
    """Loss, λ-gradient and parts of one objective built at λ = 0 (as calibrate builds it: the
    KL reference is the task model's own distribution, so the plan is restored first)."""
    if plan is not None:
        plan.restore()
    safety, utility = _pairs_of(model, tok)
    obj = _Objective(model, tok, safety, utility, 3.0, 1e-3, utility_loss, 2, "cpu", 0.5, 0.1,
                     micro_batch_size=mbs, checkpointing=ckpt)
    obj.center = torch.tensor(1.0, dtype=lam.dtype)
    lam.grad = None
    if ckpt:
        with checkpointed_blocks(model):
            loss, parts = obj.backward(bind, lam)
    else:
        loss, parts = obj.backward(bind, lam)
    return float(loss), lam.grad.detach().clone(), parts


def _binders(model, gene, kind):
    """λ ↦ the tensors to substitute: the low-memory plan (λ τx in the forward) or plain float64
    autograd in weight space (W⁰ + λ τ: the exact mode's math, without the float32 kernels)."""
    plan = LowMemPlan(model, gene, KEYS)
    if kind == "lowmem":
        return plan, (lambda lam: (lambda: dict(zip(plan.names, gene_merge(lam, plan)))))
    plan.restore()
    params = dict(model.named_parameters())
    base = {n: params[n].detach() for n in plan.names}
    taus = {n: t.to(torch.float64) for n, t in gene.load_vectors(plan.names).items()}
    return None, (lambda lam: (lambda: {n: base[n] + lam[plan.key_of[i]] * taus[n]
                                        for i, n in enumerate(plan.names)}))


@pytest.mark.parametrize("kind", ["lowmem", "weight-space"])
def test_micro_batched_gradient_equals_the_full_batch_in_float64(family, model64, kind):
    dirs, gene = family
    model, tok = model64
    plan, binder = _binders(model, gene, kind)
    try:
        lam = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64, requires_grad=True)
        ref_loss, ref_grad, ref_parts = _grad(model, tok, plan, binder(lam), lam, None, False)
        assert ref_grad.abs().max() > 1e-3 and set(ref_parts) == {"safety", "safety_rest", "utility", "l2",
                                                                  "to_uniform"}
        for mbs, ckpt in [(1, False), (3, False), (None, True), (3, True), (100, False)]:
            loss, grad, parts = _grad(model, tok, plan, binder(lam), lam, mbs, ckpt)
            assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12), (mbs, ckpt, grad, ref_grad)
            assert loss == pytest.approx(ref_loss, rel=1e-12, abs=1e-12)
            assert parts == pytest.approx(ref_parts, rel=1e-12, abs=1e-12)
    finally:
        if plan is not None:
            plan.restore()
    assert not any(m._forward_hooks for m in model.modules())
    assert not any("forward" in b.__dict__ for b in lm.decoder_layers(model))


def test_kl_only_utility_and_no_rest_term(family, model64):
    """The default losses (KL to the task model's own answers, first two refusal tokens only)."""
    dirs, gene = family
    model, tok = model64
    plan = LowMemPlan(model, gene, KEYS)
    try:
        lam = torch.tensor([0.2, 2.1, 1.0], dtype=torch.float64, requires_grad=True)
        bind = lambda: dict(zip(plan.names, gene_merge(lam, plan)))  # noqa: E731
        safety, utility = _pairs_of(model, tok)
        grads = []
        for mbs in (None, 2):
            plan.restore()
            obj = _Objective(model, tok, safety, utility, 3.0, 1e-3, "kl", 2, "cpu", micro_batch_size=mbs)
            lam.grad = None
            obj.backward(bind, lam)
            grads.append(lam.grad.clone())
            assert obj.value(dict(zip(plan.names, plan.weights)), lam)[0] > 0
        assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    finally:
        plan.restore()


def test_exact_mode_gradient_in_micro_batches_and_checkpointed(family):
    """The exact mode's autograd Function (float32 kernels): each micro-batch runs its own merge."""
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device="cpu", dtype="f32")
    model.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = MergePlan(model, gene, KEYS)
    try:
        lam = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float32, requires_grad=True)
        bind = lambda: dict(zip(plan.names, gene_merge(lam, plan)))  # noqa: E731
        ref = _grad(model, tok, plan, bind, lam, None, False)
        for mbs, ckpt in [(1, False), (3, True)]:
            got = _grad(model, tok, plan, bind, lam, mbs, ckpt)
            assert torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-6), (mbs, ckpt, got[1], ref[1])
            assert got[0] == pytest.approx(ref[0], rel=1e-5)
    finally:
        plan.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_checkpointing_recomputes_the_blocks_and_leaves_them_as_they_were(family):
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device="cpu", dtype="f32")
    model.requires_grad_(False)
    blocks = lm.decoder_layers(model)
    calls = []
    handle = blocks[3].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plan = LowMemPlan(model, gene, ["layer.3"])
    batch = lm.collate(lm.encode_pairs(tok, tm.HARMFUL, "t"), lm.pad_id_of(tok))
    try:
        lam = torch.tensor([1.0], requires_grad=True)
        counts = []
        for ckpt in (False, True):
            calls.clear()
            with checkpointed_blocks(model) if ckpt else _null():
                ws = gene_merge(lam, plan)
                out = torch.func.functional_call(model, dict(zip(plan.names, ws)), (),
                                                 {"input_ids": batch.input_ids, "use_cache": False}).logits
                out.float().logsumexp(-1).sum().backward()
                with torch.no_grad():  # without autograd the blocks run once, as without the context
                    model(input_ids=batch.input_ids)
            counts.append(len(calls))
        # forward + no-grad forward; + the recomputation in backward (a pre-hook: a recomputation
        # stops as soon as it has what backward needs, before the module's forward returns)
        assert counts == [2, 3]
    finally:
        plan.restore()
        handle.remove()
    assert not any("forward" in b.__dict__ for b in blocks)


def _null():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("mode", ["exact", "lowmem"])
def test_trained_lambda_equals_the_full_batch_one(family, mode):
    dirs, gene = family
    kw = dict(layers=["layer.2", "layer.3"], steps=4, init=1.0, lr=0.2, device="cpu", log=None, mode=mode,
              safety_rest_weight=0.5)
    full = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, **kw)
    for extra in ({"micro_batch_size": 1}, {"micro_batch_size": 3, "gradient_checkpointing": True}):
        got = calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, **kw, **extra)
        assert got.coeffs == pytest.approx(full.coeffs, abs=1.5e-6), extra
        for a, b in zip(got.meta["history"], full.meta["history"]):
            assert a["lambda"] == pytest.approx(b["lambda"], abs=1e-6)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert got.meta["hyper"]["micro_batch_size"] == extra["micro_batch_size"]


def test_grid_and_heldout_losses_in_micro_batches(family):
    """The no-grad evaluations (grid start, held-out loss) accumulate micro-batches too."""
    dirs, gene = family
    kw = dict(layers=["layer.2", "layer.3"], steps=2, grid_points=3, holdout=0.25, device="cpu", log=None)
    full = calibrate(gene, dirs["task"], tm.HARMFUL * 2, tm.BENIGN * 2, **kw)
    micro = calibrate(gene, dirs["task"], tm.HARMFUL * 2, tm.BENIGN * 2, micro_batch_size=2, **kw)
    assert [p["loss"] for p in micro.meta["grid"]["points"]] == pytest.approx(
        [p["loss"] for p in full.meta["grid"]["points"]], rel=1e-5)
    assert micro.meta["heldout_loss"] == pytest.approx(full.meta["heldout_loss"], rel=1e-5)
    assert micro.coeffs == pytest.approx(full.coeffs, abs=1.5e-6)


def test_a_passed_model_comes_back_unchanged(family):
    dirs, gene = family
    model, tok = lm.load_model(dirs["task"], device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calibrate(gene, model, tm.HARMFUL, tm.BENIGN, tokenizer=tok, layers=["layer.3"], steps=2, init=1.0,
              micro_batch_size=3, gradient_checkpointing=True, log=None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any("forward" in b.__dict__ for b in lm.decoder_layers(model))


@pytest.mark.parametrize("bad", [0, -2])
def test_micro_batch_size_must_be_positive(family, bad):
    dirs, gene = family
    with pytest.raises(UsageError, match="micro_batch_size"):
        calibrate(gene, dirs["task"], tm.HARMFUL, tm.BENIGN, layers=["layer.3"], micro_batch_size=bad, log=None)


def test_cli_flags_reach_calibrate(family, tmp_path, monkeypatch):
    from safegene.cli import cmd_calibrate

    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        from safegene.coeffs import Coeffs

        return Coeffs({"layer.3": 1.0}, {})

    monkeypatch.setattr(cmd_calibrate, "calibrate", fake)
    dirs, gene = family
    argv = [str(gene.path), str(dirs["task"]), "-o", str(tmp_path / "c.json"), "--safety", "s.jsonl",
            "--micro-batch-size", "4", "--gradient-checkpointing", "--safety-rest-weight", "0.5", "--holdout", "0.25",
            "--holdout-by", "index", "--reg-uniform", "0.1", "--patience", "3", "--heldout-patience", "2", "--quiet"]
    opts = cmd_calibrate.COMMAND.parse(argv)
    assert cmd_calibrate.handle_calibrate(opts) == 0
    assert seen["micro_batch_size"] == 4 and seen["gradient_checkpointing"] is True
    assert seen["safety_rest_weight"] == 0.5 and seen["holdout"] == 0.25 and seen["holdout_by"] is None
    assert seen["reg_uniform"] == 0.1 and seen["patience"] == 3 and seen["heldout_patience"] == 2
    defaults = cmd_calibrate.COMMAND.parse(argv[:6])
    assert defaults.micro_batch_size is None and defaults.gradient_checkpointing is False
    assert defaults.holdout_by == "auto"
    # every CLI default is the API's own (the defaults decide results: the two must not drift)
    import inspect

    api = inspect.signature(calibrate).parameters
    for name in ("micro_batch_size", "gradient_checkpointing", "safety_rest_weight", "holdout", "reg_uniform",
                 "patience", "heldout_patience"):
        assert getattr(defaults, name) == api[name].default, name
