"""Plots of results: the safety-utility plane and the per-key selection scores.

>>> plot_safety_utility([{"method": "none", "asr": 0.8, "accuracy": 0.9}], "plane.png")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence, Union

from ..errors import UsageError
from ..gene import key_sort

RESULT_KEYS = {"method", "asr", "accuracy", "task", "over_refusal", "lam", "seconds"}


class PlanePoint(Protocol):
    """What the safety-utility plane needs of a result row."""

    method: str
    task: str
    asr: float
    accuracy: float


@dataclass
class Point:
    """One result on the plane (fractions in [0, 1])."""

    method: str
    task: str
    asr: float
    accuracy: float
    over_refusal: float = 0.0
    lam: str = ""
    seconds: float = 0.0


def plot_plane(rows: Sequence[PlanePoint], path: Union[str, Path], methods: Iterable[str] = (),
               asr_target: float | None = None) -> Path:
    """Safety–utility plane: x = ASR, y = task accuracy; colour = task model, marker = method.

    ``methods`` fixes the marker order (methods not listed follow in order of appearance);
    ``asr_target`` draws a dotted line at that ASR.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    order = list(dict.fromkeys(list(methods) + [r.method for r in rows if not r.method.startswith("SafeGene[")]))
    markers = dict(zip(order, ("o", "s", "^", "v", "D", "*", "h", "<", ">", "p")))
    markers.update({r.method: "P" for r in rows if r.method.startswith("SafeGene[")})
    tasks = sorted({r.task for r in rows})
    colours = dict(zip(tasks, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for r in rows:
        ax.scatter(100 * r.asr, 100 * r.accuracy, marker=markers.get(r.method, "x"), color=colours[r.task],
                   s=150 if r.method == "SafeGene" else 60, edgecolor="k", linewidth=0.6, alpha=0.9, zorder=3)
    for m in markers:
        if any(r.method == m for r in rows):
            ax.scatter([], [], marker=markers[m], color="lightgray", edgecolor="k", label=m)
    for t in tasks:
        ax.scatter([], [], marker="o", color=colours[t], label=f"task: {t}")
    if asr_target is not None:
        ax.axvline(100 * asr_target, color="gray", ls=":", lw=1)
    ax.set_xlabel("attack success rate, % (lower is safer)")
    ax.set_ylabel("task accuracy, %")
    ax.set_xlim(-3, 103)
    ax.set_title("safety–utility plane (held-out split; best: top left)")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_safety_utility(results: Sequence[dict[str, Any]], out_png: Union[str, os.PathLike]) -> Path:
    """Safety–utility plane across methods: x = ASR, y = task accuracy (fractions in [0, 1]).

    Each result is ``{"method": str, "asr": float, "accuracy": float}`` with optional ``task``
    (colour; default "model"), ``over_refusal``, ``lam``, ``seconds``. Drawn by
    :func:`plot_plane`, as the demo's figure is.

    >>> plot_safety_utility([{"method": "none", "asr": 0.8, "accuracy": 0.9},
    ...                      {"method": "SafeGene", "asr": 0.05, "accuracy": 0.88}], "plane.png")  # doctest: +SKIP
    """
    if not results:
        raise UsageError("plot_safety_utility: no results to plot")
    rows = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise UsageError(f"result {i} is a {type(r).__name__}, expected a dict with method, asr, accuracy")
        unknown = sorted(set(r) - RESULT_KEYS)
        if unknown:
            raise UsageError(f"result {i}: unknown keys {unknown}; allowed: {sorted(RESULT_KEYS)}")
        for k in ("method", "asr", "accuracy"):
            if k not in r:
                raise UsageError(f"result {i}: missing {k!r}")
        for k in ("asr", "accuracy", "over_refusal"):
            v = r.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise UsageError(f"result {i}: {k} = {v!r} must be a fraction in [0, 1]")
        rows.append(Point(method=str(r["method"]), task=str(r.get("task", "model")), asr=float(r["asr"]),
                        accuracy=float(r["accuracy"]), over_refusal=float(r.get("over_refusal", 0.0)),
                        lam=str(r.get("lam", "")), seconds=float(r.get("seconds", 0.0))))
    out = Path(out_png)
    if not out.parent.is_dir():
        raise UsageError(f"plot path {out}: directory {out.parent} does not exist")
    return plot_plane(rows, out)


def plot_scores(all_scores: dict[str, dict[str, float]], selected: list[str], method: str,
                path: Union[str, Path]) -> Path:
    """Bar chart of every score per layer (each normalised to its maximum); selected layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    names = list(all_scores)
    keys = sorted({k for s in all_scores.values() for k in s}, key=key_sort)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(keys) + 2), 3.2))
    w = 0.8 / len(names)
    for j, n in enumerate(names):
        vals = [all_scores[n].get(k, 0.0) for k in keys]  # a score that does not rate a key: no bar
        m = max(abs(v) for v in vals) or 1.0
        ax.bar([i + (j - (len(names) - 1) / 2) * w for i in range(len(keys))], [v / m for v in vals], w,
               label=f"{n}{' (used)' if n == method else ''}", alpha=0.85)
    for i, k in enumerate(keys):
        if k in selected:
            ax.axvspan(i - 0.45, i + 0.45, color="gold", alpha=0.25, lw=0)
    ax.set_xticks(range(len(keys)), [k.replace("layer.", "") for k in keys], rotation=30 if len(keys) < 12 else 90)
    ax.set_xlabel("gene key: decoder block / embed / final_norm / lm_head (shaded: selected)")
    ax.set_ylabel("score / max")
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    ax.set_title("safety specificity of the aligned–degraded contrast")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["PlanePoint", "Point", "RESULT_KEYS", "plot_plane", "plot_safety_utility", "plot_scores"]
