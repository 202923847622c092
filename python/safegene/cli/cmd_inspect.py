"""``safegene inspect``: per-key statistics and selection of a gene."""

from __future__ import annotations

import json
from typing import Any

from ..ops.inspection import format_gene_table, inspect_gene


def _cli(args: Any) -> int:
    info = inspect_gene(args.gene, plot=args.plot)
    if args.json:
        print(json.dumps(info))
    else:
        print(format_gene_table(info))
        if info["plot"]:
            print(f"wrote {info['plot']}")
    return 0



def register_cli(subparsers: Any) -> None:
    """Add ``safegene inspect``."""
    p = subparsers.add_parser("inspect", help="per-layer ‖τ‖, relative change, selection scores and chosen layers of a gene")
    p.add_argument("gene", help="gene directory")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="also draw the per-layer panels into this PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cli)
