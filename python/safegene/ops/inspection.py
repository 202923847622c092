"""``safegene inspect``: what a gene holds, per layer, as a table, JSON or a picture.

Reads only ``gene.json`` (never the vectors): per layer key ‖τ‖, relative change
‖τ‖/‖θ_aligned‖ and tensor count (``layer_stats``, written by ``extract``), and, once
``safegene select`` has run, the selection scores and the chosen layers (``selection``). For a
low-rank gene (format version 2) it also shows the rank of each factored tensor (per layer: the
largest) and how many tensors are factored or dense.

>>> info = inspect_gene("gene/", plot="gene.png")  # doctest: +SKIP
>>> info["selected"]  # doctest: +SKIP
['layer.2', 'layer.3']

Also :func:`plot_safety_utility`, the safety–utility plane (ASR vs task accuracy) for a list of
result dicts; it draws with :func:`safegene.demo.plot_plane`, the demo's own figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Union

from ..errors import GeneError, UsageError
from ..gene import Gene, key_sort, load_gene


def inspect_gene(gene: "str | os.PathLike[str] | Gene", plot: Union[str, os.PathLike, None] = None) -> dict[str, Any]:
    """Per-layer summary of a gene; with ``plot``, also a PNG (three stacked panels).

    Returns ``{"gene", "model_type", "num_layers", "storage_dtype", "rounding_rel_error",
    "tau_norm" (overall), "layers": [{"key", "rank" (largest factored rank, or None), "tau_norm",
    "aligned_norm", "rel_change", "n_tensors", "score", "selected"}], "selection": {"method",
    "selected", "rule"} | None, "selected": [...] | None, "format_version", "factored": {tensor:
    rank}, "n_dense", "n_untouched" (tensors a LoRA degrade left alone: τ = 0), "plot": path | None}``.

    >>> inspect_gene("gene/")["layers"][0]["key"]  # doctest: +SKIP
    'embed'
    """
    g = load_gene(gene)
    stats = g.manifest.get("layer_stats")
    if not isinstance(stats, dict) or not stats:
        raise GeneError(f"{g.path / 'gene.json'}: no layer_stats; re-extract the gene with this safegene")
    sel = g.selection if isinstance(g.selection, dict) else None
    scores = (sel or {}).get("scores") or {}
    chosen = set((sel or {}).get("selected") or [])
    fac = g.factored
    ranks: dict[str, int] = {}
    for n, spec in fac.items():
        k = g.layer_key(n)
        ranks[k] = max(ranks.get(k, 0), int(spec["rank"]))
    rows = []
    for k in sorted(stats, key=key_sort):
        v = stats[k]
        rows.append({
            "rank": ranks.get(k),
            "key": k,
            "tau_norm": float(v.get("tau_norm", 0.0)),
            "aligned_norm": float(v.get("aligned_norm", 0.0)),
            "rel_change": float(v.get("rel_change", 0.0)),
            "n_tensors": int(v.get("n_tensors", 0)),
            "score": float(scores[k]) if k in scores and scores[k] is not None else None,
            "selected": k in chosen,
        })
    total = math.sqrt(sum(r["tau_norm"] ** 2 for r in rows))
    info: dict[str, Any] = {
        "gene": str(g.path),
        "model_type": g.fingerprint.get("model_type"),
        "num_layers": g.num_layers,
        "storage_dtype": g.storage_dtype,
        "rounding_rel_error": float((g.manifest.get("rounding") or {}).get("rel_error", 0.0)),
        "tau_norm": total,
        "layers": rows,
        "selection": None if sel is None else {
            "method": sel.get("method"), "selected": sorted(chosen, key=key_sort), "rule": sel.get("rule"),
        },
        "selected": None if sel is None else sorted(chosen, key=key_sort),
        "keys": g.manifest.get("keys"),
        "files": [f.name for f in g.vector_files],
        "factor_files": [f.name for f in g.factor_files],
        "degradation": _degradation_summary(g.degradation),
        "format_version": int(g.manifest.get("format_version", 1)),
        "factored": {n: int(spec["rank"]) for n, spec in fac.items()},
        "n_dense": len(g.dense_names),
        "n_untouched": len((g.manifest.get("lowrank") or {}).get("untouched") or []),
        "plot": None,
    }
    if plot is not None:
        info["plot"] = str(_plot_gene(info, (sel or {}).get("all_scores"), Path(plot)))
    return info


def _degradation_summary(prov: Any) -> dict[str, Any] | None:
    """The fields of the degraded model's ``safegene_degrade.json`` that inspect shows."""
    if not isinstance(prov, dict):
        return None
    lora = prov.get("lora") or {}
    return {
        "recipe": prov.get("recipe"), "data_sha256": prov.get("data_sha256"), "n_train": prov.get("n_train"),
        "steps": prov.get("steps"), "lr": prov.get("lr"), "lora_rank": prov.get("lora_rank", lora.get("rank")),
        "refusal_rate": prov.get("refusal_rate"), "judge": (prov.get("refusal") or {}).get("judge"),
        "created_by": prov.get("created_by"),
    }


def format_degradation(d: dict[str, Any] | None) -> str:
    """One line on how the degraded model was made (``safegene degrade``), or that it is unknown."""
    if not d:
        return "degradation: unknown (the degraded model was not made by `safegene degrade`)"
    rank = d.get("lora_rank")
    how = f"LoRA rank {rank}" if rank else "full fine-tune"
    rr = d.get("refusal_rate")
    rrs = "refusal rate not measured" if rr is None else f"refusal rate {100 * float(rr):.1f} % ({d.get('judge')})"
    sha = (d.get("data_sha256") or "?")[:12]
    return (f"degradation: recipe {d.get('recipe')}, {d.get('n_train')} examples (sha256 {sha}…), {d.get('steps')} steps, "
            f"lr {d.get('lr')}, {how}; {rrs}")


def format_gene_table(info: dict[str, Any]) -> str:
    """The text table ``safegene inspect`` prints (``*`` marks selected layers)."""
    lines = [
        f"gene {info['gene']}: {info['model_type'] or '?'} · {info['num_layers']} decoder blocks · "
        f"{info['storage_dtype']} (rounding {info['rounding_rel_error']:.1e}) · ‖τ‖ = {info['tau_norm']:.4g}",
    ]
    sel = info["selection"]
    lines.append(f"selection: {sel['method']} → {', '.join(sel['selected']) or 'none'}" if sel
                 else "selection: none yet (run `safegene select`)")
    if "degradation" in info:
        lines.append(format_degradation(info["degradation"]))
    if info.get("keys"):
        lines.append(f"kept keys: {', '.join(info['keys'])}")
    if len(info.get("files") or []) > 1:
        lines.append(f"vectors: {len(info['files'])} shards ({info['files'][0]} …)")
    if len(info.get("factor_files") or []) > 1:
        lines.append(f"factors: {len(info['factor_files'])} shards ({info['factor_files'][0]} …)")
    fac = info.get("factored") or {}
    if fac:
        rs = sorted(set(fac.values()))
        rank_txt = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {rs[0]}–{rs[-1]}"
        lines.append(f"low-rank gene (format v{info.get('format_version', 2)}): {len(fac)} factored tensors ({rank_txt}), "
                     f"{info.get('n_dense', 0)} dense" + (f"; {info['n_untouched']} untouched tensors have τ = 0"
                                                         if info.get("n_untouched") else ""))
    rank_h = f" {'rank':>5}" if fac else ""
    lines.append(f"{'layer':<12}{rank_h} {'‖τ‖':>10} {'share':>7} {'rel.change':>11} {'tensors':>8} {'score':>9}  sel")
    for r in info["layers"]:
        share = (r["tau_norm"] / info["tau_norm"]) ** 2 if info["tau_norm"] > 0 else 0.0
        score = f"{r['score']:.4g}" if r["score"] is not None else "-"
        rank_c = (f" {r['rank']:>5d}" if r.get("rank") else f" {'-':>5}") if fac else ""
        lines.append(f"{r['key']:<12}{rank_c} {r['tau_norm']:>10.4g} {100 * share:>6.1f}% {r['rel_change']:>11.3e} "
                     f"{r['n_tensors']:>8d} {score:>9}  {'*' if r['selected'] else ''}")
    return "\n".join(lines)


def _plot_gene(info: dict[str, Any], all_scores: dict | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if path.suffix.lower() != ".png":
        raise UsageError(f"plot path {path} must end in .png")
    if not path.parent.is_dir():
        raise UsageError(f"plot path {path}: directory {path.parent} does not exist")
    rows = info["layers"]
    keys = [r["key"] for r in rows]
    labels = [k.replace("layer.", "") for k in keys]
    x = list(range(len(keys)))
    sel_idx = [i for i, r in enumerate(rows) if r["selected"]]
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.42 * len(keys) + 2.5), 7.2), sharex=True)
    colours = ["tab:orange" if r["selected"] else "tab:blue" for r in rows]
    ax = axes[0]
    ax.bar(x, [r["tau_norm"] for r in rows], color=colours)
    ax.set_ylabel("‖τ‖ (Frobenius)")
    ax.set_title(f"gene {Path(info['gene']).name}: {info['model_type'] or ''}, {info['num_layers']} blocks"
                 + (f" — selected ({info['selection']['method']}) in orange" if info["selection"] else ""))
    ax = axes[1]
    ax.bar(x, [r["rel_change"] for r in rows], color=colours)
    ax.set_ylabel("‖τ‖ / ‖θ_aligned‖")
    ax = axes[2]
    if all_scores and isinstance(all_scores, dict):
        names = list(all_scores)
        w = 0.8 / max(1, len(names))
        for j, n in enumerate(names):
            vals = [float(all_scores[n].get(k, 0.0) or 0.0) for k in keys]
            m = max((abs(v) for v in vals), default=0.0) or 1.0
            used = info["selection"] and n == info["selection"]["method"]
            ax.bar([i + (j - (len(names) - 1) / 2) * w for i in x], [v / m for v in vals], w, alpha=0.9 if used else 0.5,
                   label=f"{n}{' (used)' if used else ''}")
        ax.set_ylabel("selection score / max")
        ax.legend(fontsize=8, loc="best")
    elif any(r["score"] is not None for r in rows):
        ax.bar(x, [r["score"] or 0.0 for r in rows], color=colours)
        ax.set_ylabel(f"score ({info['selection']['method']})")
    else:
        ax.text(0.5, 0.5, "no selection yet — run `safegene select`", ha="center", va="center", transform=ax.transAxes,
                color="gray")
        ax.set_ylabel("selection score")
    ax.axhline(0, color="k", lw=0.6)
    for a in axes:
        for i in sel_idx:
            a.axvspan(i - 0.45, i + 0.45, color="gold", alpha=0.25, lw=0)
        a.grid(axis="y", alpha=0.3)
    axes[2].set_xticks(x, labels, rotation=0 if len(keys) <= 24 else 90)
    axes[2].set_xlabel("layer key (numbers: decoder blocks; shaded: selected)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Keys a result dict for :func:`plot_safety_utility` may hold (method, asr, accuracy required).
__all__ = ["format_degradation", "format_gene_table", "inspect_gene"]
