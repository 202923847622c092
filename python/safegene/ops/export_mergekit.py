"""``export-mergekit``: the equivalent mergekit ``task_arithmetic`` configuration of an ``apply``.

``apply`` writes θ_out = θ_target + Σ λ_t τ_t with τ = θ_aligned − θ_degraded. mergekit's
task arithmetic computes θ_base + Σ_i w_i (θ_i − θ_base) per tensor; with the degraded model
as the base, the target at weight 1 and the aligned model at weight λ_t,

    θ_degraded + (θ_target − θ_degraded) + λ_t (θ_aligned − θ_degraded) = θ_target + λ_t τ_t,

which is ``apply``'s formula. λ_t is written as mergekit ``weight`` filters (a filter is a
substring of the tensor name; the first match wins): one filter per coefficient key when its
tensors share a name prefix that no other tensor contains (``model.layers.3.``), else one per
tensor name, and a final unfiltered ``value: 0`` for every tensor the coefficients leave out.

mergekit recomputes τ from the two checkpoints in float32 (``dtype: float32``), so its output
matches ``apply``'s within one rounding of the output dtype (and the gene's storage rounding,
for a BF16/F16 gene). A low-rank gene (τ stored as factors) has no such pair of checkpoints and
is refused.

>>> export_mergekit("COEFFS.json", "merge.yml", gene="gene/", target="org/task-model")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from ..coeffs import CoeffsLike, load_coeffs, resolve_coeffs
from ..errors import OutputError, UsageError
from ..gene import Gene, load_gene
from ..io.atomic import write_text_atomic
from ..io.checkpoint import open_checkpoint
from ..io.hub import hub_ref_of_path, parse_hub_id

#: safetensors dtype -> mergekit's dtype names
MERGEKIT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
log = logging.getLogger(__name__)


def _model_ref(gene: Gene, role: str, given: "str | os.PathLike[str] | None") -> str:
    """How the config names the aligned / degraded model: as given, else its Hub id@commit, else its local path."""
    if given is not None:
        return os.fspath(given)
    src = (gene.manifest.get("sources") or {}).get(role) or {}
    hub = src.get("hub")
    if isinstance(hub, Mapping) and hub.get("repo_id"):
        return f"{hub['repo_id']}@{hub['revision']}" if hub.get("revision") else str(hub["repo_id"])
    path = src.get("path")
    ref = hub_ref_of_path(path) if isinstance(path, str) else None
    if ref:
        return f"{ref[0]}@{ref[1]}"
    if isinstance(path, str) and Path(path).exists():
        return path
    name = src.get("name") or (Path(path).name if isinstance(path, str) else "?")
    raise UsageError(f"gene {gene.path}: the {role} model ({name!r}) is neither on this disk nor a Hub id; pass --{role} PATH_OR_HUB_ID")


def _target_ref(coeffs: CoeffsLike, given: "str | os.PathLike[str] | None") -> str:
    if given is not None:
        return os.fspath(given)
    meta = getattr(coeffs, "meta", None)
    if meta is None and isinstance(coeffs, (str, os.PathLike)):
        from ..coeffs import Coeffs

        meta = Coeffs.from_pretrained(coeffs).meta
    t = (meta or {}).get("target")
    if isinstance(t, str) and (Path(t).exists() or parse_hub_id(t) is not None):
        return t
    raise UsageError("give the task model the coefficients were calibrated for (--target PATH_OR_HUB_ID)")


def weight_filters(gene: Gene, lam: Mapping[str, float]) -> list[dict[str, Any]]:
    """mergekit ``weight`` entries giving every gene tensor its λ (per-tensor ``lam``), zero elsewhere.

    >>> weight_filters(Gene.load("gene/"), {"model.layers.1.mlp.up_proj.weight": 0.5, ...})  # doctest: +SKIP
    [{'filter': 'model.layers.1.', 'value': 0.5}, {'value': 0.0}]
    """
    all_names = list(gene.fingerprint.get("tensors") or gene.tensor_names)
    by_key: dict[str, list[str]] = {}
    for n in gene.tensor_names:
        by_key.setdefault(gene.layer_key(n), []).append(n)
    entries: list[dict[str, Any]] = []
    for key, names in by_key.items():
        vals = {float(lam.get(n, 0.0)) for n in names}
        if vals == {0.0}:
            continue
        prefix = os.path.commonprefix(names)
        prefix = prefix[: prefix.rfind(".") + 1]
        owned = {n for n in all_names if prefix and prefix in n}
        if len(vals) == 1 and prefix and owned == set(names):
            entries.append({"filter": prefix, "value": vals.pop()})
        else:
            entries += [{"filter": n, "value": float(lam.get(n, 0.0))} for n in names if lam.get(n, 0.0) != 0.0]
    # the first matching filter wins: a longer (more specific) one must come first
    entries.sort(key=lambda e: -len(e["filter"]))
    return entries + [{"value": 0.0}]


def mergekit_config(
    gene: "str | os.PathLike[str] | Gene",
    coeffs: CoeffsLike | None = None,
    target: "str | os.PathLike[str] | None" = None,
    *,
    scale: float | None = None,
    aligned: "str | os.PathLike[str] | None" = None,
    degraded: "str | os.PathLike[str] | None" = None,
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """The mergekit configuration (a dict, as in the YAML) that reproduces
    ``apply(gene, target, coeffs=coeffs)`` (or ``scale=``).

    ``aligned`` / ``degraded`` default to the gene's recorded sources (Hub id@commit, or the local
    path while it exists); ``target`` to the task model named in COEFFS.json; ``out_dtype`` to the
    target's dtype when it is on this disk, else the gene's sources' dtype.

    >>> cfg = mergekit_config("gene/", {"layer.3": 1.0}, "task/")  # doctest: +SKIP
    >>> cfg["merge_method"], cfg["base_model"]  # doctest: +SKIP
    ('task_arithmetic', '/models/degraded')
    """
    g = load_gene(gene)
    if g.manifest.get("factored"):
        raise UsageError(f"gene {g.path} stores τ as low-rank factors, not as aligned − degraded; "
                         "mergekit's task arithmetic needs those two checkpoints, so export a dense gene")
    if coeffs is None and scale is None:
        raise UsageError("give coefficients (COEFFS.json) or a uniform scale")
    lam = resolve_coeffs(g, scale, load_coeffs(coeffs) if coeffs is not None else None)
    tgt = _target_ref(coeffs, target) if coeffs is not None else (os.fspath(target) if target is not None else None)
    if tgt is None:
        raise UsageError("give the task model to patch (--target PATH_OR_HUB_ID)")
    if out_dtype is None:
        local = Path(tgt)
        dtypes: list[str] = []
        if "+" not in tgt and local.exists():
            ck = open_checkpoint(local)
            dtypes = [t.dtype for t in ck.tensors.values() if t.is_float]
        if not dtypes:
            dtypes = [str(v.get("dtype")) for v in (g.fingerprint.get("tensors") or {}).values()]
        out_dtype = next((MERGEKIT_DTYPES[d] for d in dtypes if d in MERGEKIT_DTYPES), "float32")
    if out_dtype not in MERGEKIT_DTYPES.values():
        raise UsageError(f"out_dtype {out_dtype!r} is not one of {sorted(MERGEKIT_DTYPES.values())}")
    return {
        "merge_method": "task_arithmetic",
        "base_model": _model_ref(g, "degraded", degraded),
        "models": [
            {"model": tgt, "parameters": {"weight": 1.0}},
            {"model": _model_ref(g, "aligned", aligned), "parameters": {"weight": weight_filters(g, lam)}},
        ],
        "parameters": {"normalize": False, "lambda": 1.0},
        "dtype": "float32",
        "out_dtype": out_dtype,
    }


def export_mergekit(
    coeffs: CoeffsLike,
    out: "str | os.PathLike[str]",
    *,
    gene: "str | os.PathLike[str] | Gene",
    target: "str | os.PathLike[str] | None" = None,
    aligned: "str | os.PathLike[str] | None" = None,
    degraded: "str | os.PathLike[str] | None" = None,
    out_dtype: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write :func:`mergekit_config` as YAML to ``out`` (atomically); return the config.

    Run it with ``mergekit-yaml merge.yml OUT_DIR``.

    >>> export_mergekit("COEFFS.json", "merge.yml", gene="gene/", target="task/")  # doctest: +SKIP
    """
    import yaml

    path = Path(out)
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists; choose a new path or pass --overwrite")
    cfg = mergekit_config(gene, coeffs, target, aligned=aligned, degraded=degraded, out_dtype=out_dtype)
    g = load_gene(gene)
    head = (f"# mergekit config written by safegene export-mergekit for gene {g.path.name}:\n"
            "# target + sum_t lambda_t * (aligned - degraded), i.e. `safegene apply` with the same coefficients.\n"
            f"# Run: mergekit-yaml {path.name} OUT_DIR\n")
    write_text_atomic(path, head + yaml.safe_dump(cfg, sort_keys=False))
    log.info("wrote %s: base %s, %d weight filters", path, cfg["base_model"], len(cfg["models"][1]["parameters"]["weight"]) - 1)
    return cfg


__all__ = ["MERGEKIT_DTYPES", "export_mergekit", "mergekit_config", "weight_filters"]
