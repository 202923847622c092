"""``safegene extract``: stream two checkpoints into a gene."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..ops.extract import extract
from .options import add_stream_options


def _cmd_extract(args: argparse.Namespace) -> int:
    g = extract(
        args.aligned, args.degraded, args.output, dtype=args.dtype, budget_mb=args.budget_mb,
        overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
    )
    m = g.manifest
    summary = {
        "gene": str(g.path), "tensors": len(m["layers"]), "layers": g.num_layers, "storage_dtype": g.storage_dtype,
        "rounding_rel_error": m["rounding"]["rel_error"], "seconds": m["stream"]["seconds"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote gene {g.path}: {summary['tensors']} vectors over {summary['layers']} layers, "
            f"{g.storage_dtype} (relative rounding error {summary['rounding_rel_error']:.2e}), {summary['seconds']:.2f} s"
        )
    return 0


def register_cli(sub: Any) -> None:
    """Add ``safegene extract ALIGNED DEGRADED -o GENE``."""
    p = sub.add_parser("extract", help="stream two checkpoints into a gene (tau = aligned - degraded)")
    p.add_argument("aligned", help="safety-aligned model directory or .safetensors file")
    p.add_argument("degraded", help="the same model after a brief safety-eroding fine-tune")
    p.add_argument("-o", "--output", required=True, help="gene directory to create")
    p.add_argument("--dtype", default="F32", choices=["F32", "BF16", "F16", "f32", "bf16", "f16"], help="storage dtype of tau (default F32: lossless)")
    add_stream_options(p)
    p.set_defaults(func=_cmd_extract)
