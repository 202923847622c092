"""``safegene apply``: write target + Σ λ τ as new checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UsageError
from ..ops.apply import apply
from .options import Command, StreamOptions, option


@dataclass(kw_only=True)
class ApplyOptions(StreamOptions):
    GROUPS: ClassVar[dict[str, bool]] = {"lam": True}

    gene: str = option(positional=True, help="gene directory from `safegene extract`, or a Hub id org/name[@revision]")
    target: list[str] = option(positional=True, help="task model directory, or BASE+LORA_DIR (several allowed: "
                                                     "the gene is read once per target)")
    output: list[str] = option(short="-o", repeat=True, help="output directory (one per target, repeat -o)")
    scale: float | None = option(None, group="lam", help="one uniform coefficient for every tensor (RESTA)")
    coeffs: str | None = option(None, group="lam", path="in",
                                help="COEFFS.json from `safegene calibrate` (missing keys = 0)")


def handle_apply(opts: ApplyOptions) -> int:
    if len(opts.target) != len(opts.output):
        raise UsageError(f"{len(opts.target)} targets but {len(opts.output)} outputs: give one -o per target")
    res = apply(
        opts.gene, list(opts.target), list(opts.output), scale=opts.scale, coeffs=opts.coeffs, budget_mb=opts.budget_mb,
        overwrite=opts.overwrite, allow_nonfinite=opts.allow_nonfinite, progress=not opts.quiet,
    )
    for r in res:
        if opts.json:
            print(json.dumps({"output": str(r.out), "patched": r.n_patched, "copied": r.n_copied,
                              "bytes": r.bytes_written, "seconds": round(r.seconds, 3)}))
        else:
            print(f"wrote {r.out}: {r.n_patched} tensors patched, {r.n_copied} copied, "
                  f"{r.bytes_written / 2**20:.1f} MiB in {r.seconds:.2f} s")
    return 0


COMMAND = Command("apply", ApplyOptions, handle_apply,
                  help="write target + sum_l lambda_l tau_l as a new HF checkpoint")
register_cli = COMMAND.register
