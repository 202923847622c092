"""The CLI's shape: every command from one options dataclass, the same shared flags everywhere,
no command silently missing."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

from safegene import cli
from safegene.cli import options
from safegene.cli.main import COMMANDS
from safegene.cli.options import CommonOptions, specs, to_argv

NAMES = [c.name for c in COMMANDS]


def _minimal_argv(command: options.Command) -> list[str]:
    """The command name plus a placeholder for every required argument (one per required group)."""
    argv = command.name.split()
    groups_done: set[str] = set()
    for s in specs(command.options):
        if s.arg.group is not None:
            if command.options.GROUPS[s.arg.group] and s.arg.group not in groups_done:
                groups_done.add(s.arg.group)
                argv += [s.flag, "1"]
            continue
        if s.arg.positional:
            argv.append("X")
        elif s.required:
            argv += [s.flag, "1" if s.kind in ("int", "float") else "X"]
    return argv


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_every_command_takes_quiet_and_json(command, capsys):
    assert issubclass(command.options, CommonOptions)
    with pytest.raises(SystemExit) as ei:
        cli.build_parser().parse_args([*command.name.split(), "--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    assert "--quiet" in text and "--json" in text
    assert "--no-progress" not in text and "--out " not in text  # deprecated spellings stay hidden
    ns = cli.build_parser().parse_args(_minimal_argv(command) + ["--quiet", "--json"])
    opts = options.from_namespace(command.options, ns)
    assert opts.quiet is True and opts.json is True


@pytest.mark.parametrize("command", COMMANDS, ids=NAMES)
def test_parser_and_dataclass_are_one_thing(command):
    """The parsed namespace holds exactly the dataclass fields (plus the dispatch entries), each
    output path is -o/--output, and the handler is handle_<command>."""
    ns = cli.build_parser().parse_args(_minimal_argv(command))
    dispatch = {"command", "debug", "func"} | {f"{command.name.split()[0]}_command"}
    assert set(vars(ns)) - dispatch == {f.name for f in dataclasses.fields(command.options)}
    for s in specs(command.options):
        if s.name == "output":
            assert s.arg.short == "-o"
    assert command.handler.__name__ == "handle_" + command.name.replace(" ", "_").replace("-", "_")
    assert command.options.__name__.endswith("Options")
    # rendering the options back gives a command line that parses to the same options
    opts = options.from_namespace(command.options, ns)
    again = options.from_namespace(command.options, cli.build_parser().parse_args(to_argv(command, opts)))
    assert again == opts


def test_every_command_module_is_registered():
    here = Path(cli.__file__).parent
    modules = {p.stem for p in here.glob("cmd_*.py")}
    assert modules == {c.handler.__module__.rsplit(".", 1)[1] for c in COMMANDS}


def test_a_missing_command_module_fails_loudly(monkeypatch):
    """A packaging mistake that drops a command module is an ImportError, not a missing command."""
    monkeypatch.setitem(sys.modules, "safegene.cli.cmd_inspect", None)  # None: "cannot be imported"
    monkeypatch.delattr(cli, "cmd_inspect")  # else `from . import cmd_inspect` finds the attribute
    monkeypatch.delitem(sys.modules, "safegene.cli.main")
    with pytest.raises(ImportError, match="cmd_inspect"):
        importlib.import_module("safegene.cli.main")


def test_shared_flags_and_deprecated_spellings():
    p = cli.build_parser()
    assert options.from_namespace(cli.cmd_demo.DemoOptions, p.parse_args(["demo", "--out", "X"])).output == "X"
    assert p.parse_args(["demo", "-o", "Y"]).output == "Y"
    assert p.parse_args(["eval", "M", "--no-progress"]).quiet is True
    assert p.parse_args(["organism", "build", "--no-progress"]).quiet is True
    ev = p.parse_args(["eval", "M", "-o", "r.json", "--json"])
    assert ev.output == "r.json" and ev.json is True
    for argv in (["select", "G", "--aligned", "A", "--degraded", "D", "--harmful", "H", "--benign", "B"],
                 ["calibrate", "G", "T", "--safety", "S", "-o", "C.json"]):
        a = p.parse_args(argv + ["--quiet", "--json"])
        assert a.quiet and a.json


def test_options_declarations_are_checked():
    @dataclasses.dataclass(kw_only=True)
    class Bad(CommonOptions):
        x: dict = options.option(None, help="no such kind")

    with pytest.raises(TypeError, match="unsupported option type"):
        specs(Bad)

    @dataclasses.dataclass(kw_only=True)
    class Plain(CommonOptions):
        y: int = 3

    with pytest.raises(TypeError, match="declare options with"):
        specs(Plain)
