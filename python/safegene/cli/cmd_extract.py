"""``safegene extract``: stream two checkpoints into a gene."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..ops.extract import extract
from .options import Command, StreamOptions, option


@dataclass(kw_only=True)
class ExtractOptions(StreamOptions):
    aligned: str = option(positional=True, help="safety-aligned model directory or .safetensors file")
    degraded: str = option(positional=True, help="the same model after a brief safety-eroding fine-tune")
    output: str = option(short="-o", help="gene directory to create")
    dtype: str = option("F32", choices=("F32", "BF16", "F16", "f32", "bf16", "f16"),
                        help="storage dtype of tau (default F32: lossless)")
    keys: str | None = option(None, metavar="K1,K2",
                              help="keep only these vectors: coefficient keys (layer.3, embed, final_norm, lm_head, other) "
                                   "or tensor names, comma-separated")
    max_shard_mb: float = option(5000.0, help="largest vector file in MB (default 5000, i.e. 5 GB); larger genes are "
                                              "written as vectors-0000i-of-0000N.safetensors with an index")


def handle_extract(opts: ExtractOptions) -> int:
    g = extract(
        opts.aligned, opts.degraded, opts.output, dtype=opts.dtype, budget_mb=opts.budget_mb,
        overwrite=opts.overwrite, allow_nonfinite=opts.allow_nonfinite, progress=not opts.quiet,
        keys=opts.keys, max_shard_mb=opts.max_shard_mb,
    )
    m = g.manifest
    summary = {
        "gene": str(g.path), "tensors": len(m["layers"]), "layers": g.num_layers, "storage_dtype": g.storage_dtype,
        "rounding_rel_error": m["rounding"]["rel_error"], "seconds": m["stream"]["seconds"],
        "files": [f.name for f in g.vector_files], "keys": m.get("keys"),
        "degraded_refusal_rate": (m.get("degradation") or {}).get("refusal_rate"),
    }
    if opts.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote gene {g.path}: {summary['tensors']} vectors over {summary['layers']} layers, "
            f"{g.storage_dtype} (relative rounding error {summary['rounding_rel_error']:.2e}), {summary['seconds']:.2f} s"
            + (f", {len(summary['files'])} shards" if len(summary["files"]) > 1 else "")
        )
    return 0


COMMAND = Command("extract", ExtractOptions, handle_extract,
                  help="stream two checkpoints into a gene (tau = aligned - degraded)")
register_cli = COMMAND.register
