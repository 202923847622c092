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

Loss weighting: a model decides to refuse with its first response tokens, so the safety CE
counts the first ``safety_first_k=2`` refusal tokens at full weight (averaged over a whole
sentence, easy continuation tokens dominate and the optimum sits where a refusal is merely
likely); a weak gene needs λ above 2, hence ``lambda_max=4``. The utility weight ``beta=3``
keeps benign prompts whose wording matches harmful ones from being refused. The measurements
behind these defaults are in ``bench/method_notes.md``.

Initialisation matters too (plain CE from λ=0 can stall on a weak safety signal), so the default
``init="grid"`` first scores a coarse uniform-γ grid with the same loss and starts Adam from
the best point; the grid's choice is kept in the result's metadata for comparison.

Generalization controls (issue 19); only the rest-of-sentence weight is on by default
------------------------------------------------------------------------------------
``safety_rest_weight``
    the refusal tokens after the first ``safety_first_k`` enter the safety loss with this
    weight (the first ones keep weight 1: they carry the decision). With 0 nothing asks for the
    rest of the sentence; on a second model family that left "no . i not assist …" refusals.
    :mod:`safegene.eval.refusal` measures the share of *whole* refusal sentences.
``holdout`` / ``holdout_by``
    hold out whole categories (or templates) of the safety records and every k-th utility
    record; the held-out loss chooses the step, the uniform start γ̄ (best uniform γ on all the
    few-shot data) is the first step, so the result is never worse than it on the held-out
    part; ``meta["heldout_loss"]``, ``meta["uniform_heldout_loss"]`` and per-step
    ``history[i]["heldout_loss"]`` report it beside the training loss.
``reg_uniform``
    ``reg_uniform · Σ_l (λ_l − γ̄)²``: a pull toward the uniform start (RESTA is the case of all
    λ equal).

Defaults are chosen by the rule in ``bench/dev_split.md`` on its development split (both
families, two seeds each): ``safety_rest_weight=1`` since the third round; ``holdout`` and
``reg_uniform`` stay off (too few held-out prompts to choose steps with 16 + 32 few-shot
records; numbers in ``bench/method_notes.md`` and ``bench/dev_split.md``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from .. import lm
from ..coeffs import Coeffs
from ..data import load_records, split_record
from ..errors import GeneError, SafeGeneError, UsageError
from ..gene import load_gene
from .lowmem import make_plan
from .merge import gene_merge

# --------------------------------------------------------------------------------------------
# The coefficients artifact
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# The merge plan and the autograd Function
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def _forward(model, params: dict, batch, no_cache: bool = False) -> Any:
    """Logits of ``batch`` with ``params`` substituted for the model's own tensors.
    ``no_cache``: ask for no KV cache (a checkpointed block re-run in backward must not append
    to one)."""
    import torch

    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if no_cache:
        kw["use_cache"] = False
    if params:
        out = torch.func.functional_call(model, params, (), kw)
    else:
        out = model(**kw)
    return out.logits


def _loss_dtype(t) -> Any:
    """float32 for 16/32-bit logits (the loss is always taken in float32), float64 for float64."""
    import torch

    return torch.promote_types(t.dtype, torch.float32)


def _slice_batch(batch, a: int, b: int):
    """Rows ``a:b`` of a right-padded batch, cut to their own longest row (a micro-batch holds
    the activations of its own length, not of the whole batch's)."""
    n = max(1, int(batch.attention_mask[a:b].sum(1).max()))
    return lm.Batch(batch.input_ids[a:b, :n], batch.attention_mask[a:b, :n], batch.labels[a:b, :n],
                    batch.last_prompt[a:b])


@contextlib.contextmanager
def checkpointed_blocks(model) -> Iterator[None]:
    """Gradient checkpointing of every decoder block while the context is open.

    A block run with autograd on keeps only its inputs; its activations are recomputed in the
    backward pass (``torch.utils.checkpoint``, non-reentrant). Unlike transformers'
    ``gradient_checkpointing_enable`` this works in eval mode (calibration runs the model in
    eval mode: no dropout) and with tensors substituted by ``torch.func.functional_call``:
    the block's substituted tensors (those that require grad: W⁰ + λτ of the exact mode, the
    weight-space tensors of the low-memory one) are captured at the forward and put back for
    the recomputation, so it computes with the same tensors and the gradient still reaches λ.
    Forward hooks (the low-memory mode's λ τx) run again in the recomputation. Call the model
    with ``use_cache=False`` inside. Leaves every block as it was on exit.

    >>> with checkpointed_blocks(model):  # doctest: +SKIP
    ...     loss(model).backward()
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    blocks = lm.decoder_layers(model)
    before: list[tuple[Any, Any]] = []

    def wrap(block, inner):
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(*args, **kwargs)
            live = {n: t for n, t in block.named_parameters(remove_duplicate=False) if t.requires_grad}
            return checkpoint(inner, *args, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _substituted(block, live)), **kwargs)
        return forward

    try:
        for block in blocks:
            before.append((block, block.__dict__.get("forward")))
            block.forward = wrap(block, block.forward)
    except BaseException:
        _unwrap(before)
        raise
    try:
        yield
    finally:
        _unwrap(before)


def _unwrap(before: list[tuple[Any, Any]]) -> None:
    for block, prev in reversed(before):
        if prev is None:
            del block.forward
        else:
            block.forward = prev


@contextlib.contextmanager
def _substituted(module, tensors: dict) -> Iterator[None]:
    """``tensors`` (by parameter name under ``module``) in place of the module's parameters, as
    ``torch.func.functional_call`` puts them."""
    done = []
    try:
        for name, t in tensors.items():
            mod_name, _, attr = name.rpartition(".")
            mod = module.get_submodule(mod_name) if mod_name else module
            done.append((mod, attr, mod._parameters[attr]))
            mod._parameters[attr] = t
        yield
    finally:
        for mod, attr, old in reversed(done):
            mod._parameters[attr] = old


def _pred_positions(batch, first_k: int | None = None, keep_rest: bool = False):

    """(row, position, target) of every position that predicts a completion token; rows without
    a completion contribute their last prompt position (target -100). With ``first_k``, only the
    first ``first_k`` completion tokens of each row are kept, unless ``keep_rest``: then all are
    kept and a fourth tensor marks which ones are among the first ``first_k``."""
    import torch

    rows, pos, tgt, head = [], [], [], []
    lab = batch.labels
    for i in range(lab.shape[0]):
        comp = (lab[i] != -100).nonzero().flatten()
        if comp.numel() == 0:
            rows.append(i); pos.append(int(batch.last_prompt[i])); tgt.append(-100); head.append(True)
            continue
        if first_k and not keep_rest:
            comp = comp[:first_k]
        for j, p in enumerate(comp.tolist()):
            rows.append(i); pos.append(p - 1); tgt.append(int(lab[i, p]))
            head.append(not first_k or j < first_k)
    d = lab.device
    out = (torch.tensor(rows, device=d), torch.tensor(pos, device=d), torch.tensor(tgt, device=d))
    return out + (torch.tensor(head, dtype=torch.bool, device=d),) if keep_rest else out


def _log_softmax(x) -> Any:
    """``log_softmax`` over the last dimension."""
    import torch

    return torch.log_softmax(x, -1)


def _per_row(values, rows, n_rows: int):
    """Mean of ``values`` per row, for the rows that have any."""
    import torch

    sums = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
    cnt = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, torch.ones_like(values))
    keep = cnt > 0
    return sums[keep] / cnt[keep]


#: Weight of the refusal tokens after the first ``safety_first_k`` in the safety loss. Chosen by
#: the development-split rule (bench/dev_split.md, third round): 1.0 beat 0 (the old default),
#: 0.25 and 0.5 on both families' development seeds (cost 26.2 vs 36.2; the Llama family within
#: 1 point on every seed, the StableLM family's kind task 33 % → 1 % development ASR).
SAFETY_REST_WEIGHT = 1.0


class _Objective:
    """The few-shot loss; built once per target (reference distributions cached at λ = 0).

    ``micro_batch_size`` (None: each of the safety and utility batches in one forward) splits
    the forwards into micro-batches of that many records; :meth:`value` and :meth:`backward`
    then add up the micro-batches' shares so that the loss and the λ-gradient are the
    full-batch ones (each term is a mean over its records: a micro-batch's records enter with
    weight 1/N of their term, N counted over the whole batch, however uneven the last
    micro-batch is). ``checkpointing``: forwards with autograd on run their decoder blocks
    under :func:`checkpointed_blocks` (the caller opens it) and ask for no KV cache.
    """

    def __init__(self, model, tokenizer, safety_pairs, utility_pairs, beta, l2, utility_loss,
                 safety_first_k, device, safety_rest_weight: float = 0.0, reg_uniform: float = 0.0,
                 micro_batch_size: int | None = None, checkpointing: bool = False, teacher: Any = None,
                 benign_pairs: list | None = None, benign_weight: float = 1.0):
        """``teacher`` (a model, e.g. the aligned one): the safety term becomes the KL from the
        teacher's next-token distribution at every completion position of ``safety_pairs`` (the
        pairs then hold the teacher's own continuations) instead of the CE of the completion.
        ``benign_pairs`` (prompt, θ_T's own continuation): KL from θ_T's distribution at those
        positions, ``benign_weight`` times its mean added to the utility term."""
        import torch

        if micro_batch_size is not None and micro_batch_size < 1:
            raise UsageError(f"micro_batch_size must be at least 1 (or None: one batch), not {micro_batch_size}")
        pad = lm.pad_id_of(tokenizer)
        self.model = model
        self.beta, self.l2 = float(beta), float(l2)
        self.rest_weight = float(safety_rest_weight)
        self.reg_uniform = float(reg_uniform)
        self.micro_batch_size = micro_batch_size
        self.checkpointing = bool(checkpointing)
        self.center: Any = None  # γ̄ of the uniform start, set by calibrate once it is known
        self.safety = lm.collate(safety_pairs, pad, device)
        # (row, position, target, is-among-the-first-k): the first tokens carry the refusal
        # decision, the rest of the sentence is asked for with weight `rest_weight`
        self.s_idx = _pred_positions(self.safety, safety_first_k, keep_rest=True)
        head = self.s_idx[3]
        self.with_rest = self.rest_weight > 0 and not bool(head.all())
        # the number of records each mean is over (micro-batches divide by these)
        self.n_head = int(torch.unique(self.s_idx[0][head]).numel())
        self.n_rest = int(torch.unique(self.s_idx[0][~head]).numel())
        # the teacher's log-probabilities at every safety position (distillation), else None
        self.s_ref = None
        if teacher is not None:
            r, p, _t, _h = self.s_idx
            self.s_ref = self._reference(teacher, self.safety, (r, p))
        self.utility = lm.collate(utility_pairs, pad, device) if utility_pairs else None
        self.utility_loss = utility_loss
        self.ref_logp = None
        if self.utility is not None:
            self.u_idx = _pred_positions(self.utility)
            self.n_utility = int(torch.unique(self.u_idx[0]).numel())
            has_target = self.u_idx[2] >= 0
            self.u_ce_mask = has_target if utility_loss in ("auto", "ce") else torch.zeros_like(has_target)
            self.u_kl_mask = ~self.u_ce_mask
            if utility_loss == "ce" and not bool(has_target.all()):
                raise UsageError("utility_loss='ce' needs a completion on every utility record; use 'auto' or 'kl'")
            if bool(self.u_kl_mask.any()):
                with torch.no_grad():
                    if micro_batch_size is None:
                        logits = _forward(model, {}, self.utility)
                        r, p, _ = self.u_idx
                        self.ref_logp = torch.log_softmax(logits[r, p].to(_loss_dtype(logits)), -1)
                    else:
                        parts = []
                        for a, b in self._chunks(self.utility):
                            batch, (r, p, _t), _sel = self._utility_slice(a, b)
                            logits = _forward(model, {}, batch)
                            parts.append(torch.log_softmax(logits[r, p].to(_loss_dtype(logits)), -1))
                        self.ref_logp = torch.cat(parts, 0)

        self.benign = lm.collate(benign_pairs, pad, device) if benign_pairs else None
        self.benign_weight = float(benign_weight)
        self.b_ref = None
        if self.benign is not None:
            r, p, _t = self.b_idx = _pred_positions(self.benign)
            self.n_benign = int(torch.unique(r).numel())
            self.b_ref = self._reference(model, self.benign, (r, p))

    def _reference(self, ref_model, batch, idx) -> Any:
        """``ref_model``'s log-probabilities at positions ``idx`` = (rows, positions) of
        ``batch`` (run as it is now, without autograd; micro-batched like the loss), on the
        batch's device."""
        import torch

        r, p = idx
        dev = batch.input_ids.device
        ref_dev = lm.model_device(ref_model)
        parts = []
        with torch.no_grad():
            for a, b in self._chunks(batch):
                sub = _slice_batch(batch, a, b)
                if str(ref_dev) != str(dev):
                    sub = lm.Batch(sub.input_ids.to(ref_dev), sub.attention_mask.to(ref_dev), sub.labels.to(ref_dev),
                                   sub.last_prompt)
                sel = self._rows_in(r, a, b)
                logits = _forward(ref_model, {}, sub)
                rr, pp = (r[sel] - a).to(logits.device), p[sel].to(logits.device)
                parts.append(torch.log_softmax(logits[rr, pp].to(_loss_dtype(logits)), -1).to(dev))
        return torch.cat(parts, 0)

    # ---- micro-batches -----------------------------------------------------------------------
    def _chunks(self, batch) -> list[tuple[int, int]]:
        n = batch.input_ids.shape[0]
        m = self.micro_batch_size or n
        return [(a, min(a + m, n)) for a in range(0, n, m)]

    @staticmethod
    def _rows_in(r, a: int, b: int):
        return (r >= a) & (r < b)

    def _safety_slice(self, a: int, b: int):
        r, p, t, head = self.s_idx
        sel = self._rows_in(r, a, b)
        ref = None if self.s_ref is None else self.s_ref[sel]
        return _slice_batch(self.safety, a, b), (r[sel] - a, p[sel], t[sel], head[sel]), ref

    def _utility_slice(self, a: int, b: int):
        assert self.utility is not None
        r, p, t = self.u_idx
        sel = self._rows_in(r, a, b)
        return _slice_batch(self.utility, a, b), (r[sel] - a, p[sel], t[sel]), sel

    # ---- per-record losses ---------------------------------------------------------------------
    def _safety_terms(self, logits, idx, n_rows: int, ref=None) -> tuple[Any, Any]:
        """Per-record safety CE over the first ``safety_first_k`` tokens, and (when the rest of
        the refusal counts) over the rest, each for the records that have such tokens. With
        ``ref`` (the teacher's log-probabilities at every position of ``idx``) the per-token
        loss is the KL from the teacher instead of the CE of the completion token."""
        import torch.nn.functional as F

        r, p, t, head = idx
        if ref is not None:
            sel = slice(None) if self.with_rest else head
            logp = _log_softmax(logits[r[sel], p[sel]].to(_loss_dtype(logits)))
            q = ref[sel]
            tok = (q.exp() * (q - logp)).sum(-1)
            if self.with_rest:
                return _per_row(tok[head], r[head], n_rows), _per_row(tok[~head], r[~head], n_rows)
            return _per_row(tok, r[head], n_rows), None
        if self.with_rest:
            ce = F.cross_entropy(logits[r, p].to(_loss_dtype(logits)), t, reduction="none")
            return _per_row(ce[head], r[head], n_rows), _per_row(ce[~head], r[~head], n_rows)
        ce = F.cross_entropy(logits[r[head], p[head]].to(_loss_dtype(logits)), t[head], reduction="none")
        return _per_row(ce, r[head], n_rows), None

    def rows(self, params: dict) -> tuple[Any, Any]:
        """Per-example losses ``(safety [n_safety], utility [n_utility] or None)`` (no weights,
        no regularizer): their means weighted by 1 and β are the loss; their spread is its noise."""
        import torch
        import torch.nn.functional as F

        logits = _forward(self.model, params, self.safety)
        r, p, t, head = self.s_idx
        n_rows = self.safety.input_ids.shape[0]
        if self.s_ref is not None:
            q = self.s_ref
            ce = (q.exp() * (q - _log_softmax(logits[r, p].to(_loss_dtype(logits))))).sum(-1)
        else:
            ce = F.cross_entropy(logits[r, p].to(_loss_dtype(logits)), t, reduction="none")
        safety = _per_row(ce[head], r[head], n_rows)
        if self.rest_weight > 0 and not bool(head.all()):
            rest = torch.zeros(n_rows, dtype=ce.dtype, device=ce.device).index_add(0, r[~head], ce[~head])
            cnt = torch.zeros(n_rows, dtype=ce.dtype, device=ce.device).index_add(
                0, r[~head], torch.ones_like(ce[~head]))
            safety = safety + self.rest_weight * torch.where(cnt > 0, rest / cnt.clamp_min(1), torch.zeros_like(rest))
        return safety, self._utility_rows(params)

    def _utility_rows(self, params: dict, rows: tuple[int, int] | None = None) -> Any:
        """Per-example utility losses (CE of the answer where the loss asks for it, KL to θ_T's
        own next-token distribution otherwise) of all records, or of records ``rows=(a, b)``
        (one micro-batch); None without utility records."""
        import torch

        if self.utility is None:
            return None
        if rows is None:
            batch, (r, p, t) = self.utility, self.u_idx
            ce_mask, kl_mask, ref = self.u_ce_mask, self.u_kl_mask, self.ref_logp
        else:
            batch, (r, p, t), sel = self._utility_slice(*rows)
            ce_mask, kl_mask = self.u_ce_mask[sel], self.u_kl_mask[sel]
            ref = None if self.ref_logp is None else self.ref_logp[sel]
        logits = _forward(self.model, params, batch, self._no_cache())
        logp = torch.log_softmax(logits[r, p].to(_loss_dtype(logits)), -1)
        per = torch.zeros(r.shape[0], dtype=logp.dtype, device=logp.device)
        if bool(ce_mask.any()):
            m = ce_mask
            per = per.clone()
            per[m] = -logp[m].gather(1, t[m].unsqueeze(1)).squeeze(1)
        if ref is not None:
            m = kl_mask
            kl = (ref[m].exp() * (ref[m] - logp[m])).sum(-1)
            per = per.clone()
            per[m] = kl
        return _per_row(per, r, batch.input_ids.shape[0])

    def _benign_rows(self, params: dict, rows: tuple[int, int] | None = None) -> Any:
        """Per-record KL from θ_T's next-token distribution on the benign prompts' first
        tokens (all records, or records ``rows=(a, b)``); None without benign records."""
        if self.benign is None:
            return None
        r, p, _t = self.b_idx
        batch, ref = self.benign, self.b_ref
        if rows is not None:
            a, b = rows
            sel = self._rows_in(r, a, b)
            batch, r, p, ref = _slice_batch(self.benign, a, b), r[sel] - a, p[sel], ref[sel]
        logits = _forward(self.model, params, batch, self._no_cache())
        logp = _log_softmax(logits[r, p].to(_loss_dtype(logits)))
        return _per_row((ref.exp() * (ref - logp)).sum(-1), r, batch.input_ids.shape[0])

    def _no_cache(self) -> bool:
        import torch

        return self.checkpointing and torch.is_grad_enabled()

    # ---- the loss --------------------------------------------------------------------------------
    def _regularizer(self, lam, parts: dict) -> Any:
        reg = self.l2 * (lam ** 2).sum()
        parts["l2"] = float(reg.detach())
        if self.reg_uniform > 0 and self.center is not None:
            pull = self.reg_uniform * ((lam - self.center) ** 2).sum()
            parts["to_uniform"] = float(pull.detach())
            reg = reg + pull
        return reg

    def __call__(self, params: dict, lam) -> tuple[Any, dict]:
        """The whole loss in one forward of each batch (the micro-batch size is not used here):
        ``(loss tensor, parts)``."""
        logits = _forward(self.model, params, self.safety, self._no_cache())
        head_rows, rest_rows = self._safety_terms(logits, self.s_idx, self.safety.input_ids.shape[0], self.s_ref)
        parts = {}
        if rest_rows is not None:
            rest = rest_rows.mean()
            safety = head_rows.mean() + self.rest_weight * rest
            parts["safety_rest"] = float(rest.detach())
        else:
            safety = head_rows.mean()
        parts = {"safety": float(safety.detach()), **parts}
        total = safety
        rows = self._utility_rows(params)
        utility: Any = None
        if rows is not None:
            utility = rows.mean()
            parts["utility"] = float(utility.detach())
        b_rows = self._benign_rows(params)
        if b_rows is not None:
            benign = b_rows.mean()
            parts["benign"] = float(benign.detach())
            utility = self.benign_weight * benign if utility is None else utility + self.benign_weight * benign
        if utility is not None:
            total = total + self.beta * utility
        return total + self._regularizer(lam, parts), parts

    def _accumulate(self, params: Callable[[], dict], lam, backward: bool) -> tuple[Any, dict]:
        """The loss over micro-batches: each micro-batch's share (its records' losses over the
        whole term's N), backpropagated into λ right away when ``backward`` (the micro-batch's
        activations are freed before the next one runs). ``params()`` gives the tensors to
        substitute for one micro-batch (a fresh ``gene_merge``: every backward consumes its
        own graph). Returns the detached loss and its parts."""
        import torch

        head_sum = rest_sum = util_sum = 0.0
        total: Any = 0.0
        for a, b in self._chunks(self.safety):
            batch, idx, ref = self._safety_slice(a, b)
            logits = _forward(self.model, params(), batch, self._no_cache())
            head_rows, rest_rows = self._safety_terms(logits, idx, b - a, ref)
            h = head_rows.sum() / self.n_head
            share = h
            head_sum = head_sum + h.detach()
            if rest_rows is not None:
                s = rest_rows.sum() / self.n_rest
                share = share + self.rest_weight * s
                rest_sum = rest_sum + s.detach()
            if backward:
                share.backward()
            total = total + share.detach()
        parts: dict[str, float] = {}
        safety = head_sum + self.rest_weight * rest_sum if self.with_rest else head_sum
        parts["safety"] = float(safety)
        if self.with_rest:
            parts["safety_rest"] = float(rest_sum)
        if self.utility is not None:
            for a, b in self._chunks(self.utility):
                u = self._utility_rows(params(), (a, b)).sum() / self.n_utility
                share = self.beta * u
                util_sum = util_sum + u.detach()
                if backward:
                    share.backward()
                total = total + share.detach()
            parts["utility"] = float(util_sum)
        if self.benign is not None:
            ben_sum: Any = 0.0
            for a, b in self._chunks(self.benign):
                u = self._benign_rows(params(), (a, b)).sum() / self.n_benign
                share = self.beta * self.benign_weight * u
                ben_sum = ben_sum + u.detach()
                if backward:
                    share.backward()
                total = total + share.detach()
            parts["benign"] = float(ben_sum)
        reg = self._regularizer(lam, parts)
        if backward and reg.requires_grad:
            reg.backward()
        total = total + reg.detach()
        return (total if torch.is_tensor(total) else torch.tensor(total)), parts

    def value(self, params: dict, lam) -> tuple[float, dict]:
        """The loss at fixed tensors, without autograd: ``(loss, parts)``."""
        import torch

        with torch.no_grad():
            if self.micro_batch_size is None:
                loss, parts = self(params, lam)
            else:
                loss, parts = self._accumulate(lambda: params, lam, backward=False)
        return float(loss), parts

    def backward(self, params: Callable[[], dict], lam) -> tuple[Any, dict]:
        """Forward and backward: accumulate ``∂L/∂λ`` into ``lam.grad``; return the detached
        loss and its parts. ``params()`` gives the tensors to substitute (one call per
        micro-batch; one call in all without micro-batches)."""
        if self.micro_batch_size is None:
            loss, parts = self(params(), lam)
            loss.backward()
            return loss.detach(), parts
        return self._accumulate(params, lam, backward=True)


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


#: The optimisers of :func:`calibrate`'s ``optimizer``.
OPTIMIZERS = ("adam", "lbfgs")
#: The safety targets of :func:`calibrate`'s ``safety_target``.
SAFETY_TARGETS = ("string", "distill")


def _improved(new: float, best: float, tol: float) -> bool:
    """``new`` improves on ``best`` by more than the relative ``tol`` (scaled by ``max(|best|, 1)``,
    so below a loss of 1 it is an absolute tolerance)."""
    if not math.isfinite(best):
        return new < best
    return new < best - tol * max(abs(best), 1.0)


def _projected_grad(lam, grad, lambda_max: float) -> Any:
    """The gradient with the components that point out of [0, λ_max] at a bound set to 0 (its
    norm is 0 at a constrained minimum)."""
    out = grad.clone()
    out[(lam <= 0.0) & (grad > 0)] = 0.0
    out[(lam >= lambda_max) & (grad < 0)] = 0.0
    return out


def _load_many(src, what: str, max_examples: int) -> list:
    """Records from one source (path, records) or from a list of paths."""
    if isinstance(src, (list, tuple)) and src and all(
            isinstance(u, Path) or (isinstance(u, str) and os.path.isfile(u)) for u in src):
        return [r for one in src for r in load_records(one, what, max_examples)]
    return load_records(src, what, max_examples)


def _load_teacher(aligned, model, device, dtype, device_map, max_memory, offload_dir) -> tuple[Any, bool]:
    """The aligned model for distillation: ``(model, loaded here)``; it must share the target's
    vocabulary."""
    if isinstance(aligned, (str, Path)):
        teacher, _tok = lm.load_model(aligned, device=device, dtype=dtype, device_map=device_map,
                                      max_memory=max_memory, offload_dir=offload_dir)
        own = True
    else:
        teacher, own = aligned, False
    tv = getattr(getattr(teacher, "config", None), "vocab_size", None)
    mv = getattr(getattr(model, "config", None), "vocab_size", None)
    if tv is not None and mv is not None and tv != mv:
        raise UsageError(f"the aligned model's vocabulary ({tv}) differs from the target's ({mv})")
    teacher.eval()
    return teacher, own


def _empty_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _group_of(rec, group_by: str) -> Any:
    meta = getattr(rec, "meta", None)
    if meta is None and isinstance(rec, dict):
        meta = rec
    return None if meta is None else meta.get(group_by)


def split_holdout(records: list, fraction: float, group_by: str | None = "auto") -> tuple[list, list, dict]:
    """Split few-shot records into a fit part and a held-out part (deterministic).

    With ``group_by`` a metadata key that every record carries (``"auto"``: ``"template"``,
    else ``"category"``), whole groups are held out -- prompts of a kind the fit part never
    saw, which is what calibration must generalize to. Groups are taken in sorted order of
    ``(count, name)``, smallest first, until at least ``fraction`` of the records are held out,
    leaving at least one group (and one record) to fit on. Without such a key (or with
    ``group_by=None``, or only one group) every ``round(1/fraction)``-th record is held out.
    Returns ``(fit, heldout, info)``.

    >>> fit, held, info = split_holdout([{"prompt": str(i)} for i in range(8)], 0.25)
    >>> len(fit), len(held), info["by"]
    (6, 2, 'index')
    """
    n = len(records)
    if fraction <= 0 or n < 2:
        return list(records), [], {"by": None, "n_fit": n, "n_heldout": 0}
    want = max(1, min(n - 1, int(math.ceil(fraction * n - 1e-9))))
    keys = ("template", "category") if group_by == "auto" else ((group_by,) if group_by else ())
    for key in keys:
        groups = [_group_of(r, key) for r in records]
        if any(g is None for g in groups):
            continue
        counts: dict[str, int] = {}
        for g in groups:
            counts[str(g)] = counts.get(str(g), 0) + 1
        if len(counts) < 2:
            continue
        held_groups: list[str] = []
        held_n = 0
        for g, c in sorted(counts.items(), key=lambda kv: (kv[1], kv[0])):
            if held_n >= want or len(held_groups) == len(counts) - 1 or held_n + c > n - 1:
                break
            held_groups.append(g)
            held_n += c
        if not held_groups:
            continue
        fit = [r for r, g in zip(records, groups) if str(g) not in held_groups]
        held = [r for r, g in zip(records, groups) if str(g) in held_groups]
        return fit, held, {"by": key, "heldout_groups": held_groups, "n_fit": len(fit), "n_heldout": len(held)}
    every = max(2, int(round(1.0 / fraction)))
    fit = [r for i, r in enumerate(records) if i % every != every - 1]
    held = [r for i, r in enumerate(records) if i % every == every - 1]
    if not held:
        fit, held = fit[:-1], fit[-1:]
    return fit, held, {"by": "index", "every": every, "n_fit": len(fit), "n_heldout": len(held)}


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
    grid_values: "Sequence[float] | None" = None,
    per_module: bool = False,
    utility_loss: str = "kl",
    utility_max_new_tokens: int = 16,
    safety_first_k: int | None = 2,
    max_examples: int = 16,
    refusal: str | None = None,
    patience: int = 8,
    tol: float = 1e-4,
    device: str | None = None,
    out: Union[str, Path, None] = None,
    log: Callable[[str], None] | None = _log_default,
    safety_rest_weight: float = SAFETY_REST_WEIGHT,
    holdout: float = 0.0,
    holdout_by: str | None = "auto",
    reg_uniform: float = 0.0,
    heldout_patience: int | None = None,
    dtype=None,
    device_map=None,
    max_memory=None,
    offload_dir: Union[str, Path, None] = None,
    mode: str = "exact",
    micro_batch_size: int | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adam",
    safety_target: str = "string",
    aligned=None,
    distill_k: int = 8,
    benign=None,
    benign_k: int = 4,
    benign_weight: float = 1.0,
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

    A model passed in is left bit-identical to how it came (also on error); batches go to its
    input device. ``device``, ``dtype``, ``device_map``, ``max_memory``, ``offload_dir``: how a
    model directory is loaded (:func:`safegene.lm.load_model`). ``mode``: ``"exact"`` (W⁰ + λτ
    in weight space, the reference) or ``"lowmem"`` (λ τx added to each selected module's output,
    no weight gradient and no W⁰ copy; :mod:`safegene.method.lowmem`).

    Activation memory: ``micro_batch_size`` runs the safety and utility records through the
    model that many at a time and accumulates the loss and the λ-gradient (None, the default:
    one batch each); the result is the full-batch one (up to float rounding): every term stays
    the mean over its records. ``gradient_checkpointing`` keeps only each decoder block's input
    and recomputes its activations in the backward pass (:func:`checkpointed_blocks`); same
    gradient, one more forward per step. Both work in either mode.

    Generalization controls (see the module docstring for the defaults and why):

    * ``safety_rest_weight`` -- weight of the refusal tokens after the first
      ``safety_first_k`` (default :data:`SAFETY_REST_WEIGHT` = 1; 0: only the first
      ``safety_first_k`` count, the default until the third development round);
    * ``holdout`` -- fraction of the safety and utility records held out of the fit
      (:func:`split_holdout`: whole categories/templates of the safety records where they carry
      them). The held-out loss (safety + β·utility) picks the step (the uniform start is the
      first step, so the result is never worse than it on the held-out part) and the plateau
      (below); both losses are in ``meta["loss"]`` /
      ``meta["heldout_loss"]``;
    * ``reg_uniform`` -- weight of ``Σ_l (λ_l − γ̄)²``, the pull toward the uniform start γ̄.

    ``grid_values`` replaces the ``init="grid"`` points (``grid_points`` evenly spaced on
    [0, ``lambda_max``]) by these γ, each in [0, ``lambda_max``]; with ``steps=0`` the result is
    the grid's best uniform γ on every key (the ``RESTA-loss`` baseline of :mod:`safegene.baselines`).

    Convergence (see :data:`OPTIMIZERS`): ``steps`` is a maximum. The run stops on a plateau when
    the held-out loss (the fit loss without a held-out part) has not improved by the relative
    ``tol`` (``best − new > tol · max(|best|, 1)``) for ``patience`` steps (``heldout_patience``,
    when given, replaces ``patience`` for the held-out loss). ``optimizer="adam"`` (default) or
    ``"lbfgs"`` (``torch.optim.LBFGS``, strong-Wolfe line search, one iteration per step; λ is
    projected onto [0, λ_max] after each step and every trial point is evaluated at its
    projection). ``meta["stopped"]`` is ``"plateau"``, ``"max_steps"``, ``"converged"`` (L-BFGS
    made no move) or ``"no_steps"``; ``meta["final_step"]``, ``meta["evaluations"]`` (forward +
    backward passes of the fit loss, line-search trials included) and ``meta["curve"]``
    (per step: the fit loss, the held-out loss, the gradient norm and the projected one) report it.

    Targets:

    * ``safety_target="string"`` (default) -- the CE of the records' refusal (or ``refusal``);
      ``"distill"`` -- the KL from the ``aligned`` model (directory or loaded model sharing the
      tokenizer) at its own greedy ``distill_k``-token continuation of each safety prompt: the
      first ``safety_first_k`` tokens at weight 1, the rest at ``safety_rest_weight``. The aligned
      model is used before the loop and released (a directory is loaded like ``target``);
    * ``benign`` -- prompts (JSONL path(s) or records, completions ignored): the KL from θ_T at its
      own first ``benign_k`` greedy tokens, ``benign_weight`` times its mean added to the utility
      term (so weighted by β too); it guards against over-refusal. Fit part only.
    """
    import torch

    if steps < 0 or lr <= 0 or lambda_max <= 0 or beta < 0 or l2 < 0:
        raise UsageError("need steps >= 0, lr > 0, lambda_max > 0, beta >= 0, l2 >= 0")
    if grid_values is not None and (not list(grid_values) or any(not 0.0 <= float(v) <= lambda_max for v in grid_values)):
        raise UsageError(f"grid_values must be a non-empty list of γ in [0, lambda_max={lambda_max:g}], not {list(grid_values)}")
    if not 0.0 <= holdout < 1.0 or safety_rest_weight < 0 or reg_uniform < 0:
        raise UsageError("need 0 <= holdout < 1, safety_rest_weight >= 0, reg_uniform >= 0")
    if utility_loss not in ("auto", "ce", "kl"):
        raise UsageError(f"utility_loss must be 'auto', 'ce' or 'kl', not {utility_loss!r}")
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or micro_batch_size < 1):
        raise UsageError(f"micro_batch_size must be at least 1 (or None: one batch), not {micro_batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    if patience < 1 or tol < 0 or (heldout_patience is not None and heldout_patience < 1):
        raise UsageError("need patience >= 1, tol >= 0 and heldout_patience >= 1 (or None)")
    if safety_target not in SAFETY_TARGETS:
        raise UsageError(f"safety_target must be one of {SAFETY_TARGETS}, not {safety_target!r}")
    if safety_target == "distill" and aligned is None:
        raise UsageError("safety_target='distill' needs aligned= (the aligned model's directory or the model)")
    if distill_k < 1 or benign_k < 1 or benign_weight < 0:
        raise UsageError("need distill_k >= 1, benign_k >= 1 and benign_weight >= 0")
    t0 = time.perf_counter()
    log = log or (lambda _m: None)
    gene = load_gene(gene)
    keys_layers = resolve_layers(gene, layers)

    if isinstance(target, (str, Path)):
        model, tok = lm.load_model(target, device=device, dtype=dtype, device_map=device_map,
                                   max_memory=max_memory, offload_dir=offload_dir)
        target_name = str(target)
    else:
        model, tok = target, tokenizer
        if tok is None:
            raise UsageError("calibrate: pass tokenizer= together with a loaded model")
        target_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    device = str(lm.model_device(model))
    s_recs = load_records(safety, "safety", max_examples)
    if utility is None:
        u_recs = []
    elif isinstance(utility, (list, tuple)) and utility and all(
            isinstance(u, Path) or (isinstance(u, str) and os.path.isfile(u)) for u in utility):
        u_recs = [r for src in utility for r in load_records(src, "utility", max_examples)]
    else:
        u_recs = load_records(utility, "utility", max_examples)
    s_recs, s_held, split_info = split_holdout(s_recs, holdout, holdout_by)
    s_pairs = lm.encode_pairs(tok, s_recs, "safety", default_completion=refusal)
    s_held_pairs = lm.encode_pairs(tok, s_held, "safety", default_completion=refusal) if s_held else []
    b_recs = _load_many(benign, "benign", max_examples) if benign is not None else []
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
    u_held_pairs: list = []
    if s_held_pairs and len(u_pairs) >= 2:
        # utility records are held out by position: grouping them would hold out a whole kind
        # of answer (all chat, all of a task) and the fit would no longer see it
        every = max(2, int(round(1.0 / holdout)))
        u_held_pairs = [pr for i, pr in enumerate(u_pairs) if i % every == every - 1]
        u_pairs = [pr for i, pr in enumerate(u_pairs) if i % every != every - 1]
    split_info["n_utility_fit"], split_info["n_utility_heldout"] = len(u_pairs), len(u_held_pairs)
    b_pairs: list = []
    if b_recs:
        b_prompts = lm.encode_prompts(tok, b_recs)
        b_pairs = list(zip(b_prompts, lm.generate_ids(model, tok, b_prompts, max_new_tokens=benign_k)))
    teacher, own_teacher = None, False
    if safety_target == "distill":
        teacher, own_teacher = _load_teacher(aligned, model, device, dtype, device_map, max_memory, offload_dir)
        # the aligned model's own greedy continuations: the tokens it refuses with
        s_pairs = [(p, g) for p, g in zip((p for p, _ in s_pairs), lm.generate_ids(
            teacher, tok, [p for p, _ in s_pairs], max_new_tokens=distill_k))]
        if s_held_pairs:
            s_held_pairs = list(zip((p for p, _ in s_held_pairs), lm.generate_ids(
                teacher, tok, [p for p, _ in s_held_pairs], max_new_tokens=distill_k)))

    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = None
    blocks_ctx = contextlib.ExitStack()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            blocks_ctx.enter_context(checkpointed_blocks(model))
        plan = make_plan(mode, model, gene, keys_layers, per_module=per_module)
        objective = _Objective(model, tok, s_pairs, u_pairs, beta, l2, utility_loss, safety_first_k, device,
                               safety_rest_weight, reg_uniform, micro_batch_size=micro_batch_size,
                               checkpointing=gradient_checkpointing, teacher=teacher, benign_pairs=b_pairs,
                               benign_weight=benign_weight)
        # the held-out loss is the task's loss only (no l2, no pull toward uniform), built at
        # λ = 0 like the fit objective so its KL reference is θ_T
        held_obj = (_Objective(model, tok, s_held_pairs, u_held_pairs, beta, 0.0, utility_loss, safety_first_k,
                               device, safety_rest_weight, 0.0, micro_batch_size=micro_batch_size,
                               checkpointing=gradient_checkpointing, teacher=teacher) if s_held_pairs else None)
        teacher = None  # its distributions are cached: a model loaded here is freed before the loop
        if own_teacher:
            _empty_cache(device)
        dev = plan.weights[0].device
        k = plan.num_keys

        def evaluate(vals) -> tuple[float, dict]:
            lam = torch.tensor(vals, dtype=torch.float32, device=dev)
            with torch.no_grad():
                plan.set(lam)
            return objective.value(dict(zip(plan.names, plan.weights)), lam)

        def heldout(vals) -> tuple[float, dict]:
            assert held_obj is not None
            lam = torch.tensor(vals, dtype=torch.float32, device=dev)
            with torch.no_grad():
                plan.set(lam)
            return held_obj.value(dict(zip(plan.names, plan.weights)), lam)

        grid = None
        if isinstance(init, dict):
            start = [float(init.get(key, 0.0)) for key in plan.keys]
        elif isinstance(init, (int, float)):
            start = [float(init)] * k
        elif init == "grid":
            if grid_values is not None:
                pts = [float(v) for v in grid_values]
            else:
                pts = [lambda_max * i / (grid_points - 1) for i in range(grid_points)] if grid_points > 1 else [1.0]
            scores = []
            for g in pts:
                loss, parts = evaluate([g] * k)
                if held_obj is not None:
                    # γ̄ is the best uniform point on all the few-shot data (fit + held out):
                    # the RESTA choice the calibrated λ must then beat on the held-out part
                    hl, _ = heldout([g] * k)
                    n_f, n_h = len(s_pairs), len(s_held_pairs)
                    parts = {**parts, "heldout": hl, "fit": loss}
                    loss = (n_f * loss + n_h * hl) / (n_f + n_h)
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
        objective.center = torch.tensor(sum(start) / len(start), dtype=torch.float32, device=dev)

        lam = torch.tensor(start, dtype=torch.float32, device=dev, requires_grad=True)
        if optimizer == "lbfgs":
            opt: Any = torch.optim.LBFGS([lam], lr=lr, max_iter=1, max_eval=25, history_size=10,
                                         line_search_fn="strong_wolfe")
        else:
            opt = torch.optim.Adam([lam], lr=lr)
        best_loss, best_lam, best_step = math.inf, list(start), 0
        start_heldout = heldout(start)[0] if held_obj is not None else None
        history: list[dict] = []
        since_best = 0
        evals = 0
        stopped = "no_steps" if steps == 0 else "max_steps"
        # the plateau is judged on the held-out loss when there is a held-out part, else on the fit loss
        limit = heldout_patience if (held_obj is not None and heldout_patience is not None) else patience

        def projected() -> Any:
            # every trial point of the line search is evaluated at its projection onto [0, λ_max]
            return lam.clamp(0.0, lambda_max) if optimizer == "lbfgs" else lam

        def fit_backward() -> tuple[Any, dict]:
            nonlocal evals
            evals += 1
            return objective.backward(lambda: dict(zip(plan.names, gene_merge(projected(), plan))), projected())

        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss, parts = fit_backward()
            cur = lam.detach().cpu().tolist()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SafeGeneError(f"calibration loss became {lv} at step {step}; lower lr or lambda_max")
            grad = lam.grad.detach()
            gnorm = float(grad.norm())
            pgnorm = float(_projected_grad(lam.detach(), grad, lambda_max).norm())
            entry = {"step": step, "loss": lv, **parts, "lambda": cur, "grad_norm": gnorm,
                     "projected_grad_norm": pgnorm, "evaluations": evals}
            # model choice: the held-out loss when there is a held-out part, else the fit loss
            crit = lv
            if held_obj is not None:
                crit = heldout(cur)[0]
                entry["heldout_loss"] = crit
            history.append(entry)
            if _improved(crit, best_loss, tol):
                best_loss, best_lam, best_step, since_best = crit, cur, step, 0
            else:
                since_best += 1
            log(f"step {step}/{steps} loss {lv:.4f} safety {parts['safety']:.4f}"
                + (f" utility {parts['utility']:.4f}" if "utility" in parts else "")
                + (f" benign {parts['benign']:.4f}" if "benign" in parts else "")
                + (f" held-out {crit:.4f}" if held_obj is not None else "")
                + f" |g| {gnorm:.3g} λ " + " ".join(f"{v:.3f}" for v in cur))
            if since_best >= limit:
                stopped = "plateau"
                log(f"stopped on a plateau at step {step}: no relative improvement > {tol:g} for {limit} steps")
                break
            if step == steps:
                break  # the last step is evaluated, not followed by an update nobody evaluates
            if optimizer == "lbfgs":
                def closure(first: list = [loss]) -> Any:  # noqa: B006 (one list per step, consumed once)
                    if first:  # the current point: its loss and gradient are already there
                        return first.pop()
                    opt.zero_grad(set_to_none=True)
                    out, _ = fit_backward()
                    return out if math.isfinite(float(out)) else torch.tensor(math.inf)

                before = lam.detach().clone()
                opt.step(closure)
                with torch.no_grad():
                    lam.clamp_(0.0, lambda_max)
                if torch.equal(before, lam.detach()):
                    stopped = "converged"
                    log(f"L-BFGS made no move at step {step}: converged")
                    break
            else:
                opt.step()
                with torch.no_grad():
                    lam.clamp_(0.0, lambda_max)
        if steps == 0:
            best_loss, _ = evaluate(start)
            best_lam = start
        fell_back = False
        if start_heldout is not None and heldout(best_lam)[0] > start_heldout:
            # never worse than the uniform start on the held-out part (the first step *is* the
            # start, so this triggers only through tol or float noise, but it is the guarantee)
            best_lam, best_step, fell_back = list(start), 0, True
        final_loss, final_parts = evaluate(best_lam)
        final_heldout, final_held_parts = heldout(best_lam) if held_obj is not None else (None, None)
    finally:
        if plan is not None:
            plan.restore()
        blocks_ctx.close()
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
        "heldout_loss": final_heldout,
        "heldout_loss_parts": final_held_parts,
        "uniform_heldout_loss": start_heldout,
        "fell_back_to_uniform": fell_back,
        "split": split_info,
        "best_step": best_step,
        "steps_run": len(history),
        "final_step": len(history),
        "stopped": stopped,
        "optimizer": optimizer,
        "evaluations": evals,
        "curve": {"step": [h["step"] for h in history], "loss": [h["loss"] for h in history],
                  "heldout_loss": [h.get("heldout_loss") for h in history],
                  "grad_norm": [h["grad_norm"] for h in history],
                  "projected_grad_norm": [h["projected_grad_norm"] for h in history]},
        "init": init if isinstance(init, (str, float, int)) else "dict",
        "start": start,
        "grid": grid,
        "hyper": {"steps": steps, "lr": lr, "beta": beta, "l2": l2, "lambda_max": lambda_max,
                  "utility_loss": utility_loss, "safety_first_k": safety_first_k,
                  "safety_rest_weight": safety_rest_weight, "holdout": holdout, "holdout_by": holdout_by,
                  "reg_uniform": reg_uniform, "patience": patience, "heldout_patience": heldout_patience,
                  "tol": tol, "optimizer": optimizer, "safety_target": safety_target,
                  "distill_k": distill_k if safety_target == "distill" else None,
                  "aligned": (str(aligned) if isinstance(aligned, (str, Path)) else
                              (type(aligned).__name__ if aligned is not None else None)),
                  "benign_k": benign_k if b_pairs else None, "benign_weight": benign_weight if b_pairs else None,
                  "n_benign": len(b_pairs),
                  "micro_batch_size": micro_batch_size, "gradient_checkpointing": gradient_checkpointing,
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
