"""``safegene inspect``: per-key statistics and selection of a gene."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..ops.inspection import format_gene_table, inspect_gene
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class InspectOptions(CommonOptions):
    gene: str = option(positional=True, help="gene directory, or a Hub id org/name[@revision]")
    plot: str | None = option(None, metavar="OUT.png", path="out", help="also draw the per-layer panels into this PNG")


def handle_inspect(opts: InspectOptions) -> int:
    # inspect reads one small JSON file and shows no progress: --quiet is accepted for uniformity
    info = inspect_gene(opts.gene, plot=opts.plot)
    if opts.json:
        print(json.dumps(info))
    else:
        print(format_gene_table(info))
        if info["plot"]:
            print(f"wrote {info['plot']}")
    return 0


COMMAND = Command("inspect", InspectOptions, handle_inspect,
                  help="per-layer ‖τ‖, relative change, selection scores and chosen layers of a gene")
register_cli = COMMAND.register
