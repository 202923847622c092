"""LoRA in and out: the gene as a standard PEFT LoRA adapter, and PEFT adapters as task updates.

**Out** — :func:`export_lora` turns λ·τ into a PEFT LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained``
loads. For every 2-D linear weight ``<module>.weight`` with λ ≠ 0, ΔW = λ·τ is replaced by its
truncated SVD ``U_r Σ_r V_rᵀ`` split evenly (``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ``); the rank is a
fixed ``rank`` R (capped at min(out, in)) or the smallest rank keeping an ``energy`` fraction E of
Σσ². ``lora_alpha`` equals each module's rank, so PEFT's scale is exactly 1. The relative
reconstruction error ‖ΔW − BA‖/‖ΔW‖ of each module is reported and stored in the sidecar
``safegene_lora.json``. Conv1D models (GPT-2) get ``fan_in_fan_out: true``. Tensors that LoRA cannot carry (norm weights, biases, embeddings, an
lm_head tied to the embedding) are *dropped* and listed there with their share of ‖λτ‖.

A **factored** τ = B·A of a low-rank gene (format version 2) is exported exactly, with no SVD:
at its own rank r, ``lora_A = A`` and ``lora_B = λ·B`` (λ folds into B, the output side, in
float64, rounded once into the adapter dtype; for Conv1D ``lora_A = Bᵀ``, ``lora_B = λ·Aᵀ``).
``rank``/``energy`` then apply to the dense tensors only and are not needed for a gene with
none; the sidecar marks such modules ``"exact": true`` (their ``rel_error`` is the storage
rounding, 0 up to float32 for F32).

**In** — :func:`lora_target_delta` parses and validates a PEFT LoRA adapter against a base
checkpoint and returns the per-tensor factors ``(A, B, scale)`` with ΔW = scale · B @ A
(``target_modules``, per-module ``rank_pattern``/``alpha_pattern``, rsLoRA and
``fan_in_fan_out`` honoured; DoRA, trained biases and ``modules_to_save`` refused).
:func:`merge_lora_into_model` adds those deltas to a loaded model in place.

>>> info = export_lora("gene/", "safety-lora/", coeffs="COEFFS.json", rank=16)  # doctest: +SKIP
>>> info["modules"]["model.layers.3.mlp.down_proj"]["rel_error"]  # doctest: +SKIP
0.031
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..coeffs import CoeffsLike, resolve_coeffs
from ..errors import UsageError
from ..gene import Gene, factors_sq_norm, load_gene
from ..io.atomic import atomic_output_dir, write_json_atomic
from ..io.cards import gene_ref, write_lora_card
from ..io.checkpoint import check_output_location
from ..io.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONV1D_MODEL_TYPES, PEFT_PREFIX
from ..io.provenance import portable_ref, recorded_base, scrub_paths

if TYPE_CHECKING:  # pragma: no cover
    import torch

SIDECAR = "safegene_lora.json"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# gene -> LoRA
# ---------------------------------------------------------------------------------------------
def _lambdas(g: Gene, coeffs: CoeffsLike | None, scale: float | None) -> dict[str, float]:
    """Per-tensor λ. With neither ``coeffs`` nor ``scale``: λ = 1 on the gene's selected layers
    (gene.json ``selection``), or on every tensor when the gene has no selection."""
    if coeffs is None and scale is None:
        sel = g.selected_layers()
        if sel:
            return resolve_coeffs(g, None, {k: 1.0 for k in sel})
        scale = 1.0
    return resolve_coeffs(g, scale, coeffs)


def _drop_reason(g: Gene, name: str, shape: list[int], tied: bool) -> str | None:
    """Why a tensor cannot be a LoRA module (None when it can)."""
    if not name.endswith(".weight"):
        return "not a weight (bias or buffer)"
    if len(shape) != 2:
        return f"{len(shape)}-D tensor (norm or other non-linear parameter)"
    key = g.layer_key(name)
    low = name.lower()
    if key == "embed" or "embed" in low.rsplit(".", 2)[-2]:
        return "embedding (LoRA here covers linear layers only)"
    if key == "lm_head" and tied:
        return "lm_head tied to the input embedding (a LoRA on the head would untie them)"
    return None


def _choose_rank(s: "torch.Tensor", rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    e = (s.double() ** 2).cumsum(0)
    total = float(e[-1])
    if total == 0.0:
        return 1
    if energy is None:
        raise UsageError("give a rank (--rank R) or an energy fraction (--energy E)")
    r = int((e < energy * total * (1 - 1e-12)).sum().item()) + 1
    return max(1, min(r, s.numel()))


def export_lora(
    gene: "str | os.PathLike[str] | Gene",
    out_dir: "str | os.PathLike[str]",
    coeffs: CoeffsLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    base_model_name_or_path: str | None = None,
    *,
    scale: float | None = None,
    dtype: str = "F32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write λ·τ as a PEFT LoRA adapter directory; return the export summary.

    Exactly one of ``rank`` (fixed rank R per module, capped at min(out, in)) and ``energy``
    (0 < E ≤ 1: the smallest rank keeping fraction E of the squared singular values) is
    required. ``coeffs`` is a mapping, a COEFFS.json path or a ``Coeffs`` object (missing keys
    mean λ = 0); ``scale`` gives every tensor the same λ; with neither, λ = 1 on the gene's
    selected layers (or all tensors when there is no selection). ``dtype`` is the storage dtype
    of A and B (``F32``, ``BF16`` or ``F16``). ``base_model_name_or_path`` is recorded in the
    adapter config for ``AutoPeftModelForCausalLM``; by default it is the gene's recorded aligned
    model when that came from the Hub (its id, with the commit as PEFT's ``revision``), else it
    stays unset with a warning (a local path would not travel; pass the base's Hub id).
    ``PeftModel.from_pretrained(task_model, DIR)`` needs none.

    The summary (also written to ``out_dir/safegene_lora.json``, where the gene, the aligned
    model and the adapter are named portably: Hub id@commit or base name, never a local path) holds per module its rank,
    ‖λτ‖ and relative reconstruction error, the overall error
    ``sqrt(Σ residual²) / ‖λτ over exported modules‖``, and the dropped tensors with their
    share ``‖λτ_dropped‖ / ‖λτ_all‖``.

    >>> info = export_lora("gene/", "lora/", coeffs={"layer.2": 1.0}, rank=8)  # doctest: +SKIP
    >>> round(info["rel_error"], 3), info["dropped_share"]  # doctest: +SKIP
    (0.412, 0.004)
    """
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    if rank is not None and energy is not None:
        raise UsageError("give exactly one of a rank (--rank R) or an energy fraction (--energy E)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"rank must be a positive integer, not {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise UsageError(f"energy must be a fraction in (0, 1], not {energy!r}")
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(str(dtype).upper())
    if torch_dtype is None:
        raise UsageError(f"adapter dtype {dtype!r} is not one of F32, BF16, F16")
    g = load_gene(gene)
    out = Path(out_dir)
    check_output_location(out, [g.path])
    # Conv1D models store weights as (in, out): PEFT's fan_in_fan_out = True, which is one flag
    # for the whole adapter, so a Linear head in such a model cannot be carried alongside.
    conv1d = g.fingerprint.get("model_type") in CONV1D_MODEL_TYPES
    lam = _lambdas(g, coeffs, scale)
    base_revision: str | None = None
    if base_model_name_or_path is None:
        rec = recorded_base(g.manifest)
        if rec is not None:
            base_model_name_or_path, base_revision = rec
        else:
            log.warning("export-lora: the gene's aligned model has no Hub id, so base_model_name_or_path stays unset "
                        "(AutoPeftModelForCausalLM needs it); pass --base-model ORG/NAME")
    cfg = ((g.manifest.get("sources") or {}).get("aligned") or {}).get("config") or {}
    tied = bool(cfg.get("tie_word_embeddings", False))
    shapes = {n: list(v["shape"]) for n, v in g.fingerprint["tensors"].items()}

    todo = [n for n in g.tensor_names if lam.get(n, 0.0) != 0.0]
    if not todo:
        raise UsageError(f"every coefficient is zero for gene {g.path}; nothing to export")
    if rank is None and energy is None and any(
        not g.is_factored(n) and _drop_reason(g, n, shapes.get(n) or [], tied) is None for n in todo
    ):
        raise UsageError("give exactly one of a rank (--rank R) or an energy fraction (--energy E) for the dense tensors "
                         "(only a low-rank gene's factored tensors export exactly without one)")
    modules: dict[str, dict[str, Any]] = {}
    dropped: dict[str, dict[str, Any]] = {}
    tensors: dict[str, "torch.Tensor"] = {}
    sq_total = sq_kept = sq_resid = sq_dropped = 0.0
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="export-lora", unit="tensor", file=sys.stderr, leave=False)
    try:
        for n, tau, fac in _walk(g, todo):  # each file opened once
            c = lam[n]
            shape = shapes.get(n) or []
            reason = _drop_reason(g, n, shape, tied)
            if reason is None and conv1d and g.layer_key(n) == "lm_head":
                reason = "Linear lm_head in a Conv1D model (PEFT's fan_in_fan_out is one flag for all modules)"
            if fac is not None:
                norm = abs(c) * math.sqrt(factors_sq_norm(*fac))
            else:
                assert tau is not None
                norm = abs(c) * float(tau.double().norm())
            sq_total += norm**2
            if reason is not None:
                dropped[n] = {"reason": reason, "layer": g.layer_key(n), "lambda": c, "norm": norm}
                sq_dropped += norm**2
            elif fac is not None:
                mod = n[: -len(".weight")]
                a, b, resid = _exact_factors(fac, c, conv1d, torch_dtype)
                sq_kept += norm**2
                sq_resid += resid**2
                tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b
                r = int(a.shape[0])
                modules[mod] = {
                    "tensor": n, "layer": g.layer_key(n), "lambda": c, "shape": shape, "rank": r, "full_rank": r,
                    "norm": norm, "energy": 1.0, "rel_error": resid / norm if norm > 0 else 0.0, "exact": True,
                }
            else:
                assert tau is not None  # dense
                mod = n[: -len(".weight")]
                delta = tau.mul_(c)
                if conv1d:
                    delta = delta.T  # LoRA factors the (out, in) update; PEFT transposes it back
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                r = _choose_rank(s, rank, energy)
                rs = s[:r].sqrt()
                b = (u[:, :r] * rs).to(torch_dtype).contiguous()
                a = (rs[:, None] * vh[:r]).to(torch_dtype).contiguous()
                # the error of what is stored (includes the storage rounding), not just the σ tail
                resid = float((delta.double() - b.double() @ a.double()).norm())
                sq_kept += norm**2
                sq_resid += resid**2
                tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b
                energy_kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum()) if float(s[0]) > 0 else 1.0
                modules[mod] = {
                    "tensor": n, "layer": g.layer_key(n), "lambda": c, "shape": shape, "rank": r,
                    "full_rank": int(s.numel()), "norm": norm, "energy": energy_kept,
                    "rel_error": resid / norm if norm > 0 else 0.0,
                }
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not modules:
        raise UsageError(
            f"none of the {len(todo)} tensors with λ ≠ 0 is a linear weight (all were dropped: "
            f"{sorted({d['reason'] for d in dropped.values()})}); nothing to export as LoRA"
        )
    ranks = {m: v["rank"] for m, v in modules.items()}
    r_max = max(ranks.values())
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r_max}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": base_revision,
        "inference_mode": True,
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    summary: dict[str, Any] = {
        "format": "safegene-lora",
        "gene": str(g.path.resolve()),
        "family_aligned": ((g.manifest.get("sources") or {}).get("aligned") or {}).get("path"),
        "adapter": str(out),
        "base_model": base_model_name_or_path,
        "base_revision": base_revision,
        "mode": {"rank": rank} if rank is not None else ({"energy": float(energy)} if energy is not None else {"exact": True}),
        "dtype": str(dtype).upper(),
        "n_modules": len(modules),
        "rank_max": r_max,
        "params": int(sum(t.numel() for t in tensors.values())),
        "rel_error": math.sqrt(sq_resid / sq_kept) if sq_kept > 0 else 0.0,
        "max_module_rel_error": max(v["rel_error"] for v in modules.values()),
        "dropped_share": math.sqrt(sq_dropped / sq_total) if sq_total > 0 else 0.0,
        "modules": modules,
        "dropped": dropped,
        "seconds": 0.0,
    }
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(tmp / SIDECAR, _portable_summary(g, summary, out))
    write_lora_card(out, g, summary, base_model_name_or_path)
    return summary


def _portable_summary(g: Gene, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """The sidecar as written: the returned summary with no local path (it travels with the adapter)."""
    aligned = (g.manifest.get("sources") or {}).get("aligned")
    return scrub_paths(dict(summary, gene=gene_ref(g), family_aligned=portable_ref(aligned), adapter=out.name))


def _walk(g: Gene, names: list[str]) -> "Iterator[tuple[str, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]]":
    """``(name, dense τ, None)`` or ``(name, None, (A, B))`` for ``names`` in order; factored
    tensors stay factored (never densified)."""
    import torch

    dense = g.iter_vectors([n for n in names if not g.is_factored(n)], dtype=torch.float32)
    fac = g.iter_factors([n for n in names if g.is_factored(n)], dtype=torch.float32)
    for n in names:
        if g.is_factored(n):
            _, a, b = next(fac)
            yield n, None, (a, b)
        else:
            _, tau = next(dense)
            yield n, tau, None


def _exact_factors(fac: tuple["torch.Tensor", "torch.Tensor"], lam: float, conv1d: bool,
                   dtype: "torch.dtype") -> tuple["torch.Tensor", "torch.Tensor", float]:
    """PEFT ``(lora_A, lora_B)`` for λ·B·A with λ folded into lora_B (float64, one rounding into
    ``dtype``), and ‖λ·B·A − stored‖ from r × r products."""
    import torch

    a64, b64 = fac[0].to(torch.float64), fac[1].to(torch.float64)
    if conv1d:  # stored weight (in, out) = B·A; PEFT computes (lora_B @ lora_A)ᵀ
        a64, b64 = b64.T, a64.T
    b64 = lam * b64
    la, lb = a64.to(dtype).contiguous(), b64.to(dtype).contiguous()
    resid_sq = factors_sq_norm(torch.cat([la.to(torch.float64), a64]), torch.cat([lb.to(torch.float64), -b64], 1))
    return la, lb, math.sqrt(max(0.0, resid_sq))


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapter -> per-tensor deltas
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
__all__ = ["SIDECAR", "export_lora"]
