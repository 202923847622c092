"""``safegene run CONFIG.yaml``: extract/select/calibrate/apply/eval from one YAML file."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from dataclasses import dataclass

from .options import Command, CommonOptions, option
from .runconfig import run_config


@dataclass(kw_only=True)
class RunOptions(CommonOptions):
    config: str = option(positional=True, metavar="CONFIG.yaml", help="the run configuration")
    dry_run: bool = option(False, help="validate and print the equivalent commands, run nothing")


def handle_run(opts: RunOptions) -> int:
    # with --json, the commands' own reports go to stderr so stdout is one JSON document
    with contextlib.redirect_stdout(sys.stderr) if opts.json else contextlib.nullcontext():
        res = run_config(opts.config, dry_run=opts.dry_run, quiet=opts.quiet)
    if opts.json:
        print(json.dumps(res))
    elif opts.dry_run:
        for c in res["commands"]:
            print("safegene " + shlex.join(c))
    else:
        print(f"ran {len(res['commands'])} commands in {res['seconds']:.1f} s; outputs: {', '.join(res['outputs']) or 'none'}")
    return 0


COMMAND = Command(
    "run", RunOptions, handle_run,
    help="run extract/select/calibrate/apply/eval from one YAML config",
    description="Each config section holds one command's options (its long flags, underscores for dashes).",
)
register_cli = COMMAND.register
