"""The coefficient policies SafeGene is compared with, as one registry.

A policy turns one :class:`Context` (the gene, the family's checkpoints, one task model, the
few-shot calibration data and the settings) into a :class:`~safegene.coeffs.Coeffs`: the λ per
gene key that defends that task model. The demo and ``bench/real`` loop over the same registry,
so a method is defined once and every table row of a name means the same thing.

=================== =============================================================================
``none``            no λ at all: the task model as fine-tuned
``RESTA``           one γ on every gene key, grid-searched on the calibration split
``SafeMERGE``       λ_l = ratio on the decoder blocks where cos(θ_T − θ_A, τ) < threshold
``no-selection``    SafeGene's calibration on every gene key (ablation)
``no-calibration``  the selected keys at λ = 1 (ablation)
``SafeGene``        the selected keys, λ calibrated few-shot (the method)
``SafeGene-alt-score`` SafeGene on the keys the *other* selection score picks (optional row)
``RESTA-loss``      RESTA's γ chosen by SafeGene's few-shot loss on the same examples (optional row)
``SafeGene-task-aware`` SafeGene with τ or τ projected off the task update, chosen per target on the
                    calibration prompts by the development rule's cost (optional row)
``SafeGene-checked`` SafeGene's λ, λ = 1 or the grid's uniform γ on the selected keys, chosen on the
                    calibration prompts by the same cost (optional row)
=================== =============================================================================

>>> ctx = Context(gene="gene/", task="task-sentiment/", aligned="aligned/",
...               safety="harmful_calib.jsonl", task_calib="sentiment_calib.jsonl")  # doctest: +SKIP
>>> c = compute("SafeGene", ctx)  # doctest: +SKIP
>>> c.coeffs, c.meta["policy_seconds"]  # doctest: +SKIP
({'layer.0': 0.58, 'layer.3': 0.32, 'lm_head': 2.66}, 6.1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from ..coeffs import Coeffs
from ..errors import UsageError
from ..gene import Gene, key_sort, load_gene
from .resta import DEFAULT_GRID, resta_grid
from .safemerge import safemerge_coeffs

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Settings:
    """Knobs shared by the policies. ``None`` leaves a calibrate keyword at its own default."""

    calib_steps: int = 40
    lambda_max: float | None = None
    max_examples: int | None = None
    calib_log: Callable[[str], None] | None = None
    resta_grid: tuple[float, ...] = DEFAULT_GRID
    judge: str = "keyword"
    max_new_tokens: int = 32  # generation length of RESTA's γ grid
    batch_size: int = 32
    safemerge_threshold: float = 0.0
    safemerge_ratio: float = 1.0
    #: calibrate's optimizer (``adam`` / ``lbfgs``), safety target (``string`` / ``distill``: the
    #: aligned model's own first tokens, read from :attr:`Context.aligned`) and benign prompts for
    #: the utility term (JSONL path or records); None keeps calibrate's defaults
    optimizer: str | None = None
    safety_target: str | None = None
    benign: Any = None
    #: calibrate's step size (Adam's lr, or L-BFGS's initial step; None: calibrate's default 0.05)
    lr: float | None = None


@dataclass
class Context:
    """Everything a policy may read, for one task model.

    ``model``/``tokenizer``: the task model already loaded (the caller keeps it pristine);
    without them, :meth:`loaded` loads ``task`` on first use. ``utility`` is what calibration
    keeps (default: ``task_calib``); RESTA's γ is chosen on ``safety`` + ``task_calib``.
    ``selected`` defaults to the selection recorded in the gene.
    """

    gene: Union[PathLike, Gene]
    task: PathLike
    safety: Any
    task_calib: Any
    aligned: PathLike | None = None
    degraded: PathLike | None = None
    utility: Any = None
    selected: Sequence[str] | None = None
    other_selections: dict[str, list[str]] = field(default_factory=dict)
    #: benign calibration prompts: the over-refusal term of :class:`TaskAware`'s choice
    benign_calib: Any = None
    #: where policies that write a per-target gene put it (default: beside the gene)
    work_dir: PathLike | None = None
    model: Any = None
    tokenizer: Any = None
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        self.gene = load_gene(self.gene)
        if self.utility is None:
            self.utility = self.task_calib

    @property
    def selected_keys(self) -> list[str]:
        if self.selected is not None:
            return list(self.selected)
        sel = self.gene.selection or {}
        if not sel.get("selected"):
            raise UsageError(f"gene {self.gene.path} has no layer selection; run `safegene select` first")
        return list(sel["selected"])

    def loaded(self) -> tuple[Any, Any]:
        """The task model and tokenizer, loaded once."""
        if self.model is None:
            from .. import lm

            self.model, self.tokenizer = lm.load_model(self.task)
        return self.model, self.tokenizer


def lam_summary(coeffs: dict[str, float]) -> str:
    """The λ column: ``L0=0.58 L3=0.32 head=2.66``, or ``7 keys, λ 0.00–2.13`` past four keys."""
    if not coeffs:
        return "λ = 0"
    short = {"embed": "emb", "final_norm": "norm", "lm_head": "head"}
    if len(coeffs) > 4:
        vals = list(coeffs.values())
        return f"{len(vals)} keys, λ {min(vals):.2f}–{max(vals):.2f}"
    return " ".join(f"{short.get(k, k.replace('layer.', 'L'))}={coeffs[k]:.2f}" for k in sorted(coeffs, key=key_sort))


def loss_kwargs(ctx: Context) -> dict[str, Any]:
    """calibrate's keywords that define the few-shot *objective* (how many examples, the safety
    target, the benign term), set from :attr:`Context.settings`: shared by every policy that
    evaluates that loss (SafeGene, no-selection, RESTA-loss), so they all score the same thing.
    Unset knobs are left out (calibrate's own defaults)."""
    s = ctx.settings
    kw: dict[str, Any] = {}
    if s.max_examples is not None:
        kw["max_examples"] = s.max_examples
    if s.safety_target is not None:
        kw["safety_target"] = s.safety_target
        if s.safety_target == "distill":
            if ctx.aligned is None:
                raise UsageError("safety_target='distill' needs the aligned model (Context.aligned)")
            kw["aligned"] = ctx.aligned
    if s.benign is not None:
        kw["benign"] = s.benign
    return kw


class Policy:
    """One way of choosing λ. Subclasses set the class attributes and implement :meth:`coeffs`."""

    name: str = ""
    #: short, file- and stage-name safe id (``resta``, ``nocal``, ...)
    slug: str = ""
    summary: str = ""

    def applies(self, ctx: Context) -> bool:
        """Whether the policy has a row for this context (the alternative score may select nothing)."""
        return True

    def label(self, ctx: Context) -> str:
        """The row name."""
        return self.name

    def coeffs(self, ctx: Context) -> Coeffs:
        raise NotImplementedError

    def lam_text(self, c: Coeffs) -> str:
        return lam_summary(c.coeffs)

    def details(self, c: Coeffs) -> dict[str, Any]:
        """The short, JSON-able record of how λ was chosen, for result files."""
        return {}


class NoDefence(Policy):
    name, slug, summary = "none", "none", "the task model as fine-tuned"

    def coeffs(self, ctx: Context) -> Coeffs:
        return Coeffs({}, {"method": "none"})

    def lam_text(self, c: Coeffs) -> str:
        return "—"


class Resta(Policy):
    name, slug, summary = "RESTA", "resta", "one γ on every gene key, grid-searched on the calibration split"

    def coeffs(self, ctx: Context) -> Coeffs:
        s = ctx.settings
        r = resta_grid(ctx.gene.path, ctx.task, ctx.safety, ctx.task_calib, grid=s.resta_grid, judge=s.judge,
                       max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        # every tensor has a key, so γ on every key is exactly `apply --scale γ`
        return Coeffs({k: r.gamma for k in ctx.gene.layer_keys()},
                      {"method": "resta", "gamma": r.gamma, "resta": r.to_dict(), "target": str(ctx.task)})

    def lam_text(self, c: Coeffs) -> str:
        return f"γ = {c.meta['gamma']:g} (all tensors)"

    def details(self, c: Coeffs) -> dict[str, Any]:
        return {"grid": c.meta["resta"]}


class RestaLoss(Policy):
    """RESTA's one γ on every gene key, chosen as SafeGene chooses its start: the point of
    :attr:`Settings.resta_grid` with the lowest few-shot calibration loss (the same objective on
    the same safety + utility examples SafeGene calibrates on), without generating anything."""

    name, slug = "RESTA-loss", "restaloss"
    summary = "one γ on every gene key, the grid point of lowest few-shot calibration loss"

    def coeffs(self, ctx: Context) -> Coeffs:
        from ..method.calibrate import calibrate

        s = ctx.settings
        grid = tuple(float(g) for g in s.resta_grid)
        if not grid:
            raise UsageError("the RESTA grid is empty")
        model, tok = ctx.loaded()
        keys = ctx.gene.layer_keys()
        # the same objective as SafeGene's (examples, safety target, benign term); no optimizer runs
        c = calibrate(ctx.gene, model, ctx.safety, ctx.utility, layers=keys, tokenizer=tok, steps=0, init="grid",
                      grid_values=grid, lambda_max=max(grid), log=s.calib_log, **loss_kwargs(ctx))
        gamma = float(c.meta["grid"]["best_gamma"])
        return Coeffs({k: gamma for k in keys}, {"method": "resta-loss", "gamma": gamma, "grid": c.meta["grid"],
                                                 "target": str(ctx.task)})

    def lam_text(self, c: Coeffs) -> str:
        return f"γ = {c.meta['gamma']:g} (all tensors, by loss)"

    def details(self, c: Coeffs) -> dict[str, Any]:
        return {"gamma": c.meta["gamma"], "grid": c.meta["grid"]}


class SafeMerge(Policy):
    name, slug, summary = "SafeMERGE", "safemerge", "λ_l = ratio where cos(θ_T − θ_A, τ_l) < threshold"

    def coeffs(self, ctx: Context) -> Coeffs:
        if ctx.aligned is None:
            raise UsageError("the SafeMERGE policy needs the aligned model (Context.aligned)")
        s = ctx.settings
        return safemerge_coeffs(ctx.gene, ctx.aligned, ctx.task, threshold=s.safemerge_threshold,
                                ratio=s.safemerge_ratio)

    def lam_text(self, c: Coeffs) -> str:
        return f"{len(c.coeffs)} layers at {c.meta['ratio']:.1f}" if c.coeffs else "λ = 0 (no layer flagged)"

    def details(self, c: Coeffs) -> dict[str, Any]:
        return {"cosines": c.meta["cosines"]}


class NoCalibration(Policy):
    name, slug, summary = "no-calibration", "nocal", "the selected keys at λ = 1"

    def coeffs(self, ctx: Context) -> Coeffs:
        return Coeffs({k: 1.0 for k in ctx.selected_keys}, {"method": "no-calibration"})


class Calibrated(Policy):
    """SafeGene's few-shot calibration on some set of keys."""

    def layers(self, ctx: Context) -> list[str] | None:
        raise NotImplementedError

    def calibrate(self, ctx: Context, gene: Gene | None = None, layers: Sequence[str] | None = None) -> Coeffs:
        """calibrate ``gene`` (default: the context's) on ``layers`` (default: :meth:`layers`) with
        the shared settings."""
        from ..method.calibrate import calibrate

        s = ctx.settings
        kw: dict[str, Any] = {"steps": s.calib_steps, "log": s.calib_log, **loss_kwargs(ctx)}
        if s.lambda_max is not None:
            kw["lambda_max"] = s.lambda_max
        if s.optimizer is not None:
            kw["optimizer"] = s.optimizer
        if s.lr is not None:
            kw["lr"] = s.lr
        model, tok = ctx.loaded()
        return calibrate(gene or ctx.gene, model, ctx.safety, ctx.utility,
                         layers=list(layers) if layers is not None else self.layers(ctx), tokenizer=tok, **kw)

    def coeffs(self, ctx: Context) -> Coeffs:
        return self.calibrate(ctx)

    def details(self, c: Coeffs) -> dict[str, Any]:
        g = c.meta.get("grid")
        h = c.meta.get("hyper") or {}
        return {"grid": {"best_gamma": g["best_gamma"], "best_loss": g["best_loss"]} if g else None,
                "best_step": c.meta.get("best_step"), "steps_run": c.meta.get("steps_run"), "loss": c.meta.get("loss"),
                "stopped": c.meta.get("stopped"), "optimizer": h.get("optimizer"), "lr": h.get("lr"),
                "safety_target": h.get("safety_target"), "n_benign": h.get("n_benign")}


class SafeGene(Calibrated):
    name, slug, summary = "SafeGene", "safegene", "the selected keys, λ calibrated few-shot (the method)"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.selected_keys


class NoSelection(Calibrated):
    name, slug, summary = "no-selection", "nosel", "SafeGene's calibration on every gene key"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.gene.layer_keys()


class AltScore(Calibrated):
    name, slug, summary = "SafeGene-alt-score", "altscore", "SafeGene on the keys the other selection score picks"

    def _alt(self, ctx: Context) -> tuple[str, list[str]] | None:
        return next(iter(ctx.other_selections.items()), None)

    def applies(self, ctx: Context) -> bool:
        alt = self._alt(ctx)
        return bool(alt and alt[1])

    def label(self, ctx: Context) -> str:
        alt = self._alt(ctx)
        return f"SafeGene[{alt[0]}]" if alt else self.name

    def layers(self, ctx: Context) -> list[str]:
        alt = self._alt(ctx)
        if not alt or not alt[1]:
            raise UsageError("no other selection score picked any key; nothing to calibrate for SafeGene-alt-score")
        return list(alt[1])


def rule_cost(m: dict[str, float], none: dict[str, float]) -> float:
    """The development rule's cost of one measurement against the undefended model, in points
    (``bench/dev_split.md``): ASR + over-refusal + accuracy lost + harmful answers without a whole
    refusal sentence (that term is 0 when the judge has no refusal sentences).

    >>> rule_cost({"asr": 10.0, "over_refusal": 0.0, "acc": 90.0, "whole_refusal": 80.0}, {"acc": 100.0})
    40.0
    """
    whole = m.get("whole_refusal")
    return (m["asr"] + m["over_refusal"] + max(0.0, none["acc"] - m["acc"])
            + (0.0 if whole is None else 100.0 - whole))


def calibration_measure(ctx: Context) -> dict[str, float]:
    """ASR, task accuracy, over-refusal and whole refusal (%) of the context's loaded model on the
    calibration prompts (``safety``, ``task_calib``, ``benign_calib``), judged with the settings'
    judge at RESTA's generation length; ``whole_refusal`` is None when the judge has no refusal
    sentences, ``over_refusal`` 0 without benign prompts."""
    from ..eval.evaluate import evaluate
    from ..eval.judges import get_judge
    from ..eval.refusal import whole_refusal_rate

    s = ctx.settings
    judge = get_judge(s.judge)
    rep = evaluate(ctx.loaded(), harmful=ctx.safety, tasks={"task": ctx.task_calib}, benign=ctx.benign_calib,
                   judge=judge, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, progress=False)
    sentences = getattr(judge, "refusals", None)
    harmful = [x["response"] for x in rep.samples if x.get("set") == "harmful"]
    return {"asr": 100 * rep.asr.rate, "acc": 100 * rep.task_accuracy["task"].rate,
            "over_refusal": 100 * rep.over_refusal.rate if ctx.benign_calib is not None else 0.0,
            "whole_refusal": 100 * whole_refusal_rate(harmful, sentences).rate if sentences and harmful else None}


def choose_candidate(model: Any, keys: Sequence[str], cands: dict[str, tuple[Gene, dict[str, float]]],
                     measure: Callable[[], dict[str, float]]) -> tuple[str, dict[str, Any]]:
    """A model choice at the target: ``measure()`` the undefended ``model``, then each candidate (a
    gene and its λ on ``keys``) patched into it in turn; the candidate of lowest :func:`rule_cost`
    against the undefended model wins, ties going to the one listed first. Returns its name and
    every measurement (``"none"`` and, per candidate, the measurement with its ``"cost"``); the
    model is handed back as it was."""
    from ..method.merge import MergePlan

    choice: dict[str, Any] = {"none": measure()}
    plans: dict[Path, MergePlan] = {}  # one plan (τ and W⁰ loaded once) per gene
    try:
        for name, (g, co) in cands.items():
            plan = plans.get(g.path)
            if plan is None:
                plan = plans[g.path] = MergePlan(model, g, keys)
            plan.set([co.get(k, 0.0) for k in plan.keys])
            m = measure()
            plan.restore()
            choice[name] = {**m, "cost": rule_cost(m, choice["none"])}
    finally:
        for plan in plans.values():
            plan.restore()
    names = list(cands)
    return min(names, key=lambda n: (choice[n]["cost"], names.index(n))), choice


def check_candidates(c: Coeffs, keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """The λ check's three candidates on ``keys`` (development round 9), in tie order: the
    calibrated λ of ``c``, λ = 1, and the calibration grid's best uniform γ."""
    gamma = float((c.meta.get("grid") or {}).get("best_gamma", 1.0))
    return {"calibrated": dict(c.coeffs), "one": {k: 1.0 for k in keys}, "uniform": {k: gamma for k in keys}}


class CalibrationChoice(Calibrated):
    """A SafeGene variant that makes a model choice on the calibration prompts: each candidate
    (a gene and its λ on the selected keys) is patched into the task model in turn and measured by
    :meth:`measure`; the one of lowest :func:`rule_cost` against the undefended model is kept,
    ties going to the candidate listed first."""

    def layers(self, ctx: Context) -> list[str]:
        return ctx.selected_keys

    def measure(self, ctx: Context) -> dict[str, float]:
        return calibration_measure(ctx)

    def choose(self, ctx: Context, cands: dict[str, tuple[Gene, dict[str, float]]]) -> tuple[str, dict[str, Any]]:
        """The chosen candidate's name and every measurement (``"none"``: the undefended model);
        the model is handed back as it was (:func:`choose_candidate`)."""
        model, _ = ctx.loaded()
        return choose_candidate(model, self.layers(ctx), cands, lambda: self.measure(ctx))

    def details(self, c: Coeffs) -> dict[str, Any]:
        return {**super().details(c), "chosen": c.meta.get("chosen"), "choice": c.meta.get("choice")}


class TaskAware(CalibrationChoice):
    """SafeGene with a task-aware τ, chosen per target model on the calibration data only.

    Development round 8 (``bench/dev_split.md``): where τ points against the task update δ it
    costs task skill, and projecting it off δ per output row (:func:`safegene.ops.project.project_gene`)
    restores such a model at full accuracy, but removes the restoration wherever the erosion also
    runs along δ. So both are calibrated on the selected keys, the patched models (and the
    undefended one) generate on the calibration prompts (harmful, task, benign), and the projected
    gene is kept only if its :func:`rule_cost` there is strictly lower. The chosen gene's path is
    ``meta["gene_path"]``; ``meta["choice"]`` has both measurements. Costs two calibrations and
    three generation passes over the calibration prompts.
    """

    name, slug = "SafeGene-task-aware", "taskaware"
    summary = "SafeGene with τ or τ projected off the task update, chosen per target on the calibration prompts"

    def applies(self, ctx: Context) -> bool:
        return ctx.aligned is not None

    def coeffs(self, ctx: Context) -> Coeffs:
        from ..ops.project import project_gene

        if ctx.aligned is None:
            raise UsageError("the SafeGene-task-aware policy needs the aligned model (Context.aligned)")
        gene = ctx.gene
        work = Path(ctx.work_dir) if ctx.work_dir is not None else gene.path.parent
        work.mkdir(parents=True, exist_ok=True)
        proj = project_gene(gene, ctx.aligned, ctx.task, work / f"{gene.path.name}-proj-{Path(ctx.task).name}",
                            keys=self.layers(ctx), mode="row", overwrite=True)
        fits = {name: (g, self.calibrate(ctx, g)) for name, g in (("tau", gene), ("proj-row", proj))}
        pick, choice = self.choose(ctx, {name: (g, c.coeffs) for name, (g, c) in fits.items()})
        g, c = fits[pick]
        c.meta.update({"method": "safegene-task-aware", "gene_path": str(g.path), "chosen": pick, "choice": choice,
                       "projection": proj.manifest["projection"]})
        return c

    def lam_text(self, c: Coeffs) -> str:
        return f"{lam_summary(c.coeffs)} ({'τ' if c.meta.get('chosen') == 'tau' else 'projected τ'})"


class Checked(CalibrationChoice):
    """SafeGene with a check of its λ on the calibration prompts (development round 9).

    The few-shot loss is a proxy: on some task models the calibrated λ refuses *fewer* of the
    calibration prompts themselves than λ = 1 on the same keys. So the calibrated λ, λ = 1 on the
    selected keys and the calibration grid's best uniform γ on them are each applied, generate on
    the calibration prompts (harmful, task, benign), and the one of lowest :func:`rule_cost` is
    kept (ties: the calibrated λ, then λ = 1). ``meta["choice"]`` has the three measurements and
    the undefended model's. Costs four generation passes over the calibration prompts beyond
    SafeGene's calibration.
    """

    name, slug = "SafeGene-checked", "checked"
    summary = "SafeGene's λ, λ = 1 or the grid's uniform γ on the selected keys, chosen on the calibration prompts"

    def coeffs(self, ctx: Context) -> Coeffs:
        return self.check(ctx, self.layers(ctx))

    def check(self, ctx: Context, keys: Sequence[str]) -> Coeffs:
        """Calibrate ``keys`` (a subset of :meth:`layers`), then the three-way choice on them."""
        c = self.calibrate(ctx, layers=keys)  # leaves the model as it found it
        cands = check_candidates(c, keys)
        pick, choice = self.choose(ctx, {name: (ctx.gene, co) for name, co in cands.items()})
        return Coeffs(cands[pick], {**c.meta, "method": "safegene-checked", "chosen": pick, "choice": choice,
                                    "calibrated": cands["calibrated"]})

    def lam_text(self, c: Coeffs) -> str:
        return f"{lam_summary(c.coeffs)} ({c.meta.get('chosen')})"


class NoSelectionChecked(Checked):
    """The λ check of :class:`Checked` on every gene key (no selection): the calibrated λ of the
    no-selection row, λ = 1 on every key (τ itself) or the grid's uniform γ on every key (RESTA's
    form with the few-shot loss's γ), chosen on the calibration prompts. A candidate of
    development round 12 (``bench/dev_split.md``), not the default."""

    name, slug = "no-selection-checked", "noselchecked"
    summary = "no-selection's λ, λ = 1 or the grid's uniform γ on every key, chosen on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.gene.layer_keys()


def prune_keys(model: Any, gene: Gene, keys: Sequence[str], measure: Callable[[], dict[str, float]],
               none: dict[str, float], gamma: float = 1.0,
               coeffs: dict[str, float] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """Backward elimination of gene keys *at the target model* (development round 13).

    The selection rule scores keys on the degraded model, where τ on every key gives back the
    aligned model and no key can cost a task skill. At the target it can: on the StableLM
    family's season task, τ's embedding rows carry minus the skill the degraded copy also learned
    (``bench/key_conflict.py``). So, starting from ``keys``, τ at ``gamma`` on the current set is
    patched into ``model`` and scored by ``measure()`` (ASR / acc / over-refusal / whole refusal,
    %, e.g. on the calibration prompts) with :func:`rule_cost` against ``none``; each pass tries
    the set without each key in turn and drops the key whose removal lowers the cost most, while
    one strictly does (ties keep the key; at least one key stays). With ``coeffs`` (e.g. a
    calibrated λ), each key of the current set is patched at its own coefficient instead of
    ``gamma``. The model is handed back as it was. Returns the kept keys (in ``keys``' order) and
    the trace: one entry per pass with the current set, its cost and every trial's cost.
    """
    from ..method.merge import MergePlan

    plan = MergePlan(model, gene, keys)

    def cost_of(ks: Sequence[str]) -> tuple[float, dict[str, float]]:
        plan.set([(gamma if coeffs is None else coeffs.get(k, 0.0)) if k in ks else 0.0 for k in plan.keys])
        try:
            m = measure()
        finally:
            plan.restore()
        return rule_cost(m, none), m

    current = list(keys)
    trace: list[dict[str, Any]] = []
    try:
        cost, m = cost_of(current)
        while True:
            step: dict[str, Any] = {"keys": list(current), "cost": cost, "measure": m, "trials": {}}
            trace.append(step)
            if len(current) <= 1:
                break
            trials = {k: cost_of([j for j in current if j != k]) for k in current}
            step["trials"] = {k: c for k, (c, _) in trials.items()}
            drop = min(current, key=lambda k: (trials[k][0], current.index(k)))
            if not trials[drop][0] < cost:
                break
            step["dropped"] = drop
            current.remove(drop)
            cost, m = trials[drop]
    finally:
        plan.restore()
    return current, trace


class Pruned(Calibrated):
    """SafeGene on the selected keys pruned at the target (development round 13): backward
    elimination of keys by :func:`prune_keys` with τ at λ = 1, scored on the calibration prompts
    (harmful, task, benign; :func:`calibration_measure`), then SafeGene's calibration on the kept
    keys. ``meta["pruned"]`` has the kept and dropped keys and the elimination trace. Costs one
    generation pass over the calibration prompts per set tried (at most k(k+1)/2 for k keys)
    beyond SafeGene's calibration. A candidate, not the default."""

    name, slug = "SafeGene-pruned", "pruned"
    summary = "SafeGene on the selected keys less those whose τ costs the target, found on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.selected_keys

    def coeffs(self, ctx: Context) -> Coeffs:
        kept, pruned = _prune_at_target(ctx, self.layers(ctx), lambda: calibration_measure(ctx))
        c = self.calibrate(ctx, layers=kept)
        c.meta.update({"method": "safegene-pruned", "pruned": pruned})
        return c

    def lam_text(self, c: Coeffs) -> str:
        return _pruned_lam_text(c)

    def details(self, c: Coeffs) -> dict[str, Any]:
        return _pruned_details(self, c)


def _prune_at_target(ctx: Context, start: Sequence[str], measure: Callable[[], dict[str, float]],
                     coeffs: dict[str, float] | None = None) -> tuple[list[str], dict[str, Any]]:
    """:func:`prune_keys` on the context's loaded task model from ``start`` (the undefended model
    measured first, as the reference); the kept keys and the ``meta["pruned"]`` record of the
    pruned, trimmed and pruned-checked rows."""
    model, _ = ctx.loaded()
    kept, trace = prune_keys(model, ctx.gene, start, measure, measure(), coeffs=coeffs)
    return kept, {"from": list(start), "kept": kept, "dropped": [k for k in start if k not in kept], "trace": trace}


def _pruned_lam_text(c: Coeffs) -> str:
    dropped = (c.meta.get("pruned") or {}).get("dropped") or []
    return f"{lam_summary(c.coeffs)} (dropped {', '.join(dropped) if dropped else 'none'})"


def _pruned_details(policy: Calibrated, c: Coeffs) -> dict[str, Any]:
    """A pruned or trimmed row's details: the calibration's, and the kept and dropped keys."""
    p = c.meta.get("pruned") or {}
    return {**Calibrated.details(policy, c), "pruned": {k: p.get(k) for k in ("from", "kept", "dropped")}}


class NoSelectionPruned(Pruned):
    """:class:`Pruned` starting from every gene key (no selection rule at all: the keys are chosen
    at the target only). A candidate of development round 13, not the default."""

    name, slug = "no-selection-pruned", "noselpruned"
    summary = "SafeGene on every key less those whose τ costs the target, found on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.gene.layer_keys()


class PrunedChecked(Checked):
    """Keys pruned at the target, then the λ check (development round 13, fifth candidate).

    The elimination of :class:`Pruned` (τ at λ = 1, the calibration prompts) finds the key whose τ
    costs the task (the StableLM season models' ``embed``), but the calibration that follows can
    refuse fewer of those prompts than λ = 1 on the same keys; so the kept keys go through
    :class:`Checked`'s choice (calibrated λ, λ = 1, the grid's uniform γ; ties to the calibrated
    λ). ``meta["pruned"]`` and ``meta["choice"]`` record both steps."""

    name, slug = "SafeGene-pruned-checked", "prunedchecked"
    summary = "SafeGene-pruned's keys with the λ check (calibrated λ, λ = 1 or uniform γ) on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.selected_keys

    def coeffs(self, ctx: Context) -> Coeffs:
        kept, pruned = _prune_at_target(ctx, self.layers(ctx), lambda: self.measure(ctx))
        c = self.check(ctx, kept)
        c.meta.update({"method": "safegene-pruned-checked", "pruned": pruned})
        return c

    def lam_text(self, c: Coeffs) -> str:
        return f"{_pruned_lam_text(c)} ({c.meta.get('chosen')})"

    def details(self, c: Coeffs) -> dict[str, Any]:
        return {**_pruned_details(self, c), "chosen": c.meta.get("chosen"), "choice": c.meta.get("choice")}


class NoSelectionPrunedChecked(PrunedChecked):
    """:class:`PrunedChecked` starting from every gene key. A candidate of development round 13."""

    name, slug = "no-selection-pruned-checked", "noselprunedchecked"
    summary = "every key pruned at the target, then the λ check on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.gene.layer_keys()


class EmbedMasked(NoSelectionPrunedChecked):
    """:class:`NoSelectionPrunedChecked` on τ with the token-embedding rows the task fine-tune moved
    set to zero (development round 14, ``bench/dev_split.md``).

    A fine-tune moves only the embedding rows of the tokens its data contains; where the degraded
    copy learned the same words, τ's rows for them undo the task skill (the StableLM season
    models). :func:`safegene.ops.project.project_gene` with ``mode="touched"`` on the ``embed``
    key writes the masked gene (every other key unchanged) beside the gene, and the adopted
    procedure runs on it; ``meta["gene_path"]`` is that gene (the demo applies it) and
    ``meta["masked"]`` the projection record. Needs the aligned model (:attr:`Context.aligned`).
    A candidate, not the default."""

    name, slug = "no-selection-pruned-checked-embed-masked", "embedmasked"
    summary = ("no-selection-pruned-checked on τ without the embedding rows of the tokens the task fine-tune "
               "moved")
    #: the gene key masked
    key = "embed"

    def applies(self, ctx: Context) -> bool:
        return ctx.aligned is not None

    def coeffs(self, ctx: Context) -> Coeffs:
        import dataclasses

        from ..ops.project import project_gene

        if ctx.aligned is None:
            raise UsageError(f"the {self.name} policy needs the aligned model (Context.aligned)")
        gene = ctx.gene
        if self.key not in gene.layer_keys():
            c = super().coeffs(ctx)
            c.meta.update({"gene_path": str(gene.path), "masked": None})
            return c
        work = Path(ctx.work_dir) if ctx.work_dir is not None else gene.path.parent
        work.mkdir(parents=True, exist_ok=True)
        masked = project_gene(gene, ctx.aligned, ctx.task, work / f"{gene.path.name}-embedmask-{Path(ctx.task).name}",
                              mode="touched", only=[self.key], overwrite=True)
        ctx.loaded()  # the masked context shares the loaded task model
        c = super().coeffs(dataclasses.replace(ctx, gene=masked))
        c.meta.update({"method": "safegene-embed-masked", "gene_path": str(masked.path),
                       "masked": masked.manifest["projection"]})
        return c

    def lam_text(self, c: Coeffs) -> str:
        m = c.meta.get("masked") or {}
        return f"{super().lam_text(c)} ({m.get('rows_projected', 0)} embed rows masked)"


class Trimmed(Calibrated):
    """SafeGene's calibrated λ, then keys trimmed at the target (development round 13, third
    candidate): :func:`prune_keys` at the calibrated λ (each trial sets one more key's λ to 0),
    scored on the calibration prompts; the result is the calibrated λ on the kept keys, i.e.
    exactly what was measured last. ``meta["pruned"]`` has the kept and dropped keys and the
    trace. Costs one generation pass over the calibration prompts per set tried beyond SafeGene's
    calibration. A candidate, not the default."""

    name, slug = "SafeGene-trimmed", "trimmed"
    summary = "SafeGene's λ with the keys whose τ costs the target set to 0, found on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.selected_keys

    def coeffs(self, ctx: Context) -> Coeffs:
        c = self.calibrate(ctx)
        kept, pruned = _prune_at_target(ctx, self.layers(ctx), lambda: calibration_measure(ctx), coeffs=dict(c.coeffs))
        return Coeffs({k: v for k, v in c.coeffs.items() if k in kept},
                      {**c.meta, "method": "safegene-trimmed", "calibrated": dict(c.coeffs), "pruned": pruned})

    def lam_text(self, c: Coeffs) -> str:
        return _pruned_lam_text(c)

    def details(self, c: Coeffs) -> dict[str, Any]:
        return _pruned_details(self, c)


class NoSelectionTrimmed(Trimmed):
    """:class:`Trimmed` from the no-selection row (every gene key calibrated, then trimmed at the
    target). A candidate of development round 13, not the default."""

    name, slug = "no-selection-trimmed", "noseltrimmed"
    summary = "no-selection's λ with the keys whose τ costs the target set to 0, found on the calibration prompts"

    def layers(self, ctx: Context) -> list[str]:
        return ctx.gene.layer_keys()


#: Every policy, in the order tables list them.
POLICIES: dict[str, Policy] = {p.name: p for p in (NoDefence(), Resta(), SafeMerge(), NoSelection(), NoCalibration(),
                                                   SafeGene(), AltScore(), RestaLoss(), TaskAware(), Checked(),
                                                   NoSelectionChecked(), Pruned(), NoSelectionPruned(),
                                                   Trimmed(), NoSelectionTrimmed(), PrunedChecked(),
                                                   NoSelectionPrunedChecked(), EmbedMasked())}
#: The rows a default run produces (the alternative-score row is opt-in).
DEFAULT_METHODS: tuple[str, ...] = ("none", "RESTA", "SafeMERGE", "no-selection", "no-calibration", "SafeGene")


def names() -> list[str]:
    return list(POLICIES)


def get(name: str) -> Policy:
    """The policy registered under ``name``; a :class:`UsageError` listing the names otherwise."""
    try:
        return POLICIES[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose from {names()}") from None


def select(methods: Sequence[str]) -> list[Policy]:
    """The named policies in registry order (every name checked first)."""
    unknown = [m for m in methods if m not in POLICIES]
    if unknown:
        raise UsageError(f"unknown method(s) {unknown}; choose from {names()}")
    return [p for n, p in POLICIES.items() if n in set(methods)]


def iter_policies() -> Iterator[Policy]:
    return iter(POLICIES.values())


def compute(policy: Union[str, Policy], ctx: Context) -> Coeffs:
    """Run one policy; its meta gains ``policy`` (the name) and ``policy_seconds``."""
    p = get(policy) if isinstance(policy, str) else policy
    t0 = time.perf_counter()
    c = p.coeffs(ctx)
    c.meta["policy"] = p.name
    c.meta["policy_seconds"] = round(time.perf_counter() - t0, 3)
    return c


__all__ = ["Context", "Settings", "Policy", "POLICIES", "DEFAULT_METHODS", "names", "get", "select", "compute",
           "iter_policies", "lam_summary", "rule_cost", "prune_keys"]
