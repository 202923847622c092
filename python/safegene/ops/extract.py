"""``safegene extract``: stream two checkpoints into a gene.

τ = θ_aligned − θ_degraded for every float tensor, computed chunk by chunk in the C++ core
with a fixed memory budget (tensors are joined by name, so the two checkpoints may be
sharded differently), together with per-tensor statistics from the same pass.

Storage dtype policy: **float32 by default.** The difference of two bf16 (or f16) weights is
exactly representable in float32 whenever their exponents are within 16 of each other (in
practice, always), so an F32 gene is lossless, and a later ``apply`` adds the true τ. A bf16
difference is *not* exactly representable in bf16 (fine-tuning changes live in the low bits),
so ``dtype="BF16"`` halves the gene but rounds τ; the relative rounding error
‖τ_stored − τ‖ / ‖τ‖ is measured in the same pass and written to gene.json (per tensor and
overall) and returned, so the trade is visible.

>>> gene = extract("models/aligned", "models/degraded", "gene/")  # doctest: +SKIP
>>> gene.manifest["rounding"]  # doctest: +SKIP
{'storage_dtype': 'F32', 'rel_error': 0.0}
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..engine.stream import Plan, run_plan
from ..errors import CheckpointError, MismatchError, NonFiniteError, UsageError
from ..gene import GENE_FORMAT, GENE_VERSION, MANIFEST, VECTORS, Gene, fingerprint, key_sort
from ..io.atomic import atomic_output_dir, write_json_atomic
from ..io.checkpoint import OutTensor, check_output_location, create_files, join_by_name, layer_key, open_checkpoint, plan_file
from ..io.hub import resolve_model

STORAGE_DTYPES = ("F32", "BF16", "F16")
#: Float dtypes with no kernel: refused rather than silently skipped (integer/bool buffers carry no vector).
UNSUPPORTED_FLOAT = {"F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
DEFAULT_BUDGET_MB = 128


def extract(
    aligned: str | os.PathLike[str],
    degraded: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "F32",
    budget_mb: float = DEFAULT_BUDGET_MB,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> Gene:
    """Extract the gene τ = aligned − degraded into the directory ``out``.

    ``aligned`` and ``degraded`` are local model directories / ``.safetensors`` files or Hub ids
    (``org/name[@revision]``, resolved through the local Hugging Face cache). ``dtype`` is the storage dtype of τ (``"F32"``, ``"BF16"`` or ``"F16"``); ``budget_mb``
    bounds the streaming buffers. Non-finite values in τ are refused unless
    ``allow_nonfinite``. Returns the written :class:`~safegene.gene.Gene`.

    >>> extract("aligned/", "degraded/", "gene/", dtype="BF16")  # doctest: +SKIP
    """
    dtype = dtype.upper()
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if budget_mb <= 0:
        raise UsageError("the memory budget must be positive")
    t0 = time.perf_counter()
    a = open_checkpoint(resolve_model(aligned))
    d = open_checkpoint(resolve_model(degraded))
    out = Path(out)
    check_output_location(out, [a.root, d.root])
    pairs = join_by_name(a, d, ("aligned", "degraded"))
    if a.model_type and d.model_type and a.model_type != d.model_type:
        raise MismatchError(f"aligned {a.root} is {a.model_type!r} but degraded {d.root} is {d.model_type!r}")
    for ta, tb in pairs:
        for t, src in ((ta, a.root), (tb, d.root)):
            if t.dtype in UNSUPPORTED_FLOAT:
                raise CheckpointError(
                    f"{src}: tensor {t.name!r} is {t.dtype}, which safegene does not compute on; "
                    "save the checkpoint in F32, F16 or BF16 first"
                )
    vec_pairs = [(ta, tb) for ta, tb in pairs if ta.is_float and tb.is_float]
    skipped = [ta.name for ta, tb in pairs if not (ta.is_float and tb.is_float)]
    elem = {"F32": 4, "BF16": 2, "F16": 2}[dtype]

    with atomic_output_dir(out, overwrite) as tmp:
        outs = [OutTensor(ta.name, dtype, ta.shape, ta.numel * elem) for ta, _ in vec_pairs]
        of = plan_file(tmp / VECTORS, outs, {"format": "pt", "safegene": "gene-vectors"})
        create_files([of])
        plan = Plan().expect(a.files + d.files)
        for (ta, tb), ot in zip(vec_pairs, outs):
            plan.add(of.path, ot.offset, dtype, ta.numel, [(ta, 1.0), (tb, -1.0)])
        res = run_plan(plan, int(budget_mb * 2**20), "extract", progress)

        tensors: dict[str, Any] = {}
        layers: dict[str, str] = {}
        per_layer: dict[str, dict[str, float]] = {}
        tot_tau = tot_round = 0.0
        bad: list[str] = []
        # Term 0 is the aligned tensor, term 1 the degraded one: out = aligned - degraded = tau.
        for (ta, _), st in zip(vec_pairs, res["stats"]):
            key = layer_key(ta.name)
            layers[ta.name] = key
            tau_n, a_n, d_n = math.sqrt(st.out_sq), math.sqrt(st.in0_sq), math.sqrt(st.in1_sq)
            tensors[ta.name] = {
                "layer": key,
                "tau_norm": tau_n,
                "aligned_norm": a_n,
                "degraded_norm": d_n,
                "rel_change": tau_n / a_n if a_n > 0 else (0.0 if tau_n == 0 else math.inf),
                "cosine": st.in01_dot / (a_n * d_n) if a_n > 0 and d_n > 0 else None,
                "rounding_rel_error": math.sqrt(st.round_sq) / tau_n if tau_n > 0 else 0.0,
                "nonfinite": st.nonfinite_out,
            }
            if st.nonfinite_out or st.nonfinite_in:
                bad.append(ta.name)
            agg = per_layer.setdefault(key, {"tau_sq": 0.0, "aligned_sq": 0.0, "n_tensors": 0})
            agg["tau_sq"] += st.out_sq
            agg["aligned_sq"] += st.in0_sq
            agg["n_tensors"] += 1
            tot_tau += st.out_sq
            tot_round += st.round_sq
        if bad and not allow_nonfinite:
            raise NonFiniteError(
                f"non-finite values (NaN/Inf) in {len(bad)} tensors of the inputs or of τ, e.g. {bad[0]!r}; "
                "check the checkpoints, or pass --allow-nonfinite to keep them"
            )
        layer_stats = {
            k: {
                "tau_norm": math.sqrt(v["tau_sq"]),
                "aligned_norm": math.sqrt(v["aligned_sq"]),
                "rel_change": math.sqrt(v["tau_sq"] / v["aligned_sq"]) if v["aligned_sq"] > 0 else 0.0,
                "n_tensors": int(v["n_tensors"]),
            }
            for k, v in sorted(per_layer.items(), key=lambda kv: key_sort(kv[0]))
        }
        rel_err = math.sqrt(tot_round / tot_tau) if tot_tau > 0 else 0.0
        manifest = {
            "format": GENE_FORMAT,
            "format_version": GENE_VERSION,
            "created_by": f"safegene {__version__}",
            "storage_dtype": dtype,
            "fingerprint": fingerprint(a),
            "layers": layers,
            "tensors": tensors,
            "layer_stats": layer_stats,
            "skipped": skipped,
            "rounding": {"storage_dtype": dtype, "rel_error": rel_err},
            "sources": {"aligned": a.provenance(), "degraded": d.provenance()},
            "stream": {
                "budget_bytes": int(budget_mb * 2**20),
                "buffer_bytes": res["buffer_bytes"],
                "bytes_read": res["bytes_read"],
                "bytes_written": res["bytes_written"],
                "seconds": round(time.perf_counter() - t0, 3),
            },
            "selection": None,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return Gene.load(out)
