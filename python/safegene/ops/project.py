"""A task-aware gene: τ with its component along the task update removed where the two conflict.

A task fine-tune moves the aligned model by δ = θ_T − θ_A. Where τ points against δ
(⟨τ, δ⟩ < 0), adding λτ undoes part of what the task learned along with the erosion. The
projection removes τ's component along δ there::

    τ' = τ − (⟨τ, δ⟩ / ‖δ‖²) · δ     where ⟨τ, δ⟩ < 0, else τ' = τ

per output row of every matrix (``mode="row"``; vectors are one row) or per whole tensor
(``mode="key"``). τ' is orthogonal to δ on the projected rows and keeps every component of τ
that does not touch the task update.

``mode="touched"`` (development round 14, for token embeddings): a fine-tune moves only the
embedding rows of the tokens its data contains, so τ' is τ with every row the task update moved
(‖δ_row‖ > ``rel_tol`` · max‖δ_row‖) set to zero: applying it leaves the task's own tokens
where the fine-tune put them and restores the rest. Only matrices are masked (vectors pass
through); ``only`` names the keys transformed (e.g. ``["embed"]``), the others are copied as
they are. Whether it helps is a per-target question: where the
erosion itself runs along δ, the projection removes the restoration with it (development round
8, ``bench/dev_split.md``); :class:`safegene.baselines.registry.TaskAware` decides per target.

Streaming: one tensor of each of the gene, the aligned model and the task model in memory at a
time (each row block computed in float64), the projected vectors written straight into their
place in the new gene's safetensors file. A factored (LoRA) τ is densified for the keys kept.

>>> g = project_gene("gene/", "aligned/", "task-sentiment/", "gene-proj/", keys=["layer.3", "lm_head"])  # doctest: +SKIP
>>> g.manifest["projection"]["rows_projected"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence, Union

from ..errors import MismatchError, UsageError
from ..gene import MANIFEST, VECTORS, Gene, load_gene
from ..io.atomic import atomic_output_dir, write_json_atomic
from ..io.cards import CARD, write_gene_card
from ..io.checkpoint import OutTensor, create_files, open_checkpoint, plan_file
from .extract import select_keys

PathLike = Union[str, "os.PathLike[str]"]
MODES = ("row", "key", "touched")
#: Rows per float64 block: bounds the working memory to a few times this many elements.
_BLOCK_ELEMS = 1 << 22
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def project_rows(tau: Any, delta: Any, mode: str = "row") -> tuple[Any, int, int]:
    """τ' for one tensor (float64 in, float64 out) and the number of rows projected / rows.

    >>> import torch
    >>> t, d = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64), torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> p, n, rows = project_rows(t, d)
    >>> p.tolist(), n, rows
    ([[0.0, 1.0], [1.0, 0.0]], 1, 2)
    """
    import torch

    if mode not in MODES or mode == "touched":
        raise UsageError(f"unknown projection mode {mode!r}; choose one of row, key (touched: moved_rows)")
    if mode == "row" and tau.dim() > 1:
        t2, d2 = tau.reshape(tau.shape[0], -1), delta.reshape(delta.shape[0], -1)
    else:
        t2, d2 = tau.reshape(1, -1), delta.reshape(1, -1)
    dot, nn = (t2 * d2).sum(1, keepdim=True), (d2 * d2).sum(1, keepdim=True)
    hit = (dot < 0) & (nn > 0)
    coef = torch.where(hit, dot / nn.clamp_min(1e-300), torch.zeros_like(dot))
    return (t2 - coef * d2).reshape(tau.shape), int(hit.sum()), int(t2.shape[0])


def moved_rows(row_norms: Any, rel_tol: float = 1e-3) -> Any:
    """The rows a task update moved: ‖δ_row‖ > ``rel_tol`` · the largest (none when δ is 0).

    >>> import torch
    >>> moved_rows(torch.tensor([0.0, 1e-6, 0.5, 1.0])).tolist()
    [False, False, True, True]
    """
    import torch

    top = float(row_norms.max()) if row_norms.numel() else 0.0
    return row_norms > rel_tol * top if top > 0 else torch.zeros_like(row_norms, dtype=torch.bool)


def project_gene(
    gene: Union[PathLike, Gene],
    aligned: PathLike,
    task: PathLike,
    out: PathLike,
    *,
    keys: Sequence[str] | None = None,
    mode: str = "row",
    only: Sequence[str] | None = None,
    rel_tol: float = 1e-3,
    overwrite: bool = False,
) -> Gene:
    """Write the gene τ' projected off ``task``'s update from ``aligned`` (see the module text)
    to ``out``, keeping only ``keys`` (coefficient keys or tensor names; default: every key).
    ``only`` (same forms): the keys transformed, the other kept keys copied unchanged (default:
    every kept key); ``rel_tol``: the ``"touched"`` mode's threshold (:func:`moved_rows`).

    gene.json keeps the fingerprint and selection, records ``projection`` (mode, the task and
    aligned paths, rows projected, ‖τ'‖/‖τ‖ per key) and the new norms; vectors are stored in
    the source gene's dtype (float32 for factored tensors).
    """
    import torch
    from safetensors import safe_open

    g = load_gene(gene)
    if mode not in MODES:
        raise UsageError(f"unknown projection mode {mode!r}; choose one of {', '.join(MODES)}")
    aligned, task, out = Path(aligned), Path(task), Path(out)
    if not rel_tol >= 0:
        raise UsageError(f"rel_tol must be >= 0, not {rel_tol!r}")
    names = list(g.tensor_names)
    if keys is not None:
        keep = select_keys(names, list(keys))
        names = [n for n, k in zip(names, keep) if k]  # select_keys refuses an empty or unknown key
    transformed = set(names)
    if only is not None:
        transformed = {n for n, k in zip(names, select_keys(names, list(only))) if k}
    ca, ct = open_checkpoint(aligned), open_checkpoint(task)
    vec = g.open_vectors().tensors if g.dense_names else {}
    gshape = {n: tuple(g.factored[n]["shape"]) if g.is_factored(n) else tuple(vec[n].shape) for n in names}
    for n in names:
        for side, ck in ((aligned, ca), (task, ct)):
            if n not in ck.tensors:
                raise MismatchError(f"tensor {n!r} of gene {g.path} is missing from {side}")
            if tuple(ck.tensors[n].shape) != gshape[n]:
                raise MismatchError(f"tensor {n!r}: shape {tuple(ck.tensors[n].shape)} in {side} differs from the gene's {gshape[n]}")
    dense_dtype = {n: ("F32" if g.is_factored(n) else vec[n].dtype) for n in names}
    outs = [OutTensor(n, dense_dtype[n], gshape[n], math.prod(gshape[n]) * getattr(torch, _TORCH_DTYPES[dense_dtype[n]]).itemsize)
            for n in names]
    per_key: dict[str, dict[str, float]] = {}
    per_tensor: dict[str, dict[str, Any]] = {}
    total_rows = total_hit = 0
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        f = plan_file(tmp / VECTORS, outs, {"format": "pt", "safegene": "gene-vectors"})
        create_files([f])
        by_name = {o.name: o for o in f.tensors}
        fd = os.open(f.path, os.O_WRONLY)
        try:
            with contextlib.ExitStack() as stack:
                handles: dict[Path, Any] = {}

                def handle(path: Path) -> Any:
                    if path not in handles:
                        handles[path] = stack.enter_context(safe_open(str(path), "pt"))
                    return handles[path]

                for name, tau in g.iter_vectors(names, dtype=torch.float32):
                    a = handle(ca.tensors[name].file).get_tensor(name)
                    t = handle(ct.tensors[name].file).get_tensor(name)
                    rows = tau.shape[0] if (mode in ("row", "touched") and tau.dim() > 1) else 1
                    step = max(1, _BLOCK_ELEMS // max(1, tau.numel() // rows)) if rows > 1 else 1
                    blocks = [slice(r0, r0 + step) for r0 in range(0, rows, step)] if rows > 1 else [slice(None)]
                    hit = 0
                    if name not in transformed or (mode == "touched" and rows == 1):
                        proj = tau.double()
                    elif mode == "touched":  # two passes: the row norms of δ, then τ masked
                        norms = torch.cat([(t[sl].double() - a[sl].double()).flatten(1).norm(dim=1)
                                           for sl in blocks])
                        moved = moved_rows(norms, rel_tol)
                        proj = tau.double()
                        proj[moved] = 0.0
                        hit = int(moved.sum())
                    else:
                        parts = []
                        for sl in blocks:
                            p, h, _ = project_rows(tau[sl].double(), t[sl].double() - a[sl].double(), mode)
                            parts.append(p)
                            hit += h
                        proj = torch.cat(parts) if rows > 1 else parts[0]
                    o = by_name[name]
                    stored = proj.to(getattr(torch, _TORCH_DTYPES[o.dtype])).contiguous()
                    os.pwrite(fd, stored.view(torch.uint8).numpy().tobytes() if stored.numel() else b"", o.offset)
                    sq_new, sq_old = float((proj * proj).sum()), float((tau.double() ** 2).sum())
                    key = g.layer_key(name)
                    agg = per_key.setdefault(key, {"sq_new": 0.0, "sq_old": 0.0})
                    agg["sq_new"] += sq_new
                    agg["sq_old"] += sq_old
                    per_tensor[name] = {"tau_norm": math.sqrt(sq_new), "rows_projected": hit, "rows": rows}
                    total_rows += rows
                    total_hit += hit
                    del a, t, tau, proj, stored
        finally:
            os.close(fd)
        for p in g.path.iterdir():  # plots and other files the gene carries (not vectors/factors/card)
            if p.is_file() and p.name not in (MANIFEST, CARD) and not p.name.startswith((".", "vectors", "factors")):
                shutil.copy2(p, tmp / p.name)
        man = json.loads(json.dumps(g.manifest))
        kept = set(names)
        man["layers"] = {n: k for n, k in man["layers"].items() if n in kept}
        man["tensors"] = {n: {**v, "tau_norm": per_tensor[n]["tau_norm"],
                              "rel_change": per_tensor[n]["tau_norm"] / v["aligned_norm"] if v.get("aligned_norm") else 0.0}
                          for n, v in man["tensors"].items() if n in kept}
        stats = man.get("layer_stats") or {}
        man["layer_stats"] = {k: {**stats.get(k, {}), "tau_norm": math.sqrt(v["sq_new"]),
                                  **({"rel_change": math.sqrt(v["sq_new"]) / stats[k]["aligned_norm"]}
                                     if stats.get(k, {}).get("aligned_norm") else {})}
                              for k, v in per_key.items()}
        if "factored" in man:  # version 2: every kept tensor is dense now
            man["factored"] = {}
        man["shards"] = {"files": [VECTORS], "max_shard_bytes": f.size}
        man["keys"] = list(dict.fromkeys(g.layer_key(n) for n in names))
        man["projection"] = {
            "mode": mode, "aligned": str(aligned), "task": str(task), "source_gene": str(g.path),
            "transformed": [n for n in names if n in transformed], **({"rel_tol": rel_tol} if mode == "touched" else {}),
            "rows_projected": total_hit, "rows": total_rows,
            "norm_ratio": {k: (math.sqrt(v["sq_new"] / v["sq_old"]) if v["sq_old"] > 0 else 1.0) for k, v in per_key.items()},
        }
        write_json_atomic(tmp / MANIFEST, man)
        write_gene_card(tmp, man)
    return Gene.load(out)


__all__ = ["MODES", "moved_rows", "project_gene", "project_rows"]
