"""``safegene apply``: write target + Σ λ τ as new checkpoints."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UsageError
from ..ops.apply import apply
from .options import add_stream_options


def _cmd_apply(args: argparse.Namespace) -> int:
    if len(args.target) != len(args.output):
        raise UsageError(f"{len(args.target)} targets but {len(args.output)} outputs: give one -o per target")
    res = apply(
        args.gene, list(args.target), list(args.output), scale=args.scale, coeffs=args.coeffs, budget_mb=args.budget_mb,
        overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
    )
    for r in res:
        if args.json:
            print(json.dumps({"output": str(r.out), "patched": r.n_patched, "copied": r.n_copied, "bytes": r.bytes_written, "seconds": round(r.seconds, 3)}))
        else:
            print(f"wrote {r.out}: {r.n_patched} tensors patched, {r.n_copied} copied, {r.bytes_written / 2**20:.1f} MiB in {r.seconds:.2f} s")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``safegene apply GENE TARGET [TARGET ...] -o OUT [-o OUT ...] (--scale S | --coeffs C)``."""
    p = sub.add_parser("apply", help="write target + sum_l lambda_l tau_l as a new HF checkpoint")
    p.add_argument("gene", help="gene directory from `safegene extract`")
    p.add_argument("target", nargs="+", help="task model directory (several allowed: the gene is read once per target)")
    p.add_argument("-o", "--output", action="append", required=True, help="output directory (one per target, repeat -o)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scale", type=float, help="one uniform coefficient for every tensor (RESTA)")
    g.add_argument("--coeffs", help="COEFFS.json from `safegene calibrate` (missing keys = 0)")
    add_stream_options(p)
    p.set_defaults(func=_cmd_apply)
