"""``safegene extract``: stream two checkpoints into a gene, or keep a LoRA degrade's τ factored.

``extract ALIGNED DEGRADED -o GENE`` writes a dense gene; ``extract ALIGNED ALIGNED+ADAPTER -o GENE``
and ``extract --from-adapter ADAPTER [--base ALIGNED] -o GENE`` write a low-rank gene (format
version 2: τ = −s·B·A stored as factors, see :mod:`safegene.gene`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UsageError
from ..gene import Gene
from ..ops.extract import extract, extract_from_adapter
from .options import Command, StreamOptions, option


@dataclass(kw_only=True)
class ExtractOptions(StreamOptions):
    aligned: str | None = option(None, positional=True, help="safety-aligned model directory or .safetensors file "
                                                             "(omit with --from-adapter)")
    degraded: str | None = option(None, positional=True,
                                  help="the same model after a brief safety-eroding fine-tune, or ALIGNED+ADAPTER_DIR for a "
                                       "LoRA degrade (a low-rank gene)")
    output: str = option(short="-o", help="gene directory to create")
    from_adapter: str | None = option(None, metavar="ADAPTER_DIR",
                                      help="a PEFT LoRA degrade of the aligned model: write a low-rank gene from its factors")
    base: str | None = option(None, metavar="ALIGNED",
                              help="with --from-adapter: the aligned model (default: the adapter's base_model_name_or_path)")
    dtype: str = option("F32", choices=("F32", "BF16", "F16", "f32", "bf16", "f16"),
                        help="storage dtype of tau (default F32: lossless)")
    keys: str | None = option(None, metavar="K1,K2",
                              help="keep only these vectors: coefficient keys (layer.3, embed, final_norm, lm_head, other) "
                                   "or tensor names, comma-separated")
    max_shard_mb: float = option(5000.0, help="largest vector (or factor) file in MB (default 5000, i.e. 5 GB); larger genes "
                                              "are written as vectors-0000i-of-0000N.safetensors (factors-…) with an index")


def _run(opts: ExtractOptions) -> Gene:
    if opts.from_adapter is not None:
        if opts.aligned is not None or opts.degraded is not None:
            raise UsageError("--from-adapter takes no ALIGNED/DEGRADED arguments; give the aligned model with --base")
        return extract_from_adapter(
            opts.from_adapter, opts.output, base=opts.base, dtype=opts.dtype, budget_mb=opts.budget_mb,
            overwrite=opts.overwrite, allow_nonfinite=opts.allow_nonfinite, keys=opts.keys, max_shard_mb=opts.max_shard_mb,
        )
    if opts.base is not None:
        raise UsageError("--base goes with --from-adapter; otherwise give ALIGNED DEGRADED")
    if opts.aligned is None or opts.degraded is None:
        raise UsageError("give ALIGNED DEGRADED (or ALIGNED ALIGNED+ADAPTER_DIR), or --from-adapter ADAPTER_DIR")
    return extract(
        opts.aligned, opts.degraded, opts.output, dtype=opts.dtype, budget_mb=opts.budget_mb,
        overwrite=opts.overwrite, allow_nonfinite=opts.allow_nonfinite, progress=not opts.quiet,
        keys=opts.keys, max_shard_mb=opts.max_shard_mb,
    )


def handle_extract(opts: ExtractOptions) -> int:
    g = _run(opts)
    m = g.manifest
    fac = g.factored
    summary = {
        "gene": str(g.path), "tensors": len(m["layers"]), "layers": g.num_layers, "storage_dtype": g.storage_dtype,
        "rounding_rel_error": m["rounding"]["rel_error"], "seconds": m["stream"]["seconds"],
        "files": [f.name for f in g.vector_files], "factor_files": [f.name for f in g.factor_files], "keys": m.get("keys"),
        "degraded_refusal_rate": (m.get("degradation") or {}).get("refusal_rate"),
        "format_version": m["format_version"], "factored": len(fac),
        "ranks": sorted({int(v["rank"]) for v in fac.values()}),
    }
    if opts.json:
        print(json.dumps(summary))
    else:
        low = (f" ({len(fac)} factored, rank {'/'.join(map(str, summary['ranks']))}; "
               f"{len((m.get('lowrank') or {}).get('untouched') or [])} untouched tensors have τ = 0)") if fac else ""
        print(
            f"wrote gene {g.path}: {summary['tensors']} vectors{low} over {summary['layers']} layers, "
            f"{g.storage_dtype} (relative rounding error {summary['rounding_rel_error']:.2e}), {summary['seconds']:.2f} s"
            + (f", {len(summary['files'])} shards" if len(summary["files"]) > 1 else "")
            + (f", {len(summary['factor_files'])} factor shards" if len(summary["factor_files"]) > 1 else "")
        )
    return 0


COMMAND = Command("extract", ExtractOptions, handle_extract,
                  help="stream two checkpoints into a gene (tau = aligned - degraded); low-rank from a LoRA degrade")
register_cli = COMMAND.register
