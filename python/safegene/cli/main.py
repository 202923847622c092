"""``safegene <command>``: the command-line interface.

Every command maps onto a Python API function. Failures print one line ``error: …`` to stderr
and exit 1 (2 for usage errors, as argparse does); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .._version import __version__
from ..errors import SafeGeneError, UsageError
from . import (
    cmd_apply,
    cmd_calibrate,
    cmd_demo,
    cmd_eval,
    cmd_export_lora,
    cmd_extract,
    cmd_inspect,
    cmd_organism,
    cmd_select,
    runconfig,
)

#: Every command module, in the order ``--help`` lists them; each adds its subcommand.
COMMANDS = (cmd_extract, cmd_apply, cmd_eval, cmd_organism, cmd_select, cmd_calibrate, cmd_demo, cmd_export_lora,
            cmd_inspect, runconfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safegene", description="Restore the safety of fine-tuned LLMs with a reusable safety gene.")
    parser.add_argument("--version", action="version", version=f"safegene {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for mod in COMMANDS:
        mod.register_cli(sub)
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
