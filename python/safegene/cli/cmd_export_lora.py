"""``safegene export-lora``: the gene as a PEFT LoRA adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..ops.export_lora import SIDECAR, export_lora
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class ExportLoraOptions(CommonOptions):
    GROUPS: ClassVar[dict[str, bool]] = {"rank": False, "lam": False}

    gene: str = option(positional=True, help="gene directory, or a Hub id org/name[@revision]")
    output: str = option(short="-o", help="adapter directory to create")
    rank: int | None = option(None, group="rank", help="rank R per module (capped at min(out, in)); dense tensors need "
                                                       "--rank or --energy, a low-rank gene's factors export exactly without")
    energy: float | None = option(None, group="rank", help="per-module rank keeping this fraction of sum σ² (0 < E ≤ 1)")
    coeffs: str | None = option(None, group="lam", path="in",
                                help="COEFFS.json (missing keys = 0); default λ = 1 on the gene's selected layers, or all")
    scale: float | None = option(None, group="lam", help="one uniform λ for every tensor")
    dtype: str = option("F32", choices=("F32", "BF16", "F16"), help="storage dtype of A and B (default F32)")
    base_model: str | None = option(None, help="base_model_name_or_path to record for AutoPeftModelForCausalLM (default: "
                                               "the gene's aligned model when it came from the Hub, with its commit; "
                                               "the adapter fits any model of the gene's family)")
    overwrite: bool = option(False, help="replace the output if it exists")


def handle_export_lora(opts: ExportLoraOptions) -> int:
    info = export_lora(
        opts.gene, opts.output, coeffs=opts.coeffs, rank=opts.rank, energy=opts.energy,
        base_model_name_or_path=opts.base_model, scale=opts.scale, dtype=opts.dtype,
        overwrite=opts.overwrite, progress=not opts.quiet,
    )
    if opts.json:
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


COMMAND = Command(
    "export-lora", ExportLoraOptions, handle_export_lora,
    help="write the gene (λ·τ) as a standard PEFT LoRA adapter (truncated SVD per linear weight; a low-rank "
         "gene's factors exactly)",
    description="Write λ·τ as a PEFT LoRA adapter: truncated SVD of each dense linear weight's delta (--rank or "
    "--energy), a low-rank gene's factors as they are (exact, no rank needed); norms and embeddings are dropped and reported.",
)
register_cli = COMMAND.register
