"""Typed command options: one dataclass per command, from which argparse is generated.

A command is a :class:`Command`: a name, an options dataclass and a handler
``handle_<command>(opts) -> int``. Every field of the dataclass is declared with
:func:`option` (help text, flags, choices, which file it names) and *is* the argument: the
parser is built from the fields (:func:`add_arguments`), a parsed namespace becomes the
dataclass (:meth:`Command.from_namespace`), a run config fills the same dataclass
(:mod:`safegene.cli.runconfig`) and :func:`to_argv` renders any instance back as the command
line that gives it. So the CLI, ``safegene run CONFIG.yaml`` and ``--dry-run`` cannot drift.

Shared option groups are base classes: :class:`CommonOptions` (``--quiet``, ``--json``, on
every command), :class:`StreamOptions` (``--budget-mb``, ``--overwrite``,
``--allow-nonfinite``, for the streaming commands) and :class:`ModelOptions` (``--device``,
``--dtype``, ``--device-map``, ``--max-memory``, ``--offload-dir``, for the commands that load a
model).

>>> from safegene.cli.cmd_extract import COMMAND
>>> opts = COMMAND.parse(["A/", "D/", "-o", "gene/", "--quiet"])
>>> to_argv(COMMAND, opts)
['extract', 'A/', 'D/', '-o', 'gene/', '--quiet']
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

#: The key under which :func:`option` stores its :class:`Arg` in a field's metadata.
META = "safegene.cli"
#: Shared option groups, in the order help lists them and command lines render them
#: (after the command's own options).
SECTIONS = {"model": "model loading options", "stream": "streaming options", "common": "common options"}
#: ``--dtype`` choices (:data:`safegene.lm.DTYPES`; spelled out here so that building the parser
#: does not import the model stack).
DTYPES = ("auto", "bf16", "f16", "f32")


@dataclass(frozen=True)
class Arg:
    """How one options field appears on the command line and in a run config."""

    help: str
    positional: bool = False
    short: str | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    #: lists only: ``--x A --x B`` (True) rather than ``--x A B``
    repeat: bool = False
    #: name of a mutually exclusive group (see ``Options.GROUPS``)
    group: str | None = None
    #: "in": a file that must exist; "out": a file to write (run configs resolve both)
    path: str | None = None
    #: deprecated spellings, accepted but hidden from --help
    aliases: tuple[str, ...] = ()
    #: a shared group (a key of SECTIONS); None for the command's own options
    section: str | None = None


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Any = MISSING,
    positional: bool = False,
    short: str | None = None,
    choices: Iterable[Any] | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    group: str | None = None,
    path: str | None = None,
    aliases: Sequence[str] = (),
    section: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line argument; no default means required."""
    arg = Arg(help=help, positional=positional, short=short, choices=None if choices is None else tuple(choices),
              metavar=metavar, repeat=repeat, group=group, path=path, aliases=tuple(aliases), section=section)
    return field(default=default, default_factory=default_factory, metadata={META: arg})


@dataclass(kw_only=True)
class Options:
    """Base of every command's options. ``GROUPS`` maps a mutually exclusive group to whether
    one of its options is required."""

    GROUPS: ClassVar[dict[str, bool]] = {}


@dataclass(kw_only=True)
class CommonOptions(Options):
    """``--quiet`` and ``--json``: every command takes both."""

    quiet: bool = option(False, help="no progress bar or progress messages", section="common",
                         aliases=("--no-progress",))
    json: bool = option(False, help="print a machine-readable JSON summary on stdout", section="common")


@dataclass(kw_only=True)
class StreamOptions(CommonOptions):
    """The streaming commands' memory budget and output policy."""

    budget_mb: float = option(128.0, help="memory budget for streaming buffers, MiB (default 128)", section="stream")
    overwrite: bool = option(False, help="replace the output if it exists (written aside, swapped in at the end)",
                             section="stream")
    allow_nonfinite: bool = option(False, help="keep NaN/Inf values instead of refusing them", section="stream")


@dataclass(kw_only=True)
class ModelOptions(CommonOptions):
    """How the commands that run a model (select, calibrate, eval and its guard judge) load it:
    :func:`safegene.lm.load_model`'s knobs."""

    device: str | None = option(None, section="model",
                                help="torch device for the whole model (default: cuda when available, else cpu); "
                                     "ignored with --device-map")
    dtype: str = option("auto", choices=DTYPES, section="model",
                        help="weights dtype: auto (the checkpoint's own, default), bf16, f16 or f32")
    device_map: str | None = option(None, metavar="MAP", section="model",
                                    help="dispatch with accelerate: auto, balanced, balanced_low_0, sequential, a "
                                         "device, or a JSON map of module name -> device (text or a .json file)")
    max_memory: str | None = option(None, metavar="DEV=SIZE,...", section="model",
                                    help="memory cap per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                                         "(or a JSON object)")
    offload_dir: str | None = option(None, metavar="DIR", section="model",
                                     help="where --device-map offloads weights that fit on no device")

    def load_kwargs(self) -> dict[str, Any]:
        """The keywords for :func:`safegene.lm.load_model` and the API functions that load a model."""
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map,
                "max_memory": self.max_memory, "offload_dir": self.offload_dir}


# ---- introspection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One field of an options class, resolved: name, kind, default and its :class:`Arg`."""

    name: str
    kind: str  # "bool" | "int" | "float" | "str" | "list"
    item: str  # element kind of a list ("str" | "int" | "float"); the kind itself otherwise
    optional: bool  # None is an allowed value
    required: bool
    default: Any
    arg: Arg

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> list[str]:
        return ([self.arg.short] if self.arg.short else []) + [self.flag]


_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}
_SPECS: dict[type, tuple[Spec, ...]] = {}


def _kind_of(tp: Any, where: str) -> tuple[str, str, bool]:
    optional = False
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X] / X | None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: unsupported option type {tp!r}")
        tp, optional = rest[0], True
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (str,)
        if inner not in _KINDS or inner is bool:
            raise TypeError(f"{where}: unsupported list element type {inner!r}")
        return "list", _KINDS[inner], optional
    if tp not in _KINDS:
        raise TypeError(f"{where}: unsupported option type {tp!r}")
    return _KINDS[tp], _KINDS[tp], optional


def specs(cls: type) -> tuple[Spec, ...]:
    """The fields of an options dataclass as :class:`Spec` objects, in declaration order."""
    if cls in _SPECS:
        return _SPECS[cls]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        arg = f.metadata.get(META)
        if arg is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare options with safegene.cli.options.option()")
        kind, item, optional = _kind_of(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default is not MISSING:
            default, required = f.default, False
        elif f.default_factory is not MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        if kind == "bool" and (required or default is not False):
            raise TypeError(f"{cls.__name__}.{f.name}: a bool option is a flag and must default to False")
        if arg.group is not None and arg.group not in cls.GROUPS:
            raise TypeError(f"{cls.__name__}.{f.name}: group {arg.group!r} is not in {cls.__name__}.GROUPS")
        out.append(Spec(f.name, kind, item, optional, required, default, arg))
    _SPECS[cls] = tuple(out)
    return _SPECS[cls]


# ---- argparse --------------------------------------------------------------------------------

_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _add(container: Any, s: Spec) -> None:
    a = s.arg
    kw: dict[str, Any] = {"help": a.help}
    if s.kind == "bool":
        kw["action"] = "store_true"
    else:
        kw["type"] = _TYPES[s.item]
        if a.choices is not None:
            kw["choices"] = a.choices
        if a.metavar:
            kw["metavar"] = a.metavar
        if s.kind == "list":
            if a.repeat:
                kw["action"] = "append"
            else:
                kw["nargs"] = "+"
    if a.positional:
        kw.setdefault("metavar", s.name.upper())
        if not s.required and s.kind != "list":  # a positional with a default may be left out
            kw["nargs"] = "?"
            kw["default"] = s.default
        container.add_argument(s.name, **kw)
        return
    kw["dest"] = s.name
    if s.required:
        kw["required"] = True
    else:
        # append would extend the default list in place: start from None, from_namespace fills it in
        kw["default"] = None if (s.kind == "list" and a.repeat) else s.default
    container.add_argument(*s.flags, **kw)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of ``cls`` (positionals, own options, exclusive groups,
    then the shared groups as argument groups; deprecated aliases hidden)."""
    all_specs = specs(cls)
    groups = {name: parser.add_mutually_exclusive_group(required=req) for name, req in cls.GROUPS.items()}
    sections = {}
    for key, title in SECTIONS.items():
        if any(s.arg.section == key for s in all_specs):
            sections[key] = parser.add_argument_group(title)
    for s in sorted(all_specs, key=_render_rank):
        if s.arg.group is not None:
            container = groups[s.arg.group]
        elif s.arg.section is not None:
            container = sections[s.arg.section]
        else:
            container = parser
        _add(container, s)
    for s in all_specs:
        for alias in s.arg.aliases:
            kw: dict[str, Any] = {"dest": s.name, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
            if s.kind == "bool":
                kw["action"] = "store_true"
            elif s.kind == "list":
                raise TypeError(f"{cls.__name__}.{s.name}: aliases of list options are not supported")
            else:
                kw["type"] = _TYPES[s.item]
            parser.add_argument(alias, **kw)


def _render_rank(s: Spec) -> tuple[int, int]:
    order = list(SECTIONS)
    return (0 if s.arg.positional else 1, 0 if s.arg.section is None else 1 + order.index(s.arg.section))


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The options dataclass ``cls`` filled from a parsed namespace."""
    values = {}
    for s in specs(cls):
        v = getattr(ns, s.name)
        if s.kind == "list" and v is None and not s.optional:
            v = s.default
        values[s.name] = list(v) if isinstance(v, list) else v  # never share a default list
    return cls(**values)


def to_argv(command: "Command", opts: Any) -> list[str]:
    """The command line (without the program name) whose parse gives ``opts``: positionals,
    then every option whose value differs from its default (own options first)."""
    argv = command.name.split()
    for s in sorted(specs(type(opts)), key=_render_rank):
        v = getattr(opts, s.name)
        if s.arg.positional:
            if v is None and not s.required:
                continue
            argv += [_text(x) for x in v] if isinstance(v, list) else [_text(v)]
            continue
        if not s.required and v == s.default:
            continue
        flag = s.arg.short or s.flag
        if s.kind == "bool":
            argv.append(flag)
        elif s.kind == "list":
            if s.arg.repeat:
                for x in v:
                    argv += [flag, _text(x)]
            else:
                argv += [flag, *map(_text, v)]
        else:
            argv += [flag, _text(v)]
    return argv


def _text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


# ---- commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``safegene`` command: ``name`` ("extract", or "organism build" for a subcommand),
    its options dataclass and ``handler(opts) -> int``."""

    name: str
    options: type
    handler: Callable[[Any], int]
    help: str
    description: str | None = None

    def invoke(self, ns: argparse.Namespace) -> int:
        """Run the handler on a parsed namespace (set as the parser's ``func`` default)."""
        return int(self.handler(from_namespace(self.options, ns)) or 0)

    def register(self, subparsers: Any) -> argparse.ArgumentParser:
        """Add this command to an argparse subparsers action; return its parser."""
        return register_commands(subparsers, [self])[self.name]

    def parse(self, argv: Sequence[str]) -> Any:
        """Parse this command's own arguments (without the command name) into its options."""
        p = argparse.ArgumentParser(prog=f"safegene {self.name}")
        add_arguments(p, self.options)
        return from_namespace(self.options, p.parse_args(list(argv)))


#: Help of the command groups (the first word of two-word command names).
GROUP_HELP = {"organism": "the built-in model organism (tiny LM family)"}


def register_commands(subparsers: Any, commands: Iterable[Command]) -> dict[str, argparse.ArgumentParser]:
    """Add every command to ``subparsers`` (two-word names under a group parser); return the
    parsers by command name."""
    groups: dict[str, Any] = {}
    parsers = {}
    for c in commands:
        words = c.name.split()
        if len(words) == 1:
            sub, leaf = subparsers, words[0]
        elif len(words) == 2:
            if words[0] not in groups:
                gp = subparsers.add_parser(words[0], help=GROUP_HELP.get(words[0]))
                groups[words[0]] = gp.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND", required=True)
            sub, leaf = groups[words[0]], words[1]
        else:  # pragma: no cover - a programming error
            raise ValueError(f"command names have one or two words, not {c.name!r}")
        p = sub.add_parser(leaf, help=c.help, description=c.description or c.help)
        add_arguments(p, c.options)
        p.set_defaults(func=c.invoke)
        parsers[c.name] = p
    return parsers


__all__ = ["Arg", "Command", "CommonOptions", "ModelOptions", "Options", "Spec", "StreamOptions", "add_arguments", "from_namespace",
           "option", "register_commands", "specs", "to_argv"]
