"""``safegene export-mergekit``: the mergekit task-arithmetic YAML equivalent to an ``apply``."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..ops.export_mergekit import MERGEKIT_DTYPES, export_mergekit
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class ExportMergekitOptions(CommonOptions):
    coeffs: str = option(positional=True, help="COEFFS.json (or a Hub id of a coefficients repository)")
    gene: str = option(help="gene directory (or a Hub id)")
    output: str = option(short="-o", help="YAML file to write")
    target: str | None = option(None, help="task model to patch (default: the one named in COEFFS.json)")
    aligned: str | None = option(None, help="aligned model (default: the gene's recorded source)")
    degraded: str | None = option(None, help="degraded model, mergekit's base (default: the gene's recorded source)")
    out_dtype: str | None = option(None, choices=tuple(MERGEKIT_DTYPES.values()),
                                   help="output dtype (default: the target's)")
    overwrite: bool = option(False, help="replace the output if it exists")


def handle_export_mergekit(opts: ExportMergekitOptions) -> int:
    from ..gene import Gene

    cfg = export_mergekit(opts.coeffs, opts.output, gene=Gene.from_pretrained(opts.gene), target=opts.target,
                          aligned=opts.aligned, degraded=opts.degraded, out_dtype=opts.out_dtype, overwrite=opts.overwrite)
    n = len(cfg["models"][1]["parameters"]["weight"]) - 1
    if opts.json:
        print(json.dumps({"output": opts.output, "base_model": cfg["base_model"], "filters": n}))
    else:
        print(f"wrote {opts.output}: task_arithmetic on base {cfg['base_model']} with {n} weight filters; "
              f"run `mergekit-yaml {opts.output} OUT_DIR`")
    return 0


COMMAND = Command(
    "export-mergekit", ExportMergekitOptions, handle_export_mergekit,
    help="write the mergekit task_arithmetic YAML that reproduces `safegene apply` with these coefficients",
    description="Base = the degraded model; the target at weight 1 and the aligned model at weight λ per layer "
    "(mergekit weight filters), so mergekit computes target + Σ λ (aligned − degraded).",
)
register_cli = COMMAND.register
