"""The command-line interface: one package owning every ``safegene`` command.

``main`` parses ``safegene <command> ...`` and maps each command onto its Python API function.
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
