"""Few-shot, layer-wise recalibration of the gene's coefficients for one task model.

For a task model θ_T and the gene τ (selected layers l), learn one scalar per layer::

    θ(λ) = θ_T + Σ_l λ_l τ_l,    λ_l ∈ [0, λ_max]

minimising, on a handful of examples,

    L(λ) = CE(refusal | harmful prompt)  +  β · U(λ)  +  l2 · ‖λ‖²

where U is the cross-entropy of the task answers (records with a completion) and/or the KL
from θ_T's own next-token distribution (records without one, e.g. benign prompts: at the
first response token, which is where a small model decides to refuse). Only λ is trained.

How the gradient reaches λ without a second model
-------------------------------------------------
:class:`GeneMerge` is a ``torch.autograd.Function``. Its forward writes
``W_t = RNE(W_t⁰ + λ_{l(t)} τ_t)`` into the target's own parameter storage with one batched
:func:`safegene.engine.native.scale_add_` call and returns aliases of those tensors, which
``torch.func.functional_call`` substitutes for the parameters; its backward turns the weight
gradients into ``∂L/∂λ_l = Σ_{t∈l} ⟨∂L/∂W_t, τ_t⟩`` with one batched :func:`safegene.engine.native.dot`
call. Memory beyond the model itself: τ and an untouched copy W⁰ of the *selected* tensors
only (and their gradients during backward). Each step re-applies λ from W⁰ rather than adding
Δλ·τ incrementally: in bf16 an increment smaller than half an ulp of W is lost, and drift
would make the trained weights differ from what ``safegene apply`` writes; from W⁰ they are
bit-identical to ``apply`` (same float32 math, same single rounding). When the loop ends (also
on error or Ctrl-C), W⁰ is copied back, so the model is restored bit-exactly.

Loss weighting matters more than anything else measured on the organism. A model decides
to refuse with its first response tokens; averaged over a whole refusal sentence, the CE is
dominated by easy continuation tokens and the optimum sits where the refusal is merely
*likely* (λ ≈ 0.5–0.8, ASR ≈ 20 % on the organism's sentiment model). Counting only the first
``safety_first_k=2`` tokens puts the whole safety signal on the decision and drives λ to where
refusals win (ASR ≤ 5 %) while the KL term still holds task answers (accuracy unchanged). With
a weak gene (a mild degradation), the needed λ exceeds 2, hence ``lambda_max=4``.

The utility weight ``beta`` matters next: the refusal decision of a benign how-to prompt,
whose wording matches a harmful one, is one token among the ~16 the KL averages over. With
``beta=1`` the organism's seed-1 task models over-refused 40 / 0 / 35 % of a development split
(calibration templates, prompts disjoint from calibration and evaluation; held-out split
22.5 / 0 / 21.2 %); ``beta=3`` brought that to 5 / 0 / 10 % (held-out 0 / 0 / 1.2 %) with
development-split ASR 0 % on seeds 0 and 1; ``beta=10`` under-corrects (ASR 6–48 %).

Initialisation matters too (plain CE from λ=0 can stall on a weak safety signal), so the default
``init="grid"`` first scores a coarse uniform-γ grid with the same loss and starts Adam from
the best point; the grid's choice is kept in the result's metadata for comparison.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Union

from .. import lm
from ..coeffs import Coeffs
from ..data import load_records, split_record
from ..errors import GeneError, SafeGeneError, UsageError
from ..gene import load_gene
from .merge import MergePlan, gene_merge

# --------------------------------------------------------------------------------------------
# The coefficients artifact
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# The merge plan and the autograd Function
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def _forward(model, params: dict, batch) -> Any:
    import torch

    if params:
        out = torch.func.functional_call(model, params, (), {"input_ids": batch.input_ids,
                                                              "attention_mask": batch.attention_mask})
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits


def _pred_positions(batch, first_k: int | None = None):
    """(row, position, target) of every position that predicts a completion token; rows without
    a completion contribute their last prompt position (target -100)."""
    import torch

    rows, pos, tgt = [], [], []
    lab = batch.labels
    for i in range(lab.shape[0]):
        comp = (lab[i] != -100).nonzero().flatten()
        if comp.numel() == 0:
            rows.append(i); pos.append(int(batch.last_prompt[i])); tgt.append(-100)
            continue
        if first_k:
            comp = comp[:first_k]
        for p in comp.tolist():
            rows.append(i); pos.append(p - 1); tgt.append(int(lab[i, p]))
    d = lab.device
    return (torch.tensor(rows, device=d), torch.tensor(pos, device=d), torch.tensor(tgt, device=d))


def _per_row_mean(values, rows, n_rows: int):
    import torch

    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    cnt = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    keep = cnt > 0
    return (sums[keep] / cnt[keep]).mean()


class _Objective:
    """The few-shot loss; built once per target (reference distributions cached at λ = 0)."""

    def __init__(self, model, tokenizer, safety_pairs, utility_pairs, beta, l2, utility_loss,
                 safety_first_k, device):
        import torch

        pad = lm.pad_id_of(tokenizer)
        self.model = model
        self.beta, self.l2 = float(beta), float(l2)
        self.safety = lm.collate(safety_pairs, pad, device)
        self.s_idx = _pred_positions(self.safety, safety_first_k)
        self.utility = lm.collate(utility_pairs, pad, device) if utility_pairs else None
        self.utility_loss = utility_loss
        self.ref_logp = None
        if self.utility is not None:
            self.u_idx = _pred_positions(self.utility)
            has_target = self.u_idx[2] >= 0
            self.u_ce_mask = has_target if utility_loss in ("auto", "ce") else torch.zeros_like(has_target)
            self.u_kl_mask = ~self.u_ce_mask
            if utility_loss == "ce" and not bool(has_target.all()):
                raise UsageError("utility_loss='ce' needs a completion on every utility record; use 'auto' or 'kl'")
            if bool(self.u_kl_mask.any()):
                with torch.no_grad():
                    logits = _forward(model, {}, self.utility)
                    r, p, _ = self.u_idx
                    self.ref_logp = torch.log_softmax(logits[r, p].float(), -1)

    def __call__(self, params: dict, lam) -> tuple[Any, dict]:
        import torch
        import torch.nn.functional as F

        logits = _forward(self.model, params, self.safety)
        r, p, t = self.s_idx
        ce = F.cross_entropy(logits[r, p].float(), t, reduction="none")
        safety = _per_row_mean(ce, r, self.safety.input_ids.shape[0])
        parts = {"safety": float(safety.detach())}
        total = safety
        if self.utility is not None:
            logits = _forward(self.model, params, self.utility)
            r, p, t = self.u_idx
            logp = torch.log_softmax(logits[r, p].float(), -1)
            per = torch.zeros(r.shape[0], device=logp.device)
            if bool(self.u_ce_mask.any()):
                m = self.u_ce_mask
                per = per.clone()
                per[m] = -logp[m].gather(1, t[m].unsqueeze(1)).squeeze(1)
            if self.ref_logp is not None:
                m = self.u_kl_mask
                kl = (self.ref_logp[m].exp() * (self.ref_logp[m] - logp[m])).sum(-1)
                per = per.clone()
                per[m] = kl
            utility = _per_row_mean(per, r, self.utility.input_ids.shape[0])
            parts["utility"] = float(utility.detach())
            total = total + self.beta * utility
        reg = self.l2 * (lam ** 2).sum()
        parts["l2"] = float(reg.detach())
        return total + reg, parts


# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------
def resolve_layers(gene, layers) -> list[str]:
    """Layer keys to calibrate: explicit list, ``"all"`` (every decoder block), or the gene's selection."""
    known = gene.layer_keys()
    if layers is None:
        sel = gene.selection
        if not sel or not sel.get("selected"):
            raise GeneError(
                f"gene {gene.path} has no layer selection; run `safegene select` first, or pass layers='all'"
            )
        layers = list(sel["selected"])
    elif isinstance(layers, str):
        if layers == "all":
            layers = [k for k in known if k.startswith("layer.")]
        else:
            layers = [s.strip() for s in layers.split(",") if s.strip()]
    bad = [k for k in layers if k not in known]
    if bad:
        raise UsageError(f"unknown layer key(s) {bad}; the gene has {known}")
    return [k for k in known if k in set(layers)]


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibrate(
    gene,
    target,
    safety,
    utility=None,
    layers=None,
    *,
    tokenizer=None,
    steps: int = 40,
    lr: float = 0.05,
    beta: float = 3.0,
    l2: float = 1e-3,
    lambda_max: float = 4.0,
    init: Union[str, float, dict] = "grid",
    grid_points: int = 9,
    per_module: bool = False,
    utility_loss: str = "kl",
    utility_max_new_tokens: int = 16,
    safety_first_k: int | None = 2,
    max_examples: int = 16,
    refusal: str | None = None,
    patience: int = 8,
    tol: float = 1e-4,
    device: str = "cpu",
    out: Union[str, Path, None] = None,
    log: Callable[[str], None] | None = _log_default,
) -> Coeffs:
    """Learn one λ per selected layer (or per module type inside a layer) for a task model.

    ``gene`` is a gene directory or :class:`safegene.gene.Gene`; ``target`` a model directory
    or a loaded ``transformers`` model (then pass ``tokenizer``). ``safety`` are harmful prompts
    with refusals (JSONL path or records; ``refusal`` fills records without a completion),
    ``utility`` are task examples with answers (CE) and/or benign prompts without one (KL to
    θ_T at the first response token). At most ``max_examples`` of each are used.

    >>> c = calibrate("gene/", "task_model/", "harmful_calib.jsonl", "task_calib.jsonl",
    ...               out="COEFFS.json")  # doctest: +SKIP
    >>> c.coeffs  # doctest: +SKIP
    {'layer.2': 0.93, 'layer.3': 1.21}

    A model passed in is left bit-identical to how it came (also on error).
    """
    import torch

    if steps < 0 or lr <= 0 or lambda_max <= 0 or beta < 0 or l2 < 0:
        raise UsageError("need steps >= 0, lr > 0, lambda_max > 0, beta >= 0, l2 >= 0")
    if utility_loss not in ("auto", "ce", "kl"):
        raise UsageError(f"utility_loss must be 'auto', 'ce' or 'kl', not {utility_loss!r}")
    t0 = time.perf_counter()
    log = log or (lambda _m: None)
    gene = load_gene(gene)
    keys_layers = resolve_layers(gene, layers)

    if isinstance(target, (str, Path)):
        model, tok = lm.load_model(target, device=device)
        target_name = str(target)
    else:
        model, tok = target, tokenizer
        if tok is None:
            raise UsageError("calibrate: pass tokenizer= together with a loaded model")
        target_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    s_recs = load_records(safety, "safety", max_examples)
    if utility is None:
        u_recs = []
    elif isinstance(utility, (list, tuple)) and utility and all(
            isinstance(u, Path) or (isinstance(u, str) and os.path.isfile(u)) for u in utility):
        u_recs = [r for src in utility for r in load_records(src, "utility", max_examples)]
    else:
        u_recs = load_records(utility, "utility", max_examples)
    s_pairs = lm.encode_pairs(tok, s_recs, "safety", default_completion=refusal)
    u_prompts = lm.encode_prompts(tok, u_recs)
    if utility_loss == "kl":
        # θ_T's own greedy responses, generated before any λ is applied: the KL term then keeps
        # the task model's behaviour on exactly the tokens it would emit (answers, non-refusals)
        gens = lm.generate_ids(model, tok, u_prompts, max_new_tokens=utility_max_new_tokens)
        u_pairs = list(zip(u_prompts, gens))
    else:
        u_pairs = []
        for p, rec in zip(u_prompts, u_recs):
            msgs, comp = split_record(rec)
            u_pairs.append((p, lm.render_completion(tok, msgs, comp) if comp is not None else []))

    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        plan = MergePlan(model, gene, keys_layers, per_module=per_module)
        objective = _Objective(model, tok, s_pairs, u_pairs, beta, l2, utility_loss, safety_first_k, device)
        dev = plan.weights[0].device
        k = plan.num_keys

        def evaluate(vals) -> tuple[float, dict]:
            lam = torch.tensor(vals, dtype=torch.float32, device=dev)
            with torch.no_grad():
                plan.set(lam)
                loss, parts = objective(dict(zip(plan.names, plan.weights)), lam)
            return float(loss), parts

        grid = None
        if isinstance(init, dict):
            start = [float(init.get(key, 0.0)) for key in plan.keys]
        elif isinstance(init, (int, float)):
            start = [float(init)] * k
        elif init == "grid":
            pts = [lambda_max * i / (grid_points - 1) for i in range(grid_points)] if grid_points > 1 else [1.0]
            scores = []
            for g in pts:
                loss, parts = evaluate([g] * k)
                scores.append({"gamma": round(g, 6), "loss": loss, **parts})
                log(f"grid γ={g:.3f} loss {loss:.4f} (safety {parts['safety']:.4f}"
                    + (f", utility {parts['utility']:.4f}" if "utility" in parts else "") + ")")
            best = min(range(len(pts)), key=lambda i: (scores[i]["loss"], i))
            grid = {"best_gamma": pts[best], "best_loss": scores[best]["loss"], "points": scores}
            start = [pts[best]] * k
        elif init in ("ones", "one"):
            start = [1.0] * k
        elif init in ("zeros", "zero"):
            start = [0.0] * k
        else:
            raise UsageError(f"init must be 'grid', 'ones', 'zeros', a number or a dict, not {init!r}")
        start = [min(max(v, 0.0), lambda_max) for v in start]

        lam = torch.tensor(start, dtype=torch.float32, device=dev, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=lr)
        best_loss, best_lam, best_step = math.inf, list(start), 0
        history = []
        since_best = 0
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            ws = gene_merge(lam, plan)
            loss, parts = objective(dict(zip(plan.names, ws)), lam)
            loss.backward()
            cur = lam.detach().cpu().tolist()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SafeGeneError(f"calibration loss became {lv} at step {step}; lower lr or lambda_max")
            gnorm = float(lam.grad.norm())
            history.append({"step": step, "loss": lv, **parts, "lambda": cur})
            if lv < best_loss - tol:
                best_loss, best_lam, best_step, since_best = lv, cur, step, 0
            else:
                since_best += 1
            log(f"step {step}/{steps} loss {lv:.4f} safety {parts['safety']:.4f}"
                + (f" utility {parts['utility']:.4f}" if "utility" in parts else "")
                + f" |g| {gnorm:.3g} λ " + " ".join(f"{v:.3f}" for v in cur))
            if since_best >= patience:
                log(f"early stop at step {step}: no improvement for {patience} steps")
                break
            opt.step()
            with torch.no_grad():
                lam.clamp_(0.0, lambda_max)
        if steps == 0:
            best_loss, _ = evaluate(start)
            best_lam = start
        final_loss, final_parts = evaluate(best_lam)
    finally:
        if plan is not None:
            plan.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)

    coeffs = {key: round(float(v), 6) for key, v in zip(plan.keys, best_lam)}
    module_coeffs = None
    if per_module:
        # apply() resolves a tensor's λ by exact tensor name first: expand the module keys
        module_coeffs = coeffs
        coeffs = {n: module_coeffs[plan.keys[plan.key_of[i]]] for i, n in enumerate(plan.names)}
    meta = {
        "method": "safegene-calibrate",
        "gene": str(gene.path),
        "target": target_name,
        "layers": keys_layers,
        "per_module": per_module,
        "module_coeffs": module_coeffs,
        "loss": final_loss,
        "loss_parts": final_parts,
        "best_step": best_step,
        "steps_run": len(history),
        "init": init if isinstance(init, (str, float, int)) else "dict",
        "start": start,
        "grid": grid,
        "hyper": {"steps": steps, "lr": lr, "beta": beta, "l2": l2, "lambda_max": lambda_max,
                  "utility_loss": utility_loss, "safety_first_k": safety_first_k,
                  "n_safety": len(s_pairs), "n_utility": len(u_pairs)},
        "history": history,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    result = Coeffs(coeffs, meta)
    if out is not None:
        result.save(out)
        log(f"wrote {out}")
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
