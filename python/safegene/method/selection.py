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

What each score selects on the organism, and how calibration fares on those keys, is in
``bench/method_notes.md``.

``"loo"`` (joint; every key; computed beside ``"restore"``)
    Leave-one-out from the full gene: ``j_k = mean_H [p(θ_D + τ) − p(θ_D + τ − τ_k)] − mean_B
    [same]`` -- how much refusal is lost when key k alone is taken out. It sees keys that only
    matter together with others, which a single-key score misses. Both scores, and each one's
    standard error over prompts (``score_noise``), are in the selection metadata.

Selection rules:

``rule="threshold"`` (used whenever ``top_k`` or ``threshold`` is given)
    ``top_k`` keys by score, or all keys whose score is at least ``threshold`` times the best one
    (0.5 when ``rule="threshold"`` is asked for without either).
``rule="validate"`` (default)
    *How many* keys is chosen on development prompts (:func:`validate_k`): rank keys by the
    score, give the top-k set its best uniform γ on the degraded model for k = 1..K, measure
    the calibration loss (refusal CE + β·KL on benign prompts) on the development prompts, and
    keep the k with the lowest loss (``validate_z`` > 0: the smallest k within that many standard
    errors of the best, the one-standard-error rule at 1). Scores that do not stand out
    of their own noise (max − min ≤ 2 standard errors, or none positive) keep every key.
    Without a development split, every second harmful/benign record is one (the others score).

Why validation is the default (issue 19; numbers in ``bench/dev_split.md``, chosen by the rule
written there on the development split of organism seeds 0 and 1 and of the StableLM-style
family's seed 0 -- those seeds are "used for choices"): on the second family the 0.5 × best
threshold keeps {L0} alone and the calibrated task models stay at 91 / 59 / 99 % development
ASR; ``"validate"`` keeps six keys and reaches 0 / 0 / 63 %. On the organism it keeps the same
three keys as the threshold on both seeds ({L0, L3, lm_head}), so results there are identical.
Ranking by ``"loo"`` keeps {L0, lm_head} (seed 0) / {L0, L3} (second family) and is no better.
``validate_z = 0`` (the k of lowest development loss, no shrink toward fewer keys) replaced the
one-standard-error rule in the fifth round: same keys on both Llama development seeds, and on
the StableLM family's seeds 0 and 1 it keeps 7 and 4 keys instead of 2, which brings the season
task's development ASR from 99 / 49 % to 6 / 37 % (rule cost 26.2 → 10.9).
Deterministic: fixed prompt order, eval mode, float32, no sampling.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any, Callable, Union

from .. import lm
from ..data import load_records, split_record
from ..errors import UsageError
from ..eval.plots import plot_scores
from ..gene import load_gene
from .merge import apply_to_model

SCORES = ("restore", "loo", "refusal", "contrast")
DEFAULT_SCORE = "restore"
DEFAULT_THRESHOLD = 0.5
RULES = ("threshold", "validate")
DEFAULT_RULE = "validate"
NOISE_Z = 2.0
#: ``validate_k``'s z: 0 keeps the k of lowest development loss (chosen by the rule of
#: ``bench/dev_split.md``, fifth round; the one-standard-error rule, z = 1, starved calibration
#: on the StableLM family).
VALIDATE_Z = 0.0
#: The uniform γ each top-k set is tried at by :func:`validate_k`.
VALIDATE_GAMMAS = tuple(0.5 * i for i in range(9))


def layer_states(model_dir, prompts, batch_size: int = 16, device: str | None = None, tokenizer=None,
                 load: dict | None = None):
    """Hidden state at the last prompt token after the embeddings and after every block.

    Returns a float32 tensor ``[n_prompts, num_layers + 1, hidden]`` (index 0: embeddings).

    >>> hs = layer_states("aligned/", ["how do i pick a lock ?"])  # doctest: +SKIP
    """
    import torch

    if isinstance(model_dir, (str, Path)):
        model, tok = lm.load_model(model_dir, device=device, **(load or {}))
    else:
        model, tok = model_dir, tokenizer
    device = lm.model_device(model)
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


def _model_of(src: Any, device: str | None, load: dict) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a model directory (loaded) or of a ``(model, tokenizer)`` pair."""
    if isinstance(src, (str, Path)):
        return lm.load_model(src, device=device, **load)
    if isinstance(src, (tuple, list)) and len(src) == 2:
        return src[0], src[1]
    raise UsageError(f"expected a model directory or a (model, tokenizer) pair, got {type(src).__name__}")


def _release() -> None:
    """Give a dropped model's memory back before the next one is loaded."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        pass


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


def _effect(pH, p0H, pB, p0B) -> tuple[float, float]:
    """``mean_H Δ − mean_B Δ`` and its standard error over prompts."""
    dH, dB = pH - p0H, pB - p0B
    var = (float(dH.var()) / len(dH) if len(dH) > 1 else 0.0) + (float(dB.var()) / len(dB) if len(dB) > 1 else 0.0)
    return float(dH.mean() - dB.mean()), math.sqrt(var)


def restore_scores(gene, degraded, harmful, benign, refusal: str | None = None, batch_size: int = 16,
                   device: str | None = None, joint: dict | None = None, noise: dict | None = None,
                   load: dict | None = None, on_pass: Callable[[], None] | None = None) -> dict[str, float]:
    """The ``"restore"`` score of every key of the gene (decoder blocks, embeddings, final norm,
    LM head): add that key's τ alone to the degraded model and measure how much the probability
    of opening with a refusal rises on harmful prompts minus how much it rises on benign ones::

        s_k = mean_H [p(θ_D + τ_k) − p(θ_D)] − mean_B [p(θ_D + τ_k) − p(θ_D)]

    Pass a dict as ``joint`` to also get the ``"loo"`` (leave-one-out) score, which rates keys
    *jointly*: how much refusal is lost when key k alone is taken out of the full gene::

        j_k = mean_H [p(θ_D + τ) − p(θ_D + τ − τ_k)] − mean_B [same]

    (a key that only matters together with others scores high here and low under restore). A
    dict as ``noise`` receives each score's standard error over prompts, keyed ``"restore"`` /
    ``"loo"`` then by layer key. One model in memory; each key's tensors are patched in place
    and copied back exactly. ``degraded``: a model directory (loaded here) or ``(model,
    tokenizer)``. ``on_pass`` is called after each pass over the harmful and benign prompts
    (``1 + K``, and ``1 + K`` more with ``joint``, for K keys): a progress hook.
    """
    import torch

    model, tok = (lm.load_model(degraded, device=device, **(load or {})) if isinstance(degraded, (str, Path))
                  else degraded)
    device = lm.model_device(model)
    harmful = load_records(harmful, "harmful")
    openings = refusal_openings(tok, harmful, refusal)
    if not openings:
        raise UsageError("the 'restore' score needs refusals: give the harmful prompts refusal completions "
                         "(or refusal=...), or use score='refusal'")
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update({k: v for k, v in model.named_buffers(remove_duplicate=False) if k not in state})

    def probs():
        out = (refusal_probability(model, tok, harmful, openings, batch_size, device),
               refusal_probability(model, tok, benign, openings, batch_size, device))
        if on_pass is not None:
            on_pass()
        return out

    p0H, p0B = probs()
    keys = gene.layer_keys()
    out, se = {}, {}
    for key in keys:
        names = [n for n in gene.tensor_names if gene.layer_key(n) == key and n in state]
        saved = {n: state[n].detach().clone() for n in names}
        try:
            apply_to_model(model, gene, {key: 1.0})
            pH, pB = probs()
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    state[n].copy_(v)
        out[key], se[key] = _effect(pH, p0H, pB, p0B)
    if noise is not None:
        noise["restore"] = se
    if joint is not None:
        names = [n for n in gene.tensor_names if n in state]
        saved = {n: state[n].detach().clone() for n in names}
        loo_se = {}
        try:
            apply_to_model(model, gene, {k: 1.0 for k in keys})
            full = {n: state[n].detach().clone() for n in names}
            fH, fB = probs()
            for key in keys:
                apply_to_model(model, gene, {key: -1.0})
                pH, pB = probs()
                with torch.no_grad():
                    for n in names:
                        if gene.layer_key(n) == key:
                            state[n].copy_(full[n])
                joint[key], loo_se[key] = _effect(fH, pH, fB, pB)
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    state[n].copy_(v)
        if noise is not None:
            noise["loo"] = loo_se
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


def is_flat(scores: dict[str, float], noise: float | dict | None, z: float = NOISE_Z) -> bool:
    """True when no key's score stands out of the noise: ``max − min ≤ z · noise`` (``noise``:
    one standard error, or a per-key dict whose largest value is used), or no score is positive.

    >>> is_flat({"a": 0.10, "b": 0.08}, 0.02), is_flat({"a": 0.5, "b": 0.0}, 0.02)
    (True, False)
    """
    vals = list(scores.values())
    if not vals or max(vals) <= 0:
        return True
    if noise is None:
        return False
    n = max(noise.values()) if isinstance(noise, dict) else float(noise)
    return max(vals) - min(vals) <= z * n


def choose(scores: dict[str, float], top_k: int | None = None, threshold: float | None = None,
           noise: float | dict | None = None) -> list[str]:
    """Layer keys picked by ``top_k`` or by ``score >= threshold · max(score)`` (ties: lower index).

    With ``noise`` (the scores' standard error; see :func:`is_flat`), flat scores keep every key
    instead of a fraction of the best (a threshold on noise would pick at random).
    """
    keys = list(scores)
    if top_k is not None and threshold is not None:
        raise UsageError("give either top_k or threshold, not both")
    if top_k is None and noise is not None and is_flat(scores, noise):
        return keys
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


def rank(scores: dict[str, float]) -> list[str]:
    """Keys by decreasing score (ties: gene order)."""
    keys = list(scores)
    return sorted(keys, key=lambda k: (-scores[k], keys.index(k)))


#: How validate_k forms its candidate key sets.
SEARCHES = ("prefix", "forward")


def validate_k(gene, model, tokenizer, ranked: list[str], harmful, benign, gammas=None, beta: float = 3.0,
               safety_first_k: int | None = 2, safety_rest_weight: float = 0.5, z: float = VALIDATE_Z,
               refusal: str | None = None, device: str = "cpu", on_pass: Callable[[], None] | None = None,
               search: str = "prefix") -> dict:
    """How many of the ranked keys to keep, chosen on held-out (development) prompts.

    ``search="prefix"`` (default) compares the top-k prefixes of ``ranked``; ``"forward"`` builds
    the k-key sets by forward selection on the same loss (each step adds the key whose addition
    gives the lowest loss; ties by rank), so a key ranked low by its single-key score still comes
    in early when it helps with the others (K(K+1)/2 evaluations instead of K).

    For k = 1..K the top-k keys get one uniform γ (the best of ``gammas``) on ``model`` (the
    degraded model: the one the gene was cut from), and the development objective is the
    calibration loss -- refusal CE on ``harmful`` (first ``safety_first_k`` tokens, the rest
    with weight ``safety_rest_weight``) + β · KL to the model's own answers on ``benign``. The
    smallest k whose loss is within ``z`` standard errors (over prompts) of the best k is kept:
    the one-standard-error rule, so keys are dropped only when dropping them costs nothing the
    development split can see. A few forward passes per (k, γ) through the in-memory merge;
    the model is restored exactly.

    Returns ``{"k", "selected", "curve": [{"k", "keys", "gamma", "loss", "se"}], "best_k"}``.
    ``on_pass`` is called after the benign answers are generated and after each (k, γ): a
    progress hook (``1 + K · len(gammas)`` calls).
    """
    import torch

    from .calibrate import _Objective
    from .merge import MergePlan

    if not ranked:
        raise UsageError("validate_k needs at least one ranked key")
    if search not in SEARCHES:
        raise UsageError(f"unknown validation search {search!r}; choose one of {', '.join(SEARCHES)}")
    gammas = list(gammas) if gammas is not None else list(VALIDATE_GAMMAS)
    harm = load_records(harmful, "development harmful")
    ben = load_records(benign, "development benign")
    s_pairs = lm.encode_pairs(tokenizer, harm, "development harmful", default_completion=refusal)
    b_prompts = lm.encode_prompts(tokenizer, ben)
    was_training = model.training
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = None
    curve: list[Any] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        gens = lm.generate_ids(model, tokenizer, b_prompts, max_new_tokens=16)
        if on_pass is not None:
            on_pass()
        plan = MergePlan(model, gene, ranked)
        obj = _Objective(model, tokenizer, s_pairs, list(zip(b_prompts, gens)), beta, 0.0, "kl", safety_first_k,
                         device, safety_rest_weight, 0.0)
        def evaluate(keys: list[str]) -> dict:
            on, best = set(keys), None
            for g in gammas:
                plan.set([g if key in on else 0.0 for key in plan.keys])
                with torch.no_grad():
                    sr, ur = obj.rows({})
                loss = float(sr.mean()) + beta * float(ur.mean())
                var = float(sr.var()) / len(sr) if len(sr) > 1 else 0.0
                var += beta ** 2 * float(ur.var()) / len(ur) if len(ur) > 1 else 0.0
                if best is None or loss < best["loss"] - 1e-12:
                    best = {"k": len(keys), "keys": list(keys), "gamma": g, "loss": loss, "se": math.sqrt(var)}
                if on_pass is not None:
                    on_pass()
            return best

        if search == "prefix":
            curve = [evaluate(ranked[:k]) for k in range(1, len(ranked) + 1)]
        else:
            chosen_keys: list[str] = []
            rest = list(ranked)
            while rest:
                tries = [evaluate(chosen_keys + [key]) for key in rest]
                i = min(range(len(rest)), key=lambda j: (tries[j]["loss"], j))
                curve.append(tries[i])
                chosen_keys.append(rest.pop(i))
    finally:
        if plan is not None:
            plan.restore()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    chosen, best, bound = smallest_within_noise(curve, z)
    return {"k": chosen["k"], "selected": [k for k in gene.layer_keys() if k in set(chosen["keys"])],
            "best_k": best["k"], "bound": bound, "z": z, "curve": curve}


def smallest_within_noise(curve: list[dict], z: float = 1.0) -> tuple[dict, dict, float]:
    """The one-standard-error rule over ``[{"k", "loss", "se"}, ...]``: the smallest k whose loss
    is at most ``best loss + z · se(best)``. Returns ``(chosen, best, bound)``.

    >>> c = [{"k": 1, "loss": 1.00, "se": .01}, {"k": 2, "loss": .95, "se": .02}, {"k": 3, "loss": .94, "se": .02}]
    >>> smallest_within_noise(c)[0]["k"]
    2
    """
    best = min(curve, key=lambda c: (c["loss"], c["k"]))
    bound = best["loss"] + z * best["se"]
    chosen = min((c for c in curve if c["loss"] <= bound), key=lambda c: c["k"])
    return chosen, best, bound


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
    device: str | None = None,
    write: bool = True,
    refusal: str | None = None,
    rule: str | None = None,
    dev_harmful=None,
    dev_benign=None,
    validate_z: float = VALIDATE_Z,
    noise_z: float = NOISE_Z,
    validate_search: str = "prefix",
    dtype=None,
    device_map=None,
    max_memory=None,
    offload_dir: Union[str, Path, None] = None,
    progress: bool = False,
) -> dict:
    """Score every key of the gene and record the selected ones in the gene's ``gene.json``.

    >>> res = select_layers("gene/", "aligned/", "degraded/", "harmful_calib.jsonl",
    ...                     "benign_calib.jsonl", plot="layers.png")  # doctest: +SKIP
    >>> res["selected"]  # doctest: +SKIP
    ['layer.0', 'layer.3', 'lm_head']

    ``harmful`` records should carry refusal completions (the ``"restore"`` score reads their
    first tokens); ``refusal`` stands in for records without one. Returns ``{"method",
    "scores" (the chosen score per key), "all_scores", "selected", "plot", "seconds", ...}``;
    with ``write=False`` gene.json is left alone. ``device``, ``dtype``, ``device_map``,
    ``max_memory``, ``offload_dir``: how the models are loaded (:func:`safegene.lm.load_model`).
    ``aligned`` and ``degraded`` are model directories or ``(model, tokenizer)`` pairs; each
    directory is loaded once (the aligned model first, and dropped before the degraded one is
    loaded: one model in memory at a time). ``progress``: a progress bar on stderr over the
    passes over the prompts.

    ``rule`` (default :data:`DEFAULT_RULE`; ``"threshold"`` whenever ``top_k`` or ``threshold``
    is given): ``"validate"`` chooses *how many* keys to keep on development prompts
    (:func:`validate_k`): ``dev_harmful`` / ``dev_benign``, or, when not given, every second
    record of ``harmful`` / ``benign`` (the other half computes the scores). Keys are ranked by
    ``score``; scores that do not stand out of their noise (:func:`is_flat`, ``noise_z``
    standard errors) keep every key. ``top_k`` / ``threshold`` apply to ``rule="threshold"``.
    The ``"loo"`` (leave-one-out, joint) score is computed beside ``"restore"`` and both are
    reported in ``all_scores``, with their standard errors in ``score_noise``.
    ``validate_search``: how the validate rule forms its key sets (:data:`SEARCHES`; ``"forward"``:
    forward selection on the development loss instead of prefixes of the score ranking).
    """
    if validate_search not in SEARCHES:
        raise UsageError(f"unknown validation search {validate_search!r}; choose one of {', '.join(SEARCHES)}")
    if score not in SCORES:
        raise UsageError(f"score must be one of {list(SCORES)}, not {score!r}")
    if rule is None:  # an explicit top_k / threshold asks for the threshold rule
        rule = DEFAULT_RULE if top_k is None and threshold is None else "threshold"
    if rule not in RULES:
        raise UsageError(f"rule must be one of {list(RULES)}, not {rule!r}")
    if rule == "validate" and (top_k is not None or threshold is not None):
        raise UsageError("rule='validate' chooses the number of keys itself; drop top_k / threshold")
    t0 = time.perf_counter()
    gene = load_gene(gene)
    harm = load_records(harmful, "harmful", max_prompts)
    ben = load_records(benign, "benign", max_prompts)
    if rule == "validate" and (dev_harmful is None) != (dev_benign is None):
        raise UsageError("give both dev_harmful and dev_benign, or neither")
    if rule == "validate" and dev_harmful is None:
        if len(harm) < 2 or len(ben) < 2:
            raise UsageError("rule='validate' needs at least 2 harmful and 2 benign prompts (or a development split)")
        harm, dev_h = harm[0::2], harm[1::2]
        ben, dev_b = ben[0::2], ben[1::2]
    elif rule == "validate":
        dev_h, dev_b = load_records(dev_harmful, "dev_harmful"), load_records(dev_benign, "dev_benign")
    from tqdm.auto import tqdm

    load = {"dtype": dtype, "device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir}
    keys_all = gene.layer_keys()
    has_refusals = refusal is not None or any(split_record(r)[1] for r in harm)
    restore = score in ("restore", "loo") or has_refusals
    # one unit per pass over a prompt set: 2 per model for the states, then restore (+ loo);
    # validation's passes are added once it is known to run (it does not on flat scores)
    total = 4 + (2 * (1 + len(keys_all)) if restore else 0)
    with tqdm(total=total, disable=not progress, desc="select", unit="pass") as bar:
        def tick() -> None:
            bar.update(1)

        states = {}
        # one model in memory at a time, each loaded once: the aligned one for its states, then
        # the degraded one for its states, the restore / leave-one-out scores and validation
        amodel, atok = _model_of(aligned, device, load)
        bar.set_postfix_str("aligned states")
        states["AH"] = layer_states(amodel, harm, batch_size, tokenizer=atok)
        tick()
        states["AB"] = layer_states(amodel, ben, batch_size, tokenizer=atok)
        tick()
        del amodel, atok
        _release()
        dmodel, dtok = _model_of(degraded, device, load)
        device = str(lm.model_device(dmodel))
        bar.set_postfix_str("degraded states")
        states["DH"] = layer_states(dmodel, harm, batch_size, tokenizer=dtok)
        tick()
        states["DB"] = layer_states(dmodel, ben, batch_size, tokenizer=dtok)
        tick()
        raw = compute_scores(states["AH"], states["DH"], states["AB"], states["DB"])
        del states
        n_layers = raw["refusal"].__len__()
        gene_layers = [k for k in keys_all if k.startswith("layer.")]
        if len(gene_layers) != n_layers:
            raise UsageError(f"the models have {n_layers} decoder blocks but gene {gene.path} has {len(gene_layers)}")
        keys = [f"layer.{i}" for i in range(n_layers)]
        all_scores = {}
        noise: dict = {}
        if restore:
            joint: dict = {}
            bar.set_postfix_str("restore + leave-one-out")
            all_scores["restore"] = {k: _r(v) for k, v in
                                     restore_scores(gene, (dmodel, dtok), harm, ben, refusal, batch_size, device,
                                                    joint=joint, noise=noise, on_pass=tick).items()}
        all_scores.update({n: {k: _r(v) for k, v in zip(keys, vals)} for n, vals in raw.items()})
        if "restore" in all_scores:  # last, so the first "other" score stays the activation one
            all_scores["loo"] = {k: _r(v) for k, v in joint.items()}
        validation: dict[str, Any] | None = None
        selected: list[str]
        if rule == "validate":
            sc = all_scores[score]
            flat = is_flat(sc, noise.get(score), noise_z)
            if flat:
                selected = list(sc)
                validation = {"flat": True, "k": len(selected)}
            else:
                n_sets = len(sc) if validate_search == "prefix" else len(sc) * (len(sc) + 1) // 2
                bar.total += 1 + n_sets * len(VALIDATE_GAMMAS)
                bar.set_postfix_str("validate")
                bar.refresh()
                validation = validate_k(gene, dmodel, dtok, rank(sc), dev_h, dev_b, gammas=VALIDATE_GAMMAS,
                                        z=validate_z, refusal=refusal, device=device, on_pass=tick,
                                        search=validate_search)
                validation["flat"] = False
                selected = validation["selected"]
            rule_doc: dict = {"rule": "validate", "z": validate_z, "noise_z": noise_z, "search": validate_search,
                              "n_dev_harmful": len(dev_h), "n_dev_benign": len(dev_b), "validation": validation}
        else:
            selected = choose(all_scores[score], top_k, threshold)
            rule_doc = ({"top_k": top_k} if top_k is not None
                        else {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold})
        del dmodel, dtok
        _release()
    other = {n: choose(s, None if top_k is None else min(top_k, len(s)), threshold)
             for n, s in all_scores.items() if n != score and max(s.values()) > 0}
    plot_path = plot_scores(all_scores, selected, score, plot) if plot else None
    extra = {
        "all_scores": all_scores,
        "score_noise": {n: {k: _r(v) for k, v in d.items()} for n, d in noise.items()},
        "rule": rule_doc,
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


