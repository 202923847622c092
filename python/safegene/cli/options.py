"""Option groups shared by several commands."""

from __future__ import annotations

import argparse


def add_stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-mb", type=float, default=128, help="memory budget for streaming buffers, MiB (default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists (written aside, swapped in at the end)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep NaN/Inf values instead of refusing them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
