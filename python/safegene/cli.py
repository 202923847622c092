"""``safegene <command>``: the command-line interface.

Every command maps onto a Python API function. Failures print one line ``error: …`` to stderr
and exit 1 (2 for usage errors, as argparse does); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from . import __version__
from .errors import SafeGeneError, UsageError

#: Modules that add their own subcommands through ``register_cli(subparsers)``.
COMMAND_MODULES = ("evaluate", "organism", "select", "calibrate", "demo", "lora", "inspect", "runconfig")


def _budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-mb", type=float, default=128, help="memory budget for streaming buffers, MiB (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists (written aside, swapped in at the end)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract

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


def _cmd_apply(args: argparse.Namespace) -> int:
    from .apply import apply

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safegene", description="Restore the safety of fine-tuned LLMs with a reusable safety gene.")
    parser.add_argument("--version", action="version", version=f"safegene {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("extract", help="stream two checkpoints into a gene (tau = aligned - degraded)")
    p.add_argument("aligned", help="safety-aligned model directory or .safetensors file")
    p.add_argument("degraded", help="the same model after a brief safety-eroding fine-tune")
    p.add_argument("-o", "--output", required=True, help="gene directory to create")
    p.add_argument("--dtype", default="F32", choices=["F32", "BF16", "F16", "f32", "bf16", "f16"], help="storage dtype of tau (default F32: lossless)")
    _budget(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("apply", help="write target + sum_l lambda_l tau_l as a new HF checkpoint")
    p.add_argument("gene", help="gene directory from `safegene extract`")
    p.add_argument("target", nargs="+", help="task model directory (several allowed: the gene is read once per target)")
    p.add_argument("-o", "--output", action="append", required=True, help="output directory (one per target, repeat -o)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scale", type=float, help="one uniform coefficient for every tensor (RESTA)")
    g.add_argument("--coeffs", help="COEFFS.json from `safegene calibrate` (missing keys = 0)")
    _budget(p)
    p.set_defaults(func=_cmd_apply)

    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{mod}":
                raise
            continue
        reg = getattr(m, "register_cli", None)
        if reg is not None:
            reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SafeGeneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
