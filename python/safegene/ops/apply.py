"""``safegene apply``: θ_out = θ_target + Σ_l λ_l τ_l, streamed into a new HF checkpoint.

Coefficients map keys to λ; a tensor's λ is looked up by its exact name first, then by its
layer key (``layer.<i>``, ``embed``, ``final_norm``, ``lm_head``, ``other``); a missing key
means λ = 0 and the tensor's bytes are copied unchanged. ``scale=S`` (RESTA) sets every key
to S. The output keeps the target's dtypes and shard layout (renamed to the standard
``model-0000i-of-0000N.safetensors``), with ``{"format": "pt"}`` headers and the target's
config/tokenizer/generation files, and appears only when complete.

A target may be ``BASE+ADAPTER_DIR`` (a PEFT LoRA adapter): it is treated as the merged model
``W + scale·B·A`` exactly as PEFT's ``merge_and_unload()`` would store it, formed chunk by chunk
inside the stream; the merged model never exists in memory or on disk.

A low-rank gene (format version 2) adds each factored τ = B·A through the core's low-rank
term: ``round(θ + λ·(B @ A))`` chunk by chunk, with only the r-rank factors in memory (no dense τ).
When the target is ``BASE+ADAPTER`` and the adapter also touches that tensor, the two updates
share the one low-rank term, stacked: A = [A_ad; A_gene], B = [s·B_ad, λ·B_gene] (scale 1), so
the result is ``round(W + s·B_ad·A_ad + λ·τ)`` with a single rounding (a dense gene rounds the
merged weight first, then adds λτ).

>>> apply("gene/", "task-model/", "patched/", coeffs={"layer.2": 0.8, "layer.3": 1.1})  # doctest: +SKIP
>>> apply_to_model(model, "gene/", {"layer.3": 1.0})  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..coeffs import CoeffsLike, resolve_coeffs
from ..engine.stream import Plan, run_plan
from ..errors import CheckpointError, GeneError, NonFiniteError, UsageError
from ..gene import Gene, load_gene
from ..io.atomic import atomic_output_dir
from ..io.cards import write_apply_cards
from ..io.checkpoint import (
    Checkpoint,
    OutTensor,
    check_output_location,
    copy_companions,
    create_files,
    open_checkpoint,
    plan_file,
    shard_names,
    write_index,
)
from ..io.hub import resolve_target
from ..io.peft import lora_target_delta

if TYPE_CHECKING:  # pragma: no cover
    pass

DEFAULT_BUDGET_MB = 128


@dataclass
class ApplyResult:
    """What one apply wrote."""

    out: Path
    n_patched: int
    n_copied: int
    bytes_written: int
    seconds: float
    coeffs: dict[str, float] = field(default_factory=dict)


def apply(
    gene: "str | os.PathLike[str] | Gene",
    target: "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]",
    out: "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]",
    *,
    scale: float | None = None,
    coeffs: CoeffsLike | None = None,
    budget_mb: float = DEFAULT_BUDGET_MB,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> "ApplyResult | list[ApplyResult]":
    """Write θ_target + Σ λ τ to ``out`` (a new HF model directory).

    ``target`` is a local model directory, a Hub id (``org/name[@revision]``) or ``BASE+ADAPTER_DIR`` (a PEFT LoRA adapter merged on the fly); ``target`` and ``out`` may be lists of equal length to patch several task models with one
    gene load. Exactly one of ``scale`` (uniform λ, RESTA) and ``coeffs`` (mapping, COEFFS.json
    path, or :class:`safegene.calibrate.Coeffs`) is required.

    >>> apply("gene/", ["task-a/", "task-b/"], ["safe-a/", "safe-b/"], scale=1.0)  # doctest: +SKIP
    """
    g = load_gene(gene)
    many = not isinstance(target, (str, os.PathLike))
    targets: list[str | os.PathLike[str]] = [target] if isinstance(target, (str, os.PathLike)) else list(target)
    outs: list[str | os.PathLike[str]] = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if len(targets) != len(outs):
        raise UsageError(f"{len(targets)} targets but {len(outs)} outputs; give one output per target")
    if len({Path(o).resolve() for o in outs}) != len(outs):
        raise UsageError("two targets were given the same output directory")
    lam = resolve_coeffs(g, scale, coeffs)
    results = [_apply_one(g, Path(t), Path(o), lam, budget_mb, overwrite, allow_nonfinite, progress) for t, o in zip(targets, outs)]
    write_apply_cards(g, targets, results)
    return results if many else results[0]


def _apply_one(
    g: Gene, target: Path, out: Path, lam: dict[str, float], budget_mb: float, overwrite: bool, allow_nonfinite: bool, progress: bool
) -> ApplyResult:
    if budget_mb <= 0:
        raise UsageError("the memory budget must be positive")
    t0 = time.perf_counter()
    base, adapter = resolve_target(target)
    tgt = open_checkpoint(base)
    g.check_target(tgt)
    gv = g.open_vectors()
    missing = [n for n in g.dense_names if n not in gv.tensors]
    if missing:
        raise GeneError(f"{g.vectors_path}: no vector for {missing[0]!r}, which gene.json lists; the gene is damaged")
    check_output_location(out, [tgt.root, g.path] + ([adapter] if adapter is not None else []))
    lora = _lora_factors(tgt, adapter) if adapter is not None else {}
    # only the factors with λ ≠ 0 are read (float32, r × in and out × r each), with numpy: a
    # low-rank apply stays as torch-free as a dense one, and a dense apply imports neither
    lr_names = [n for n in g.factored if lam.get(n, 0.0) != 0.0]
    gene_lr = {n: (a, b) for n, a, b in g.iter_factors_f32(lr_names)}

    lam = dict(lam)
    vec_of = {n: n for n in g.tensor_names}
    tied = _tied_pair(tgt)
    if tied is not None:
        # Stored twice but tied in the model: patch both with the embedding's λ and τ so the
        # copies stay identical (transformers would otherwise keep only one of them).
        emb, head = tied
        lam[head] = lam.get(emb, 0.0)
        vec_of[head] = emb
        if head in lora:
            raise UsageError(
                f"{adapter}: the adapter trains {head!r}, which this model ties to {emb!r}; a LoRA on a tied head "
                "would untie them. Merge it with PEFT and save the merged model instead"
            )
        if emb in lora:
            lora[head] = lora[emb]

    # Keep the target's shard grouping (one output file per input file), in file order.
    groups = [sorted(f.tensors.values(), key=lambda t: t.offset) for f in tgt.files]
    names = shard_names(len(groups))
    with atomic_output_dir(out, overwrite) as tmp:
        files = []
        for fname, group in zip(names, groups):
            outs = [OutTensor(t.name, t.dtype, t.shape, t.nbytes) for t in group]
            files.append(plan_file(tmp / fname, outs))
        create_files(files)
        plan = Plan().expect(tgt.files + gv.files)
        patched: list[tuple[str, int]] = []
        n_copied = 0
        for f, group in zip(files, groups):
            for ot, t in zip(f.tensors, group):
                c = lam.get(t.name, 0.0)
                lr = lora.get(t.name)
                fac = gene_lr.get(vec_of[t.name]) if c != 0.0 and t.is_float else None
                if fac is not None:
                    j = plan.add(f.path, ot.offset, t.dtype, t.numel, [(t, 1.0)], lowrank=_stack_lowrank(lr, fac, c))
                    patched.append((t.name, j))
                elif c != 0.0 and t.is_float:
                    j = plan.add(f.path, ot.offset, t.dtype, t.numel, [(t, 1.0), (gv.tensors[vec_of[t.name]], c)], lowrank=lr)
                    patched.append((t.name, j))
                else:
                    j = plan.add(f.path, ot.offset, t.dtype, t.numel, [(t, 1.0)], lowrank=lr)
                    if lr is not None:
                        patched.append((t.name, j))
                    else:
                        n_copied += 1
        res = run_plan(plan, int(budget_mb * 2**20), f"apply {tgt.root.name}", progress, stats="guard")
        bad = [n for n, j in patched if res["stats"][j].nonfinite_out > 0]
        if bad and not allow_nonfinite:
            raise NonFiniteError(
                f"the patched model would hold NaN/Inf in {len(bad)} tensors, e.g. {bad[0]!r}; "
                "check the gene and coefficients, or pass --allow-nonfinite"
            )
        if len(files) > 1:
            write_index(tmp, files)
        copy_companions(tgt.root, tmp)
    return ApplyResult(out, len(patched), n_copied, res["bytes_written"], time.perf_counter() - t0, {k: v for k, v in lam.items() if v})


def _lora_factors(tgt: Checkpoint, adapter: Path) -> dict[str, tuple[Any, Any, float]]:
    """The adapter's LoRA factors per base tensor as float32 numpy arrays (A (r, in), B (out, r),
    scale), validated against the base; only these small factors are held in memory, the
    merged weight W + scale·B·A is formed chunk by chunk inside the stream."""
    out: dict[str, tuple[Any, Any, float]] = {}
    for name, (a, b, scale) in lora_target_delta(tgt, adapter).items():
        if not tgt.tensors[name].is_float:
            raise CheckpointError(f"{adapter}: the adapter updates {name!r}, which is not a float tensor in the base")
        out[name] = (a.numpy(), b.numpy(), scale)
    return out


def _stack_lowrank(lora: "tuple[Any, Any, float] | None", gene: tuple[Any, Any], lam: float) -> tuple[Any, Any, float]:
    """One low-rank term for λ·τ = λ·B·A, stacked after a LoRA target's own ``(A, B, s)`` when
    there is one (the core takes one term per tensor): ``[A_ad; A], [s·B_ad, λ·B]`` with scale 1.
    The scales are folded in float64 and rounded once to float32."""
    import numpy as np

    a, b = gene
    if lora is None:
        return a, b, lam
    la, lb, ls = lora
    a2 = np.concatenate([np.asarray(la, np.float32), a], axis=0)
    b2 = np.concatenate([ls * np.asarray(lb, np.float64), lam * np.asarray(b, np.float64)], axis=1).astype(np.float32)
    return a2, b2, 1.0


def _tied_pair(ckpt) -> tuple[str, str] | None:
    """(embedding, lm_head) names when the config ties them and the checkpoint stores both."""
    cfg = ckpt.config or {}
    if not cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in ckpt.tensors:
        return None
    for n in ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight"):
        if n in ckpt.tensors and ckpt.tensors[n].shape == ckpt.tensors["lm_head.weight"].shape:
            return n, "lm_head.weight"
    return None


