"""The command-line interface: one package owning every ``safegene`` command.

Imports point one way: ``main`` → ``cmd_run`` → ``runconfig`` → the other ``cmd_*`` modules →
``options``. Each ``cmd_<name>`` module holds ``<Name>Options`` (a dataclass, the one source of
the command's arguments), ``handle_<name>(opts) -> int`` and ``COMMAND``.
"""

from __future__ import annotations

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
