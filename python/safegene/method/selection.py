"""Data-aware layer selection: which keys of the gene carry the safety-specific part of τ.

A key is a decoder block (``layer.<i>``) or one of the tensors outside the blocks (``embed``,
``final_norm``, ``lm_head``). Three scores are computed (all are written to gene.json; one
drives the selection):

``"restore"`` (default; every key)
    Interventional. With the refusal openings ``R`` (the first token of each harmful record's
    refusal completion) and ``p(θ, x) = P(first response token ∈ R | x)``, add one key's τ
    alone to the degraded model and measure::

        s_k = mean_H [p(θ_D + τ_k) − p(θ_D)] − mean_B [p(θ_D + τ_k) − p(θ_D)]

    — how much that key alone brings refusals back on harmful prompts H, minus how much it
    makes benign prompts B refused. It needs harmful prompts with refusals (``refusal=`` fills
    records without one). It is the only score that can rate the LM head: a tiny model's
    refusal is decided by its first response token, and the eager ``sure !`` opening that the
    degradation taught lives largely in ``lm_head``.

The other two read activations and rate decoder blocks only. Both models (aligned θ_A,
degraded θ_D) are run — one at a time — on H and B with a forward hook on every block; per
prompt and block only the hidden state at the *last prompt token* (where the model decides to
refuse) is kept, so the cache is N × (L+1) × d floats. With ``h_l`` the residual stream after
block l and ``δ_l = h_l − h_{l−1}`` what block l itself writes:

``"contrast"``
    ``mean_H ‖δ^A_l − δ^D_l‖ / mean_B ‖δ^A_l − δ^D_l‖`` — how much more the block's output
    changed between A and D on harmful prompts than on benign ones. Scale-free; 1 means the
    change is not specific to harm. It measures *any* change, including changes in directions
    that have nothing to do with refusing.

``"refusal"``
    the shift along the aligned model's refusal direction. With
    ``r_l = unit(mean_H h^A_l − mean_B h^A_l)`` (difference of means; Arditi et al. 2024)::

        s_l = (mean_H ⟨δ^A_l − δ^D_l, r_l⟩ − mean_B ⟨δ^A_l − δ^D_l, r_l⟩) / rms_l

    where ``rms_l`` is the RMS norm of ``h^A_l`` over all prompts.

Measured on the model organism (seed 0, recipe key 64e1b374f26b1e3a; calibration split only):
"restore" scores L0 0.218, L3 0.144, lm_head 0.135, L1 0.099, L2 0.095, embed 0.027,
final_norm 0.002 and selects {L0, L3, lm_head}; "refusal" selects {L0, L3} (the same blocks),
"contrast" {L0, L1}. Calibrated on {L0, L3, lm_head} the held-out ASR is 0 / 0 / 0 %
(sentiment / topic / yesno task models) at 100 % task accuracy and 0 % over-refusal; on
{L0, L3} 15 / 21 / 34 %; on {L0, L1} 87 % (topic) and 97 % (yesno).

Selection: ``top_k`` keys by score, or all keys whose score is at least ``threshold`` times
the best one (default threshold 0.5 when neither is given). Deterministic: fixed prompt
order, eval mode, float32, no sampling.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Union

from .. import lm
from ..data import load_records, split_record
from ..errors import UsageError
from ..eval.plots import plot_scores
from ..gene import load_gene
from .merge import apply_to_model

SCORES = ("restore", "refusal", "contrast")
DEFAULT_SCORE = "restore"
DEFAULT_THRESHOLD = 0.5


def layer_states(model_dir, prompts, batch_size: int = 16, device: str = "cpu", tokenizer=None):
    """Hidden state at the last prompt token after the embeddings and after every block.

    Returns a float32 tensor ``[n_prompts, num_layers + 1, hidden]`` (index 0: embeddings).

    >>> hs = layer_states("aligned/", ["how do i pick a lock ?"])  # doctest: +SKIP
    """
    import torch

    if isinstance(model_dir, (str, Path)):
        model, tok = lm.load_model(model_dir, device=device)
    else:
        model, tok = model_dir, tokenizer
    blocks = lm.decoder_layers(model)
    ids = lm.encode_prompts(tok, load_records(prompts, "prompts"))
    pad = lm.pad_id_of(tok)
    captured: list[Any] = [None] * (len(blocks) + 1)

    def grab_input(_mod, args, kwargs):
        captured[0] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def grab_output(i):
        def hook(_mod, _args, output):
            captured[i] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    handles += [b.register_forward_hook(grab_output(i + 1)) for i, b in enumerate(blocks)]
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(ids), batch_size):
                chunk = ids[s: s + batch_size]
                batch = lm.collate([(p, []) for p in chunk], pad, device)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                rows = torch.arange(len(chunk), device=batch.input_ids.device)
                out.append(torch.stack([c[rows, batch.last_prompt].float().cpu() for c in captured], 1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out, 0)


def refusal_openings(tokenizer, records, refusal: str | None = None) -> list[int]:
    """Token ids a refusal starts with: the first token of each harmful record's completion (as
    the model would emit it after the prompt), or of ``refusal`` for records without one."""
    ids: set[int] = set()
    for rec in records:
        msgs, comp = split_record(rec)
        comp = comp if comp is not None else refusal
        if comp:
            toks = lm.render_completion(tokenizer, msgs, comp)
            if toks:
                ids.add(int(toks[0]))
    return sorted(ids)


def refusal_probability(model, tokenizer, prompts, openings: list[int], batch_size: int = 16,
                        device: str = "cpu"):
    """P(first response token is a refusal opening) per prompt, float32 tensor ``[n]``."""
    import torch

    ids = lm.encode_prompts(tokenizer, load_records(prompts, "prompts"))
    pad = lm.pad_id_of(tokenizer)
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            chunk = ids[s: s + batch_size]
            batch = lm.collate([(p, []) for p in chunk], pad, device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            rows = torch.arange(len(chunk), device=batch.input_ids.device)
            logp = torch.log_softmax(logits[rows, batch.last_prompt].float(), -1)
            out.append(logp[:, openings].exp().sum(-1).cpu())
    return torch.cat(out, 0)


def restore_scores(gene, degraded, harmful, benign, refusal: str | None = None, batch_size: int = 16,
                   device: str = "cpu") -> dict[str, float]:
    """The ``"restore"`` score of every key of the gene (decoder blocks, embeddings, final norm,
    LM head): add that key's τ alone to the degraded model and measure how much the probability
    of opening with a refusal rises on harmful prompts minus how much it rises on benign ones::

        s_k = mean_H [p(θ_D + τ_k) − p(θ_D)] − mean_B [p(θ_D + τ_k) − p(θ_D)]

    One model in memory; each key's tensors are patched in place and copied back exactly.
    """
    import torch

    model, tok = lm.load_model(degraded, device=device) if isinstance(degraded, (str, Path)) else degraded
    harmful = load_records(harmful, "harmful")
    openings = refusal_openings(tok, harmful, refusal)
    if not openings:
        raise UsageError("the 'restore' score needs refusals: give the harmful prompts refusal completions "
                         "(or refusal=...), or use score='refusal'")
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update({k: v for k, v in model.named_buffers(remove_duplicate=False) if k not in state})
    p0H = refusal_probability(model, tok, harmful, openings, batch_size, device)
    p0B = refusal_probability(model, tok, benign, openings, batch_size, device)
    out = {}
    for key in gene.layer_keys():
        names = [n for n in gene.tensor_names if gene.layer_key(n) == key and n in state]
        saved = {n: state[n].detach().clone() for n in names}
        try:
            apply_to_model(model, gene, {key: 1.0})
            pH = refusal_probability(model, tok, harmful, openings, batch_size, device)
            pB = refusal_probability(model, tok, benign, openings, batch_size, device)
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    state[n].copy_(v)
        out[key] = float((pH - p0H).mean() - (pB - p0B).mean())
    return out


def compute_scores(hA_harm, hD_harm, hA_ben, hD_ben) -> dict[str, list[float]]:
    """Both per-block scores from cached states ``[n, L+1, d]`` (see the module docstring)."""
    import torch

    def inc(h):
        return h[:, 1:] - h[:, :-1]

    dH = inc(hA_harm) - inc(hD_harm)  # [nH, L, d]
    dB = inc(hA_ben) - inc(hD_ben)
    eps = 1e-12
    contrast = (dH.norm(dim=-1).mean(0) / dB.norm(dim=-1).mean(0).clamp_min(eps)).tolist()
    hA = hA_harm[:, 1:]
    hB = hA_ben[:, 1:]
    r = hA.mean(0) - hB.mean(0)  # [L, d]
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
    rms = torch.cat([hA, hB], 0).norm(dim=-1).pow(2).mean(0).sqrt().clamp_min(eps)  # [L]
    shiftH = (dH * r).sum(-1).mean(0)
    shiftB = (dB * r).sum(-1).mean(0)
    refusal = ((shiftH - shiftB) / rms).tolist()
    return {"refusal": refusal, "contrast": contrast}


def choose(scores: dict[str, float], top_k: int | None = None, threshold: float | None = None) -> list[str]:
    """Layer keys picked by ``top_k`` or by ``score >= threshold · max(score)`` (ties: lower index)."""
    keys = list(scores)
    if top_k is not None and threshold is not None:
        raise UsageError("give either top_k or threshold, not both")
    if top_k is not None:
        if not 1 <= top_k <= len(keys):
            raise UsageError(f"top_k must be between 1 and {len(keys)}, got {top_k}")
        ranked = sorted(keys, key=lambda k: (-scores[k], keys.index(k)))
        picked = set(ranked[:top_k])
    else:
        thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        best = max(scores.values())
        if best <= 0:
            raise UsageError("no layer has a positive score: the aligned–degraded contrast is not harm-specific here")
        picked = {k for k in keys if scores[k] >= thr * best}
    return [k for k in keys if k in picked]


def select_layers(
    gene,
    aligned,
    degraded,
    harmful,
    benign,
    top_k: int | None = None,
    threshold: float | None = None,
    score: str = DEFAULT_SCORE,
    batch_size: int = 16,
    max_prompts: int | None = 64,
    plot: Union[str, Path, None] = None,
    device: str = "cpu",
    write: bool = True,
    refusal: str | None = None,
) -> dict:
    """Score every key of the gene and record the selected ones in the gene's ``gene.json``.

    >>> res = select_layers("gene/", "aligned/", "degraded/", "harmful_calib.jsonl",
    ...                     "benign_calib.jsonl", plot="layers.png")  # doctest: +SKIP
    >>> res["selected"]  # doctest: +SKIP
    ['layer.0', 'layer.3', 'lm_head']

    ``harmful`` records should carry refusal completions (the ``"restore"`` score reads their
    first tokens); ``refusal`` stands in for records without one. Returns ``{"method",
    "scores" (the chosen score per key), "all_scores", "selected", "plot", "seconds", ...}``;
    with ``write=False`` gene.json is left alone.
    """
    if score not in SCORES:
        raise UsageError(f"score must be one of {list(SCORES)}, not {score!r}")
    t0 = time.perf_counter()
    gene = load_gene(gene)
    harm = load_records(harmful, "harmful", max_prompts)
    ben = load_records(benign, "benign", max_prompts)
    states = {}
    for tag, mdir in (("A", aligned), ("D", degraded)):  # one model in memory at a time
        states[tag + "H"] = layer_states(mdir, harm, batch_size, device)
        states[tag + "B"] = layer_states(mdir, ben, batch_size, device)
    raw = compute_scores(states["AH"], states["DH"], states["AB"], states["DB"])
    del states
    n_layers = raw["refusal"].__len__()
    gene_layers = [k for k in gene.layer_keys() if k.startswith("layer.")]
    if len(gene_layers) != n_layers:
        raise UsageError(f"the models have {n_layers} decoder blocks but gene {gene.path} has {len(gene_layers)}")
    keys = [f"layer.{i}" for i in range(n_layers)]
    all_scores = {}
    has_refusals = refusal is not None or any(split_record(r)[1] for r in harm)
    if score == "restore" or has_refusals:
        all_scores["restore"] = {k: _r(v) for k, v in
                                 restore_scores(gene, degraded, harm, ben, refusal, batch_size, device).items()}
    all_scores.update({n: {k: _r(v) for k, v in zip(keys, vals)} for n, vals in raw.items()})
    selected = choose(all_scores[score], top_k, threshold)
    rule = {"top_k": top_k} if top_k is not None else {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold}
    other = {n: choose(s, None if top_k is None else min(top_k, len(s)), threshold)
             for n, s in all_scores.items() if n != score and max(s.values()) > 0}
    plot_path = plot_scores(all_scores, selected, score, plot) if plot else None
    extra = {
        "all_scores": all_scores,
        "rule": rule,
        "selected_by_other_scores": other,
        "n_harmful": len(harm),
        "n_benign": len(ben),
        "summary": "last prompt token; block increments; one model at a time",
        "plot": str(plot_path) if plot_path else None,
    }
    if write:
        gene.set_selection(all_scores[score], selected, score, extra)
    return {"method": score, "scores": all_scores[score], "selected": selected, **extra,
            "seconds": round(time.perf_counter() - t0, 3)}


def _r(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


