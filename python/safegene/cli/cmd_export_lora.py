"""``safegene export-lora``: the gene as a PEFT LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..ops.export_lora import SIDECAR, export_lora


def _cli(args: Any) -> int:
    info = export_lora(
        args.gene, args.output, coeffs=args.coeffs, rank=args.rank, energy=args.energy,
        base_model_name_or_path=args.base_model, scale=args.scale, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k not in ("modules", "dropped")}
                         | {"dropped": sorted(info["dropped"])}))
        return 0
    print(
        f"wrote LoRA adapter {info['adapter']}: {info['n_modules']} modules, max rank {info['rank_max']}, "
        f"{info['params']:,} parameters; relative error {info['rel_error']:.3e} "
        f"(worst module {info['max_module_rel_error']:.3e})"
    )
    if info["dropped"]:
        reasons: dict[str, int] = {}
        for v in info["dropped"].values():
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
        print(
            f"dropped {len(info['dropped'])} tensors that LoRA cannot carry, {100 * info['dropped_share']:.2f}% of ‖λτ‖: "
            + "; ".join(f"{c} × {r}" for r, c in reasons.items())
        )
    print(f"per-module errors in {Path(info['adapter']) / SIDECAR}")
    return 0



def register_cli(subparsers: Any) -> None:
    """Add ``safegene export-lora``."""
    p = subparsers.add_parser(
        "export-lora", help="write the gene (λ·τ) as a standard PEFT LoRA adapter (truncated SVD per linear weight)",
        description="Write λ·τ as a PEFT LoRA adapter: truncated SVD of each linear weight's delta; "
        "norms and embeddings are dropped and reported.",
    )
    p.add_argument("gene", help="gene directory")
    p.add_argument("-o", "--output", required=True, help="adapter directory to create")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank R per module (capped at min(out, in))")
    g.add_argument("--energy", type=float, help="per-module rank keeping this fraction of sum σ² (0 < E ≤ 1)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--coeffs", help="COEFFS.json (missing keys = 0); default λ = 1 on the gene's selected layers, or all")
    c.add_argument("--scale", type=float, help="one uniform λ for every tensor")
    p.add_argument("--dtype", default="F32", choices=["F32", "BF16", "F16"], help="storage dtype of A and B (default F32)")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default none: the adapter fits any model of the gene's family)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=_cli)
