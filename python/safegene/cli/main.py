"""``safegene <command>``: the command-line interface.

Every command is a :class:`~safegene.cli.options.Command` in a ``cmd_<name>`` module: an options
dataclass the parser is generated from, and a handler ``handle_<name>(opts) -> int`` that maps it
onto a Python API function. The modules are imported by name below, so a missing one is an
ImportError, never a silently dropped command. Failures print one line ``error: …`` to stderr
and exit 1 (2 for usage errors, as argparse does); ``--debug`` shows the traceback.
``--log-level`` sets what the ``safegene.*`` loggers print to stderr (progress bars are separate).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from .._version import __version__
from ..errors import SafeGeneError, UsageError
from . import (
    cmd_apply,
    cmd_calibrate,
    cmd_degrade,
    cmd_demo,
    cmd_eval,
    cmd_export_lora,
    cmd_export_mergekit,
    cmd_extract,
    cmd_inspect,
    cmd_organism,
    cmd_push,
    cmd_run,
    cmd_select,
)
from .options import Command, register_commands

#: Every command, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = tuple(m.COMMAND for m in (
    cmd_degrade, cmd_extract, cmd_apply, cmd_eval, cmd_organism, cmd_select, cmd_calibrate, cmd_demo, cmd_export_lora,
    cmd_export_mergekit, cmd_inspect, cmd_push, cmd_run,
))


#: ``--log-level`` choices, mapped onto :mod:`logging` levels.
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger(__name__)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of the record (test
    harnesses and notebooks swap it), never to a stream captured once and closed since."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(level: str = "warning") -> None:
    """Send the ``safegene`` loggers at ``level`` and above to stderr, as ``LEVEL name: message``
    (one handler, however often it is called; other libraries' loggers are left alone).

    >>> configure_logging("info")  # doctest: +SKIP
    """
    root = logging.getLogger("safegene")
    root.setLevel(level.upper())
    if not any(getattr(h, "_safegene", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._safegene = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    """The ``safegene`` parser: one subcommand per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="safegene", description="Restore the safety of fine-tuned LLMs with a reusable safety gene.")
    parser.add_argument("--version", action="version", version=f"safegene {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # SUPPRESS: absent from the namespace unless given, so the per-command namespaces stay exactly
    # their options dataclasses
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="what safegene logs to stderr: debug, info, warning (default) or error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_commands(sub, COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "warning"))
    log.debug("safegene %s: %s", __version__, " ".join(argv))
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
