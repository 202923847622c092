"""SafeMERGE-style baseline: a per-layer cosine test decides where the safety vector goes.

SafeMERGE (Djuhera et al., 2025) merges a fine-tuned model's layer with the aligned model's
layer only where the fine-tuning update has drifted from the safety subspace. The
gene-form used here, so that it runs in the same harness as SafeGene, is::

    u_l   = θ_T,l − θ_A,l                      (the task update of block l)
    cos_l = ⟨u_l, τ_l⟩ / (‖u_l‖ ‖τ_l‖)         (τ = θ_A − θ_D, the gene)
    λ_l   = ratio  if cos_l < threshold  else 0

A task update that erodes safety points along −τ (θ_D − θ_A is the degradation), so the
blocks with the lowest cosine are the ones whose update is least aligned with safety; they
get τ at a fixed ratio. No data and no training: binary per layer plus one fixed ratio.

Tensors are streamed one at a time from the checkpoints (safetensors, sharded or not), and
the three inner products per tensor use the same batched C++ dot as calibration.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Union

from ..coeffs import Coeffs
from ..engine import native
from ..errors import MismatchError
from ..gene import load_gene
from ..io.checkpoint import open_checkpoint


def layer_cosines(gene, aligned: Union[str, Path], task: Union[str, Path]) -> dict[str, float]:
    """``cos(θ_T,l − θ_A,l, τ_l)`` for every decoder block of the gene.

    >>> layer_cosines("gene/", "aligned/", "task-sentiment/")  # doctest: +SKIP
    {'layer.0': 0.01, 'layer.1': -0.12, ...}
    """
    import torch
    from safetensors import safe_open

    gene = load_gene(gene)
    aligned, task = Path(aligned), Path(task)
    # Validated headers and index (containment, shard consistency), as everywhere else.
    fa = {n: t.file for n, t in open_checkpoint(aligned).tensors.items()}
    ft = {n: t.file for n, t in open_checkpoint(task).tensors.items()}
    acc: dict[str, list[float]] = {}
    names = [n for n in gene.tensor_names if gene.layer_key(n).startswith("layer.")]
    for name in names:
        if name not in fa or name not in ft:
            raise MismatchError(f"tensor {name!r} of gene {gene.path} is missing from {aligned if name not in fa else task}")
    # One handle per file for the whole walk (the gene's vector file, each shard of both models),
    # one tensor of each side in memory at a time.
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def handle(path: Path):
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), "pt"))
            return handles[path]

        for name, tau in gene.iter_vectors(names, dtype=torch.float32):
            a = handle(fa[name]).get_tensor(name).float()
            t = handle(ft[name]).get_tensor(name).float()
            u = (t - a).contiguous()
            tau = tau.contiguous()
            d_ut, d_uu, d_tt = native.dot([u, u, tau], [tau, u, tau])
            s = acc.setdefault(gene.layer_key(name), [0.0, 0.0, 0.0])
            s[0] += d_ut; s[1] += d_uu; s[2] += d_tt
            del a, t, tau, u
    out = {}
    for key in [k for k in gene.layer_keys() if k in acc]:
        ut, uu, tt = acc[key]
        out[key] = float(ut / ((uu ** 0.5) * (tt ** 0.5))) if uu > 0 and tt > 0 else 0.0
    return out


def safemerge_coeffs(gene, aligned, task, threshold: float = 0.0, ratio: float = 1.0) -> Coeffs:
    """Coefficients of the SafeMERGE-style rule: ``λ_l = ratio`` where ``cos_l < threshold``.

    >>> c = safemerge_coeffs("gene/", "aligned/", "task-topic/", threshold=0.0, ratio=1.0)  # doctest: +SKIP
    >>> c.save("safemerge.json")  # doctest: +SKIP
    """
    cos = layer_cosines(gene, aligned, task)
    coeffs = {k: float(ratio) for k, c in cos.items() if c < threshold}
    return Coeffs(coeffs, {"method": "safemerge-style", "cosines": cos, "threshold": threshold, "ratio": ratio,
                           "target": str(task)})
