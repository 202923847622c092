"""``safegene run CONFIG.yaml``: one declarative file for a whole run.

The file is a thin layer over the command line: each section holds the options of one command
(its long flags, spelled with underscores), and the run is exactly the sequence of commands
those options give (``safegene run CONFIG.yaml --dry-run`` prints them). Each section fills the
command's own options dataclass (:mod:`safegene.cli.options`), the one argparse is generated
from: the allowed keys, their types and choices cannot drift from the CLI, and the run calls
each command's handler with that dataclass.

.. code-block:: yaml

    aligned: models/aligned            # local dir or Hub id org/name[@rev]   (extract ALIGNED)
    degraded: models/degraded          #                                      (extract DEGRADED)
    gene: out/gene                     # extract -o / the GENE argument of the other commands
                                       # (without aligned/degraded: a gene dir or a Hub id org/name[@rev])
    extract: {dtype: F32, budget_mb: 128}
    select: {harmful: data/harmful_calib.jsonl, benign: data/benign_calib.jsonl, top_k: 2}
    calibrate: {safety: data/safety.jsonl, utility: [data/task.jsonl], steps: 40}
    apply: {budget_mb: 128}            # or {scale: 0.5} without calibrate (RESTA)
    eval: {harmful: data/harmful_eval.jsonl, task: [data/sentiment_eval.jsonl], judge: keyword}
    targets:
      - {model: models/task-a, output: out/task-a-safe}                 # calibrate -o defaults to OUTPUT.coeffs.json
      - {model: models/task-b, output: out/task-b-safe, coeffs: c.json}  # fixed λ: not calibrated

Steps run in order: extract (when ``aligned`` and ``degraded`` are given; otherwise ``gene``
must exist), select (when the section is present), then per target: calibrate (section present and
the target has neither its own ``coeffs`` file nor a ``scale``; writes ``OUTPUT.coeffs.json``),
apply, eval (writes ``OUTPUT.eval.json``). A calibrate section with ``safety_target: distill`` and no
``aligned`` of its own distils the run's top-level ``aligned`` model. Relative paths are relative to the config file. Every problem is a
:class:`~safegene.errors.SafeGeneError` naming the key, e.g. ``CONFIG.yaml: calibrate.stepz: unknown key``.

>>> res = run_config("run.yaml", dry_run=True)  # doctest: +SKIP
>>> res["commands"][0][:2]  # doctest: +SKIP
['extract', 'models/aligned']
"""

from __future__ import annotations

import difflib
import os
import time
from pathlib import Path
from typing import Any, Mapping, Union

from ..errors import SafeGeneError, UsageError
from ..io.hub import parse_hub_id, resolve_model
from . import cmd_apply, cmd_calibrate, cmd_eval, cmd_extract, cmd_select
from .cmd_apply import ApplyOptions
from .cmd_calibrate import CalibrateOptions
from .cmd_eval import EvalOptions
from .cmd_extract import ExtractOptions
from .cmd_select import SelectOptions
from .options import Command, Spec, specs, to_argv

TOP_KEYS = ("aligned", "degraded", "gene", "targets", "extract", "select", "calibrate", "apply", "eval")
TARGET_KEYS = ("model", "output", "coeffs", "scale")
#: The commands a run config drives, by section.
COMMANDS: dict[str, Command] = {
    "extract": cmd_extract.COMMAND,
    "select": cmd_select.COMMAND,
    "calibrate": cmd_calibrate.COMMAND,
    "apply": cmd_apply.COMMAND,
    "eval": cmd_eval.COMMAND,
}
#: Command -> options the runner fills itself (positionals, outputs, output formats, --quiet).
RESERVED = {
    "extract": {"aligned", "degraded", "output", "quiet", "json"},
    "select": {"gene", "aligned", "degraded", "quiet", "json"},
    "calibrate": {"gene", "target", "output", "quiet", "json"},
    "apply": {"gene", "target", "output", "coeffs", "quiet", "json"},
    "eval": {"model", "output", "markdown", "quiet", "json"},
}

ConfigLike = Union[str, os.PathLike, Mapping[str, Any]]


class ConfigError(UsageError):
    """A run configuration that cannot work (names the file and the key)."""


def section_options(section: str) -> dict[str, Spec]:
    """The options a config section may set: the command's options minus those the runner fills."""
    return {s.name: s for s in specs(COMMANDS[section].options) if s.name not in RESERVED[section]}


def _check_mapping(
    value: Any, not_mapping: str, where: str = "", allowed: "Any" = None, normalize: "Any" = None
) -> None:
    """``value`` must be a mapping (else ``not_mapping, got <type>``) whose keys, after
    ``normalize``, are all in ``allowed`` (when given; else an unknown-key error with a hint)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{not_mapping}, got {type(value).__name__}")
    if allowed is None:
        return
    for k in value:
        key = normalize(str(k)) if normalize else str(k)
        if key not in allowed:
            raise _unknown(where, key, list(allowed))


def _unknown(where: str, key: str, allowed: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}{key}: unknown key{hint}; allowed: {', '.join(sorted(allowed))}")


def _check_value(where: str, key: str, v: Any, kind: str, choices: Any, item: str = "str") -> Any:
    """``v`` checked against an option's kind ("bool", "int", "float", "str", "list" of
    ``item``) and choices; numbers become the option's type, list items strings (or numbers)."""
    def bad(want: str) -> ConfigError:
        return ConfigError(f"{where}{key}: expected {want}, got {type(v).__name__} {v!r}")

    if kind == "bool":
        if not isinstance(v, bool):
            raise bad("true or false")
    elif kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number")
        v = float(v)
    elif kind == "list":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
            raise bad("a non-empty list of strings")
        v = [str(x) for x in v] if item == "str" else [_check_value(where, key, x, item, None) for x in v]
    else:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise bad("a string")
        v = str(v)
    if choices is not None:
        vals = v if isinstance(v, list) else [v]
        for x in vals:
            if x not in choices:
                raise ConfigError(f"{where}{key}: {x!r} is not one of {', '.join(map(str, choices))}")
    return v


def _model_ref(where: str, key: str, v: Any, base: Path) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}{key}: expected a model directory or Hub id, got {v!r}")
    p = Path(v).expanduser()
    p = p if p.is_absolute() else base / p
    if p.exists():
        return str(p)
    if parse_hub_id(v) is not None:
        return v
    raise ConfigError(f"{where}{key}: {p} does not exist (and {v!r} is not a Hub id org/name[@revision])")


def load_config(config: ConfigLike) -> dict[str, Any]:
    """Read (YAML or mapping) and validate a run configuration; return it normalised.

    Paths come back absolute (relative ones are taken from the config file's directory),
    list flags as lists, numbers as the flag's type; sections absent stay absent.

    >>> load_config({"gene": "gene/", "targets": [{"model": "t/", "output": "o/"}], "apply": {"scale": 1}})  # doctest: +SKIP
    """
    if isinstance(config, Mapping):
        raw, src, base = dict(config), "config", Path.cwd()
    else:
        import yaml

        path = Path(config)
        src, base = str(path), path.resolve().parent
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    where = f"{src}: "
    _check_mapping(raw, f"{src}: expected a mapping of keys ({', '.join(TOP_KEYS)})", where, TOP_KEYS)
    cfg: dict[str, Any] = {"_source": src, "_base": str(base)}

    def abspath(v: str) -> str:
        p = Path(v).expanduser()
        return str(p if p.is_absolute() else base / p)

    # models and the gene
    have_a, have_d = "aligned" in raw, "degraded" in raw
    if have_a != have_d:
        raise ConfigError(f"{where}{'degraded' if have_a else 'aligned'}: missing; give both aligned and degraded (to extract) or neither (gene must exist)")
    if have_a:
        cfg["aligned"] = _model_ref(where, "aligned", raw["aligned"], base)
        cfg["degraded"] = _model_ref(where, "degraded", raw["degraded"], base)
    if not isinstance(raw.get("gene"), str) or not raw["gene"]:
        raise ConfigError(f"{where}gene: missing or not a path (the gene directory to write or use)")
    cfg["gene"] = abspath(raw["gene"])
    if not have_a and not (Path(cfg["gene"]) / "gene.json").is_file():
        if not Path(cfg["gene"]).exists() and parse_hub_id(raw["gene"]) is not None:
            cfg["gene"] = raw["gene"]  # a shared gene on the Hub, org/name[@revision]: resolved when used
        else:
            raise ConfigError(f"{where}gene: {cfg['gene']} is not a gene directory (nor a Hub id "
                              "org/name[@revision]); give aligned and degraded to extract one")
    if "extract" in raw and not have_a:
        raise ConfigError(f"{where}extract: settings given but no aligned/degraded models to extract from")

    # command sections: keys, types and choices straight from the commands' options dataclasses
    for section in COMMANDS:
        if section not in raw:
            continue
        body = raw[section] if raw[section] is not None else {}
        _check_mapping(body, f"{where}{section}: expected a mapping of {section} options")
        opts = section_options(section)
        sec: dict[str, Any] = {}
        w = f"{where}{section}."
        _check_mapping(body, "", w, opts, normalize=lambda k: k.replace("-", "_"))
        for k, v in body.items():
            k = str(k).replace("-", "_")
            if v is None:
                continue
            spec = opts[k]
            v = _check_value(w, k, v, spec.kind, spec.arg.choices, spec.item)
            if spec.arg.path == "in":
                vals = [abspath(x) for x in (v if isinstance(v, list) else [v])]
                for x in vals:
                    if not Path(x).is_file():
                        raise ConfigError(f"{w}{k}: file {x} does not exist")
                v = vals if isinstance(v, list) else vals[0]
            elif spec.arg.path == "out":
                v = abspath(v)
            sec[k] = v
        for k, spec in opts.items():
            if spec.required and k not in sec:
                raise ConfigError(f"{w}{k}: missing (required by `safegene {COMMANDS[section].name}`)")
        for group in COMMANDS[section].options.GROUPS:
            given = [k for k, spec in opts.items() if spec.arg.group == group and k in sec]
            if len(given) > 1:
                raise ConfigError(f"{w}{given[1]}: give {given[0]} or {given[1]}, not both")
        cfg[section] = sec
    if "select" in cfg and not have_a:
        raise ConfigError(f"{where}select: needs the aligned and degraded models; add them at the top level")

    # targets
    tl = raw.get("targets")
    if tl is None:
        tl = []
    if not isinstance(tl, list):
        raise ConfigError(f"{where}targets: expected a list of {{model, output}} mappings")
    if not tl and any(s in raw for s in ("calibrate", "apply", "eval")):
        raise ConfigError(f"{where}targets: missing; calibrate/apply/eval need at least one target")
    targets = []
    for i, t in enumerate(tl):
        w = f"{where}targets[{i}]."
        _check_mapping(t, f"{where}targets[{i}]: expected a mapping with model and output", w, TARGET_KEYS)
        for k in ("model", "output"):
            if k not in t:
                raise ConfigError(f"{w}{k}: missing")
        tt = {"model": _model_ref(w, "model", t["model"], base),
              "output": abspath(_check_value(w, "output", t["output"], "str", None))}
        if "coeffs" in t and "scale" in t:
            raise ConfigError(f"{w}scale: give coeffs or scale, not both")
        if "scale" in t:
            tt["scale"] = _check_value(w, "scale", t["scale"], "float", None)
        if "coeffs" in t:
            tt["coeffs"] = abspath(_check_value(w, "coeffs", t["coeffs"], "str", None))
            tt["fixed"] = True  # given coefficients are used as they are, never recalibrated
            if not Path(tt["coeffs"]).is_file():
                raise ConfigError(f"{w}coeffs: file {tt['coeffs']} does not exist")
        elif "scale" not in tt and "calibrate" in cfg:
            tt["coeffs"] = tt["output"].rstrip("/") + ".coeffs.json"
        elif "scale" not in tt and "scale" not in cfg.get("apply", {}):
            raise ConfigError(f"{w}coeffs: missing; give coeffs, scale, apply.scale, or a calibrate section")
        targets.append(tt)
    outs = [t["output"] for t in targets]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"{where}targets: two targets share the output {next(o for o in outs if outs.count(o) > 1)}")
    cfg["targets"] = targets
    return cfg


def plan(cfg: Mapping[str, Any], quiet: bool = False) -> list[tuple[Command, Any]]:
    """The commands a validated config runs, in order, each with its filled options dataclass."""
    steps: list[tuple[Command, Any]] = []
    gene = cfg["gene"]
    if "aligned" in cfg:
        steps.append((cmd_extract.COMMAND, ExtractOptions(
            aligned=cfg["aligned"], degraded=cfg["degraded"], output=gene, quiet=quiet, **cfg.get("extract", {}))))
    if "select" in cfg:
        steps.append((cmd_select.COMMAND, SelectOptions(
            gene=gene, aligned=cfg["aligned"], degraded=cfg["degraded"], quiet=quiet, **cfg["select"])))
    for t in cfg["targets"]:
        if "calibrate" in cfg and "scale" not in t and not t.get("fixed"):
            cal = dict(cfg["calibrate"])
            if cal.get("safety_target") == "distill" and not cal.get("aligned") and "aligned" in cfg:
                cal["aligned"] = cfg["aligned"]  # distil the run's own aligned model unless told otherwise
            steps.append((cmd_calibrate.COMMAND, CalibrateOptions(
                gene=gene, target=t["model"], output=t["coeffs"], quiet=quiet, **cal)))
        ap = dict(cfg.get("apply", {}))
        if "scale" in t:
            ap["scale"] = t["scale"]
        coeffs = t["coeffs"] if "coeffs" in t and "scale" not in t else None
        if coeffs is not None:
            ap.pop("scale", None)
        if "apply" in cfg or "calibrate" in cfg or coeffs is not None or "scale" in t:
            steps.append((cmd_apply.COMMAND, ApplyOptions(
                gene=gene, target=[t["model"]], output=[t["output"]], coeffs=coeffs, quiet=quiet, **ap)))
        if "eval" in cfg:
            steps.append((cmd_eval.COMMAND, EvalOptions(
                model=t["output"], output=_eval_json(t), quiet=quiet, **cfg["eval"])))
    return steps


def _eval_json(target: Mapping[str, Any]) -> str:
    return target["output"].rstrip("/") + ".eval.json"


def plan_commands(cfg: Mapping[str, Any], quiet: bool = False) -> list[list[str]]:
    """The ``safegene`` command lines (without the program name) a validated config runs.

    >>> plan_commands(load_config("run.yaml"))[0][0]  # doctest: +SKIP
    'extract'
    """
    return [to_argv(command, opts) for command, opts in plan(cfg, quiet=quiet)]


def run_config(config: ConfigLike, *, dry_run: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Validate a run configuration and run its commands in order; return what ran.

    Hub ids among the models are resolved first (``safegene.hub.resolve_model``). Returns
    ``{"commands": [[...], ...], "outputs": [target outputs], "eval": [eval JSON paths],
    "seconds": float, "dry_run": bool}``.

    >>> run_config("run.yaml")["outputs"]  # doctest: +SKIP
    ['/abs/out/task-a-safe']
    """
    t0 = time.perf_counter()
    cfg = load_config(config)
    if not dry_run:
        for k in ("aligned", "degraded"):
            if k in cfg:
                cfg[k] = str(resolve_model(cfg[k]))
        for t in cfg["targets"]:
            t["model"] = str(resolve_model(t["model"]))
    steps = plan(cfg, quiet=quiet)
    cmds = [to_argv(command, opts) for command, opts in steps]
    if not dry_run:
        for (command, opts), argv in zip(steps, cmds):
            rc = int(command.handler(opts) or 0)
            if rc != 0:
                raise SafeGeneError(f"`safegene {' '.join(argv)}` exited with status {rc}")
    return {
        "commands": cmds,
        "outputs": [t["output"] for t in cfg["targets"]],
        "eval": [_eval_json(t) for t in cfg["targets"]] if "eval" in cfg else [],
        "seconds": round(time.perf_counter() - t0, 3),
        "dry_run": dry_run,
    }


__all__ = ["COMMANDS", "ConfigError", "load_config", "plan", "plan_commands", "run_config", "section_options"]
