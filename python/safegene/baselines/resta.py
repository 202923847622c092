"""Baselines evaluated like everything else.

RESTA (Bhardwaj et al., ACL 2024): θ_T + γ·(θ_aligned − θ_unaligned) over *all* tensors, one
global γ. To be fair to it, γ is grid-searched on the calibration split only (the same few-shot
data SafeGene calibrates on), never on the evaluation split.

>>> res = resta_grid("gene/", "task-sentiment/", "harmful_calib.jsonl", "sentiment_calib.jsonl",
...                  out_dir="task-sentiment-resta/")  # doctest: +SKIP
>>> res.gamma, res.out_dir  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..eval.evaluate import evaluate
from ..eval.judges import Judge
from ..ops.apply import apply

DEFAULT_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


@dataclass
class GridPoint:
    gamma: float
    asr: float
    accuracy: float


@dataclass
class RestaResult:
    """The chosen γ, every grid point's calibration ASR/accuracy, and where the model was written."""

    gamma: float
    reference_accuracy: float
    reference_asr: float
    points: list[GridPoint] = field(default_factory=list)
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "reference": {"asr": self.reference_asr, "accuracy": self.reference_accuracy},
            "grid": [p.__dict__ for p in self.points],
            "out_dir": str(self.out_dir) if self.out_dir else None,
        }


def choose_gamma(points: Sequence[GridPoint], reference_accuracy: float, max_accuracy_drop: float = 0.05) -> GridPoint:
    """The γ with the lowest calibration ASR among those that keep accuracy within
    ``max_accuracy_drop`` of the unpatched model (ties: the smaller γ); if none does, the γ with
    the best accuracy (ties: lower ASR, then smaller γ).

    >>> choose_gamma([GridPoint(0.5, 0.4, 1.0), GridPoint(1.0, 0.0, 0.97), GridPoint(2.0, 0.0, 0.5)], 1.0).gamma
    1.0
    """
    if not points:
        raise UsageError("the RESTA grid is empty")
    ok = [p for p in points if p.accuracy >= reference_accuracy - max_accuracy_drop - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p.asr, p.gamma))
    return min(points, key=lambda p: (-p.accuracy, p.asr, p.gamma))


def resta_grid(
    gene_dir: str | Path,
    target_dir: str | Path,
    safety_calib: Any,
    utility_calib: Any,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    out_dir: str | Path | None = None,
    judge: str | Judge = "keyword",
    max_accuracy_drop: float = 0.05,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> RestaResult:
    """Grid-search RESTA's global γ on calibration data, then write θ_T + γ*·τ to ``out_dir``.

    ``safety_calib`` holds harmful prompts (their completions are ignored), ``utility_calib``
    task prompts with labels (JSONL paths or example lists). Each γ is applied with
    :func:`safegene.apply` (``scale=γ``, all tensors) and scored with :func:`safegene.evaluate`.

    >>> resta_grid("gene/", "task/", "harmful_calib.jsonl", "task_calib.jsonl", grid=(0.5, 1.0, 2.0))  # doctest: +SKIP
    """
    if not grid:
        raise UsageError("the RESTA grid is empty")
    target = Path(target_dir)

    def measure(model_dir: Path) -> tuple[float, float]:
        rep = evaluate(model_dir, harmful=safety_calib, tasks={"utility": utility_calib}, judge=judge,
                       batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
        if rep.asr is None:
            raise UsageError("the RESTA grid needs harmful calibration prompts to measure ASR on")
        return rep.asr.rate, rep.task_accuracy["utility"].rate

    ref_asr, ref_acc = measure(target)
    points: list[GridPoint] = []
    work = Path(tempfile.mkdtemp(prefix="safegene-resta-"))
    try:
        for g in grid:
            cand = work / f"gamma-{g:g}"
            apply(gene_dir, target, cand, scale=float(g), progress=False)
            asr, acc = measure(cand)
            points.append(GridPoint(gamma=float(g), asr=asr, accuracy=acc))
            shutil.rmtree(cand, ignore_errors=True)
        best = choose_gamma(points, ref_acc, max_accuracy_drop)
        out = None
        if out_dir is not None:
            out = Path(out_dir)
            apply(gene_dir, target, out, scale=best.gamma, progress=False, overwrite=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return RestaResult(gamma=best.gamma, reference_accuracy=ref_acc, reference_asr=ref_asr, points=points, out_dir=out)


__all__ = ["DEFAULT_GRID", "GridPoint", "RestaResult", "choose_gamma", "resta_grid"]
