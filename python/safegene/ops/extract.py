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

**Low-rank genes.** When the degraded model is ``ALIGNED+ADAPTER`` (a PEFT LoRA adapter on the
aligned model itself), or with :func:`extract_from_adapter`, τ = aligned − (aligned + s·B·A) =
−s·B·A is written as its factors (gene format version 2, see :mod:`safegene.gene`): A as the
adapter stores it and B = −s·B_adapter (the scale folded into B, rounded once from float64 into
the storage dtype). No dense τ is ever formed. Tensors the adapter does not touch have τ = 0 and
are not stored (listed in gene.json ``lowrank.untouched``). Their statistics come from the
factors and one read of the aligned weights: ‖τ‖² = trace((BᵀB)(AAᵀ)) (r × r products) and
⟨θ_aligned, τ⟩ = Σ (θ_aligned Aᵀ) ⊙ B, all in float64.

>>> gene = extract("models/aligned", "models/degraded", "gene/")  # doctest: +SKIP
>>> gene.manifest["rounding"]  # doctest: +SKIP
{'storage_dtype': 'F32', 'rel_error': 0.0}
>>> extract("models/aligned", "models/aligned+degrade-lora/", "gene-lr/").factored  # doctest: +SKIP
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._version import __version__
from ..engine.stream import Plan, run_plan
from ..errors import CheckpointError, GeneError, MismatchError, NonFiniteError, UsageError
from ..gene import (
    FACTORS_INDEX,
    GENE_FORMAT,
    GENE_VERSION,
    GENE_VERSION_FACTORED,
    MANIFEST,
    VECTORS,
    VECTORS_INDEX,
    Gene,
    factor_shard_names,
    factors_sq_norm,
    fingerprint,
    key_sort,
    read_degrade_provenance,
    vector_shard_names,
)
from ..io.atomic import atomic_output_dir, write_json_atomic
from ..io.cards import CARD, write_gene_card
from ..io.checkpoint import (
    OutTensor,
    TensorInfo,
    check_output_location,
    create_files,
    join_by_name,
    layer_key,
    open_checkpoint,
    plan_file,
    read_header,
)
from ..io.hub import resolve_model, resolve_target
from ..io.peft import ADAPTER_WEIGHTS, lora_target_delta, read_adapter_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

STORAGE_DTYPES = ("F32", "BF16", "F16")
#: Float dtypes with no kernel: refused rather than silently skipped (integer/bool buffers carry no vector).
UNSUPPORTED_FLOAT = {"F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}
DEFAULT_BUDGET_MB = 128
#: Largest vector file, in MB (10^6 bytes) as Hugging Face's ``max_shard_size="5GB"``; the Hub
#: refuses files over 50 GB, and 5 GB shards download and resume well.
DEFAULT_MAX_SHARD_MB = 5000.0


def shard_groups(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Split tensors (in order) into consecutive groups of at most ``max_bytes`` each; a tensor
    larger than the limit gets a group of its own (tensors are never split across files).

    >>> shard_groups([4, 4, 4, 9, 1], 8)
    [[0, 1], [2], [3], [4]]
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, n in enumerate(sizes):
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur or not groups:
        groups.append(cur)
    return groups


def select_keys(names: Sequence[str], keys: Sequence[str]) -> list[bool]:
    """Which tensors ``keys`` keeps: a key is a coefficient key (``layer.3``, ``embed``, ``lm_head``,
    ``final_norm``, ``other``) or an exact tensor name. Unknown keys are refused."""
    wanted = [k.strip() for k in keys if k.strip()]
    if not wanted:
        raise UsageError("--keys needs at least one key, e.g. --keys layer.3,lm_head")
    lkeys = {n: layer_key(n) for n in names}
    known = set(lkeys.values()) | set(names)
    bad = [k for k in wanted if k not in known]
    if bad:
        avail = sorted(set(lkeys.values()), key=key_sort)
        raise UsageError(f"--keys: {bad[0]!r} is neither a coefficient key nor a tensor name of this model; keys are {avail}")
    ws = set(wanted)
    return [n in ws or lkeys[n] in ws for n in names]


def _add_to_layer(per_layer: dict[str, dict[str, float]], key: str, tau_sq: float, aligned_sq: float) -> None:
    """Accumulate one tensor's ‖τ‖² and ‖θ_aligned‖² into its coefficient key's totals."""
    agg = per_layer.setdefault(key, {"tau_sq": 0.0, "aligned_sq": 0.0, "n_tensors": 0})
    agg["tau_sq"] += tau_sq
    agg["aligned_sq"] += aligned_sq
    agg["n_tensors"] += 1


def _layer_stats(per_layer: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """gene.json's ``layer_stats`` from :func:`_add_to_layer`'s totals, in network order."""
    return {
        k: {
            "tau_norm": math.sqrt(v["tau_sq"]),
            "aligned_norm": math.sqrt(v["aligned_sq"]),
            "rel_change": math.sqrt(v["tau_sq"] / v["aligned_sq"]) if v["aligned_sq"] > 0 else 0.0,
            "n_tensors": int(v["n_tensors"]),
        }
        for k, v in sorted(per_layer.items(), key=lambda kv: key_sort(kv[0]))
    }


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
    keys: "Sequence[str] | str | None" = None,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
) -> Gene:
    """Extract the gene τ = aligned − degraded into the directory ``out``.

    ``aligned`` and ``degraded`` are local model directories / ``.safetensors`` files or Hub ids
    (``org/name[@revision]``, resolved through the local Hugging Face cache); ``degraded`` may be
    ``ALIGNED+ADAPTER_DIR`` (a PEFT LoRA adapter on the aligned model), which writes a low-rank
    gene (format version 2: τ = −s·B·A kept as factors; see the module docstring). ``dtype`` is the storage dtype of τ (``"F32"``, ``"BF16"`` or ``"F16"``); ``budget_mb``
    bounds the streaming buffers. Non-finite values in τ are refused unless
    ``allow_nonfinite``. ``keys`` (coefficient keys such as ``layer.3``/``lm_head``, or tensor
    names; a list or a comma-separated string) keeps only those vectors. Vector files larger than
    ``max_shard_mb`` MB are split into ``vectors-0000i-of-0000N.safetensors`` with an index.
    When the degraded model was made by ``safegene degrade``, its ``safegene_degrade.json`` is
    copied into gene.json as ``degradation``. Returns the written :class:`~safegene.gene.Gene`.

    >>> extract("aligned/", "degraded/", "gene/", dtype="BF16")  # doctest: +SKIP
    """
    dtype = dtype.upper()
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if budget_mb <= 0:
        raise UsageError("the memory budget must be positive")
    if max_shard_mb <= 0:
        raise UsageError("the shard size must be positive")
    t0 = time.perf_counter()
    d_base, adapter = resolve_target(degraded)
    if adapter is not None:
        a_path = resolve_model(aligned)
        _check_same_base(a_path, d_base, f"{degraded}")
        return _extract_lowrank(a_path, adapter, Path(out), dtype=dtype, budget_mb=budget_mb, overwrite=overwrite,
                                allow_nonfinite=allow_nonfinite, keys=keys, t0=t0, max_shard_mb=max_shard_mb)
    a = open_checkpoint(resolve_model(aligned))
    d = open_checkpoint(d_base)
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
    kept_keys: list[str] | None = None
    if keys is not None:
        klist = keys.split(",") if isinstance(keys, str) else list(keys)
        keep = select_keys([ta.name for ta, _ in vec_pairs], klist)
        vec_pairs = [p for p, k in zip(vec_pairs, keep) if k]
        kept_keys = list(dict.fromkeys(k.strip() for k in klist if k.strip()))
    elem = {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    max_shard_bytes = int(max_shard_mb * 1e6)
    provenance = read_degrade_provenance(d.root)

    with atomic_output_dir(out, overwrite) as tmp:
        outs = [OutTensor(ta.name, dtype, ta.shape, ta.numel * elem) for ta, _ in vec_pairs]
        groups = shard_groups([o.nbytes for o in outs], max_shard_bytes)
        files = [plan_file(tmp / fn, [outs[i] for i in grp], {"format": "pt", "safegene": "gene-vectors"})
                 for fn, grp in zip(vector_shard_names(len(groups)), groups)]
        file_of = {o.name: f for f in files for o in f.tensors}
        create_files(files)
        if len(files) > 1:
            total = sum(o.nbytes for o in outs)
            wm = {o.name: f.path.name for f in files for o in f.tensors}
            (tmp / VECTORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")
        plan = Plan().expect(a.files + d.files)
        for (ta, tb), ot in zip(vec_pairs, outs):
            plan.add(file_of[ot.name].path, ot.offset, dtype, ta.numel, [(ta, 1.0), (tb, -1.0)])
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
            _add_to_layer(per_layer, key, st.out_sq, st.in0_sq)
            tot_tau += st.out_sq
            tot_round += st.round_sq
        if bad and not allow_nonfinite:
            raise NonFiniteError(
                f"non-finite values (NaN/Inf) in {len(bad)} tensors of the inputs or of τ, e.g. {bad[0]!r}; "
                "check the checkpoints, or pass --allow-nonfinite to keep them"
            )
        layer_stats = _layer_stats(per_layer)
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
            "keys": kept_keys,
            "shards": {"files": [f.path.name for f in files], "max_shard_bytes": max_shard_bytes},
            "degradation": provenance,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        write_gene_card(tmp, manifest)
    return Gene.load(out)


# ---------------------------------------------------------------------------------------------
# low-rank genes: τ = −s·B·A from a LoRA adapter, kept factored
# ---------------------------------------------------------------------------------------------
def extract_from_adapter(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    base: "str | os.PathLike[str] | None" = None,
    dtype: str = "F32",
    budget_mb: float = DEFAULT_BUDGET_MB,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    keys: "Sequence[str] | str | None" = None,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
) -> Gene:
    """Extract the low-rank gene of a LoRA degrade: aligned = ``base`` (default: the adapter's
    ``base_model_name_or_path``), degraded = aligned + the adapter. Same as
    ``extract(base, f"{base}+{adapter}", out)``; τ stays factored (gene format version 2). Factors
    past ``max_shard_mb`` MB are split into ``factors-0000i-of-0000N.safetensors`` with an index.

    >>> g = extract_from_adapter("degrade-lora/", "gene/", base="models/aligned")  # doctest: +SKIP
    >>> g.factor_rank("model.layers.0.self_attn.q_proj.weight")  # doctest: +SKIP
    16
    """
    t0 = time.perf_counter()
    dtype = dtype.upper()
    if dtype not in STORAGE_DTYPES:
        raise UsageError(f"storage dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
    if budget_mb <= 0:
        raise UsageError("the memory budget must be positive")
    if max_shard_mb <= 0:
        raise UsageError("the shard size must be positive")
    ad = resolve_model(adapter)
    cfg = read_adapter_config(ad)
    named = cfg.get("base_model_name_or_path")
    if base is None:
        if not named:
            raise UsageError(f"{ad}: the adapter names no base model (base_model_name_or_path); give the aligned model with --base")
        a_path = resolve_model(named)
    else:
        a_path = resolve_model(base)
        named_local = Path(str(named)).expanduser() if named else None
        if named_local is not None and named_local.exists():
            # the adapter names a local base: it must be the aligned model we were given
            _check_same_base(a_path, named_local, f"{ad} (base_model_name_or_path)")
    return _extract_lowrank(a_path, ad, Path(out), dtype=dtype, budget_mb=budget_mb, overwrite=overwrite,
                            allow_nonfinite=allow_nonfinite, keys=keys, t0=t0, max_shard_mb=max_shard_mb)


def _check_same_base(aligned: Path, base: Path, where: str) -> None:
    """Refuse a LoRA degrade whose base is not the aligned model (τ would not be low-rank):
    the same path, or files with identical headers and bytes."""
    if aligned.resolve() == base.resolve():
        return
    a, b = open_checkpoint(aligned), open_checkpoint(base)
    fa = sorted((f.path.name, f.size, f.header_sha256) for f in a.files)
    fb = sorted((f.path.name, f.size, f.header_sha256) for f in b.files)
    same = fa == fb and all(
        filecmp.cmp(x.path, y.path, shallow=False)
        for x, y in zip(sorted(a.files, key=lambda f: f.path.name), sorted(b.files, key=lambda f: f.path.name))
    )
    if not same:
        raise MismatchError(
            f"{where}: the adapter's base {base} is not the aligned model {aligned}; a low-rank gene needs "
            "degraded = ALIGNED+ADAPTER on the aligned model itself (merge the adapter and extract densely otherwise)"
        )


def _extract_lowrank(
    aligned: Path,
    adapter: Path,
    out: Path,
    *,
    dtype: str,
    budget_mb: float,
    overwrite: bool,
    allow_nonfinite: bool,
    keys: "Sequence[str] | str | None",
    t0: float,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
) -> Gene:
    """Write the factored gene τ = B·A (B = −s·B_adapter) of ``aligned + adapter`` into ``out``."""
    import torch

    a = open_checkpoint(aligned)
    check_output_location(out, [a.root, adapter])
    deltas = lora_target_delta(a, adapter)
    for name in deltas:
        t = a.tensors[name]
        if not t.is_float or t.dtype in UNSUPPORTED_FLOAT:
            raise CheckpointError(f"{adapter}: the adapter updates {name!r}, which is {t.dtype} in the base; "
                                  "safegene computes on F32, F16 and BF16 only")
    names = [n for n in a.tensors if n in deltas]  # checkpoint order
    kept_keys: list[str] | None = None
    if keys is not None:
        klist = keys.split(",") if isinstance(keys, str) else list(keys)
        keep = select_keys(names, klist)
        names = [n for n, k in zip(names, keep) if k]
        kept_keys = list(dict.fromkeys(k.strip() for k in klist if k.strip()))
    if not names:
        raise UsageError(f"--keys keeps none of the {len(deltas)} tensors the adapter {adapter} updates")
    untouched = [n for n, t in a.tensors.items() if t.is_float and n not in deltas]
    skipped = [n for n, t in a.tensors.items() if not t.is_float]
    tdt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    budget = int(budget_mb * 2**20)

    factors: dict[str, "torch.Tensor"] = {}
    factored: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Any] = {}
    layers: dict[str, str] = {}
    per_layer: dict[str, dict[str, float]] = {}
    tot_tau = tot_round = 0.0
    bytes_read = 0
    bad: list[str] = []
    for n in names:
        fa, fb, s = deltas[n]
        a64 = fa.to(torch.float64)
        b64 = (-s) * fb.to(torch.float64)  # τ = aligned − (aligned + s·B·A) = (−s·B)·A
        a_st, b_st = a64.to(tdt).contiguous(), b64.to(tdt).contiguous()
        factors[f"{n}.A"], factors[f"{n}.B"] = a_st, b_st
        r = int(a64.shape[0])
        factored[n] = {"rank": r, "shape": [int(b64.shape[0]), int(a64.shape[1])]}
        tau_sq = factors_sq_norm(a64, b64)
        # stored − exact = [B_st, −B]·[A_st; A]: its norm from the same r × r products
        round_sq = max(0.0, factors_sq_norm(torch.cat([a_st.to(torch.float64), a64]), torch.cat([b_st.to(torch.float64), -b64], 1)))
        w_sq, w_tau, nf_in = _aligned_stats(a.tensors[n], a64, b64, budget)
        bytes_read += a.tensors[n].nbytes
        nf_out = int((~torch.isfinite(a_st)).sum()) + int((~torch.isfinite(b_st)).sum())
        if nf_in or nf_out or not math.isfinite(tau_sq):
            bad.append(n)
        d_sq = max(0.0, w_sq - 2.0 * w_tau + tau_sq)  # ‖θ_aligned − τ‖² = ‖θ_degraded‖²
        tau_n, a_n, d_n = math.sqrt(tau_sq), math.sqrt(w_sq), math.sqrt(d_sq)
        key = layer_key(n)
        layers[n] = key
        tensors[n] = {
            "layer": key,
            "tau_norm": tau_n,
            "aligned_norm": a_n,
            "degraded_norm": d_n,
            "rel_change": tau_n / a_n if a_n > 0 else (0.0 if tau_n == 0 else math.inf),
            "cosine": (w_sq - w_tau) / (a_n * d_n) if a_n > 0 and d_n > 0 else None,
            "rounding_rel_error": math.sqrt(round_sq) / tau_n if tau_n > 0 else 0.0,
            "nonfinite": nf_out,
            "rank": r,
        }
        _add_to_layer(per_layer, key, tau_sq, w_sq)
        tot_tau += tau_sq
        tot_round += round_sq
    if bad and not allow_nonfinite:
        raise NonFiniteError(
            f"non-finite values (NaN/Inf) in {len(bad)} tensors of the aligned model or of the adapter's factors, e.g. "
            f"{bad[0]!r}; check the inputs, or pass --allow-nonfinite to keep them"
        )
    layer_stats = _layer_stats(per_layer)
    cfg = read_adapter_config(adapter)
    wp = adapter / ADAPTER_WEIGHTS
    wf = read_header(wp)
    with atomic_output_dir(out, overwrite) as tmp:
        # an empty dense vector file keeps every gene's layout the same (no dense τ here)
        empty = plan_file(tmp / VECTORS, [], {"format": "pt", "safegene": "gene-vectors"})
        create_files([empty])
        factor_files = write_factor_shards(tmp, names, factors, int(max_shard_mb * 1e6))
        written = empty.size + sum((tmp / fn).stat().st_size for fn in factor_files)
        manifest = {
            "format": GENE_FORMAT,
            "format_version": GENE_VERSION_FACTORED,
            "created_by": f"safegene {__version__}",
            "storage_dtype": dtype,
            "fingerprint": fingerprint(a),
            "layers": layers,
            "tensors": tensors,
            "layer_stats": layer_stats,
            "skipped": skipped,
            "rounding": {"storage_dtype": dtype, "rel_error": math.sqrt(tot_round / tot_tau) if tot_tau > 0 else 0.0},
            # the degraded side is the adapter, recorded as a checkpoint is (path, files, config)
            "sources": {
                "aligned": a.provenance(),
                "degraded": {
                    "path": str(adapter.resolve()),
                    "files": [{"name": wp.name, "size": wf.size, "header_sha256": wf.header_sha256}],
                    "config": cfg,
                    "kind": "peft-lora",
                    "base": "aligned",
                },
            },
            "stream": {
                "budget_bytes": budget,
                "buffer_bytes": 0,
                "bytes_read": bytes_read + wp.stat().st_size,
                "bytes_written": written,
                "seconds": round(time.perf_counter() - t0, 3),
            },
            "selection": None,
            "keys": kept_keys,
            "shards": {"files": [VECTORS], "factor_files": factor_files, "max_shard_bytes": int(max_shard_mb * 1e6)},
            "degradation": read_degrade_provenance(adapter),
            "factored": factored,
            "lowrank": {
                "scale_folded_into": "B",
                "untouched": untouched,
            },
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        write_gene_card(tmp, manifest)
    return Gene.load(out)


def prune_gene(
    gene: "str | os.PathLike[str] | Gene",
    keys: "Sequence[str] | str | None" = None,
    *,
    max_shard_mb: float = DEFAULT_MAX_SHARD_MB,
    budget_mb: float = DEFAULT_BUDGET_MB,
) -> Gene:
    """Keep only ``keys`` (default: the gene's selection) in the gene, in place: the other vectors
    and factors are dropped, the kept ones copied byte for byte into new shards of at most
    ``max_shard_mb`` MB (``select --prune``). gene.json keeps the fingerprint (the pruned gene still
    fits the whole architecture), drops the other tensors' entries and records ``keys`` as
    ``extract --keys`` does; the directory is replaced atomically.

    >>> prune_gene("gene/").layer_keys()  # doctest: +SKIP
    ['layer.2', 'layer.3']
    """
    from ..gene import load_gene

    g = load_gene(gene)
    if keys is None:
        keys = g.selected_layers()
        if not keys:
            raise UsageError(f"gene {g.path} has no layer selection to prune to; run `safegene select` first (or give keys)")
    if max_shard_mb <= 0:
        raise UsageError("the shard size must be positive")
    klist = keys.split(",") if isinstance(keys, str) else list(keys)
    keep = select_keys(g.tensor_names, klist)
    names = [n for n, k in zip(g.tensor_names, keep) if k]
    if not names:
        raise UsageError(f"keys {klist} keep none of the gene's {len(g.tensor_names)} tensors")
    kept_keys = list(dict.fromkeys(k.strip() for k in klist if k.strip()))
    dense = [n for n in names if not g.is_factored(n)]
    fac_names = [n for n in names if g.is_factored(n)]
    src = g.open_vectors()
    max_bytes = int(max_shard_mb * 1e6)
    chunk = max(1 << 20, int(budget_mb * 2**20))
    out = g.path
    man = json.loads(json.dumps(g.manifest))
    with atomic_output_dir(out, overwrite=True) as tmp:
        outs = [OutTensor(n, src.tensors[n].dtype, src.tensors[n].shape, src.tensors[n].nbytes) for n in dense]
        groups = shard_groups([o.nbytes for o in outs], max_bytes)
        files = [plan_file(tmp / fn, [outs[i] for i in grp], {"format": "pt", "safegene": "gene-vectors"})
                 for fn, grp in zip(vector_shard_names(len(groups)), groups)]
        create_files(files)
        for f in files:  # the kept vectors, byte for byte (no decode, no rounding)
            fd_out = os.open(f.path, os.O_WRONLY)
            try:
                for o in f.tensors:
                    ti = src.tensors[o.name]
                    with open(ti.file, "rb") as fh_in:
                        done = 0
                        while done < o.nbytes:
                            buf = os.pread(fh_in.fileno(), min(chunk, o.nbytes - done), ti.offset + done)
                            if not buf:
                                raise GeneError(f"{ti.file}: truncated while copying {o.name!r}; the gene is damaged")
                            os.pwrite(fd_out, buf, o.offset + done)
                            done += len(buf)
            finally:
                os.close(fd_out)
        if len(files) > 1:
            wm = {o.name: f.path.name for f in files for o in f.tensors}
            (tmp / VECTORS_INDEX).write_text(json.dumps({"metadata": {"total_size": sum(o.nbytes for o in outs)},
                                                         "weight_map": wm}, indent=2) + "\n")
        factor_files: list[str] = []
        if fac_names:
            factors = {f"{n}.{s}": t for n, a, b in g.iter_factors(fac_names) for s, t in (("A", a), ("B", b))}
            factor_files = write_factor_shards(tmp, fac_names, factors, max_bytes)
        for p in g.path.iterdir():  # everything else the gene carries (plots; the card is rewritten below)
            if p.is_file() and p.name not in (MANIFEST, CARD) and not p.name.startswith(".") and \
                    not p.name.startswith(("vectors", "factors")):
                shutil.copy2(p, tmp / p.name)
        kept = set(names)
        tensors = {n: v for n, v in man["tensors"].items() if n in kept}
        tot = sum(float(v.get("tau_norm") or 0.0) ** 2 for v in tensors.values())
        rnd = sum((float(v.get("rounding_rel_error") or 0.0) * float(v.get("tau_norm") or 0.0)) ** 2 for v in tensors.values())
        man["layers"] = {n: k for n, k in man["layers"].items() if n in kept}
        man["tensors"] = tensors
        lkeys = set(man["layers"].values())
        man["layer_stats"] = {k: v for k, v in (man.get("layer_stats") or {}).items() if k in lkeys}
        man["rounding"] = dict(man.get("rounding") or {}, rel_error=math.sqrt(rnd / tot) if tot > 0 else 0.0)
        man["keys"] = kept_keys
        man["shards"] = {"files": [f.path.name for f in files], "max_shard_bytes": max_bytes,
                         **({"factor_files": factor_files} if fac_names or g.factored else {})}
        if g.factored:
            man["factored"] = {n: v for n, v in man["factored"].items() if n in kept}
        if man.get("selection"):
            man["selection"]["pruned"] = True
        write_json_atomic(tmp / MANIFEST, man)
        write_gene_card(tmp, man)  # the old card described the tensors that were just dropped
    return Gene.load(out)


def write_factor_shards(directory: Path, names: Sequence[str], factors: "dict[str, torch.Tensor]", max_bytes: int) -> list[str]:
    """Write ``<name>.A``/``<name>.B`` of ``names`` (in order) as ``factors.safetensors``, or as
    ``factors-0000i-of-0000N.safetensors`` of at most ``max_bytes`` each plus the index when they do
    not fit one file (a tensor's two factors always share a shard); return the file names."""
    from safetensors.torch import save_file

    sizes = [factors[f"{n}.A"].nbytes + factors[f"{n}.B"].nbytes for n in names]
    groups = shard_groups(sizes, max_bytes)
    fnames = factor_shard_names(len(groups))
    wm: dict[str, str] = {}
    for fn, grp in zip(fnames, groups):
        part = {f"{names[i]}.{s}": factors[f"{names[i]}.{s}"] for i in grp for s in ("A", "B")}
        save_file(part, str(directory / fn), metadata={"format": "pt", "safegene": "gene-factors"})
        wm.update({k: fn for k in part})
    if len(fnames) > 1:
        (directory / FACTORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": wm}, indent=2) + "\n")
    return fnames


def _aligned_stats(t: TensorInfo, a64: "torch.Tensor", b64: "torch.Tensor", budget: int) -> tuple[float, float, int]:
    """‖W‖², ⟨W, B·A⟩ and W's non-finite count for the aligned weight W, read in row blocks of at
    most ``budget`` bytes (as float64) without forming B·A: ⟨W, B·A⟩ = Σ (W Aᵀ) ⊙ B."""
    import torch
    from safetensors import safe_open

    rows, cols = int(b64.shape[0]), int(a64.shape[1])
    step = max(1, budget // max(1, 8 * cols * 2))
    w_sq = w_tau = 0.0
    nf = 0
    at = a64.T.contiguous()
    with safe_open(str(t.file), framework="pt", device="cpu") as fh:
        sl = fh.get_slice(t.name)
        for r0 in range(0, rows, step):
            w = sl[r0: r0 + step].to(torch.float64)
            fin = torch.isfinite(w)
            nf += int((~fin).sum())
            w = torch.where(fin, w, torch.zeros((), dtype=torch.float64))
            w_sq += float((w * w).sum())
            w_tau += float(((w @ at) * b64[r0: r0 + step]).sum())
    return w_sq, w_tau, nf


__all__ = ["extract", "extract_from_adapter", "prune_gene", "select_keys", "shard_groups", "write_factor_shards"]
