"""``safegene calibrate``: few-shot per-layer coefficients for one task model."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Union

from ..baselines.registry import POLICIES, Calibrated
from ..errors import UsageError
from ..method.calibrate import OPTIMIZERS, SAFETY_REST_WEIGHT, SAFETY_TARGETS, calibrate
from ..method.lowmem import MODES
from .options import Command, ModelOptions, option

#: ``--method`` choices: the registry's policies that calibrate (safegene.baselines)
METHODS = tuple(n for n, p in POLICIES.items() if isinstance(p, Calibrated))
#: the options that only ``--method`` reads
_METHOD_ONLY = ("task_calib", "benign_calib", "judge", "max_new_tokens", "work_dir")
#: the options ``--method`` carries into :class:`safegene.baselines.Settings` / :class:`Context`
#: (every other calibration option must stay at its default there)
_METHOD_CARRIES = frozenset({"gene", "target", "output", "safety", "utility", "steps", "lr", "optimizer", "lambda_max",
                             "max_examples", "safety_target", "aligned", "benign", "method", "task_calib",
                             "benign_calib", "judge", "max_new_tokens", "work_dir"})


@dataclass(kw_only=True)
class CalibrateOptions(ModelOptions):
    gene: str = option(positional=True, help="gene directory (from `safegene extract`, with a selection from "
                                             "`safegene select`), or a Hub id org/name[@revision]")
    target: str = option(positional=True, help="task model directory (Hugging Face format), or BASE+LORA_DIR")
    output: str = option(short="-o", help="where to write COEFFS.json")
    safety: str = option(path="in", help="JSONL of harmful prompts with refusal completions")
    utility: list[str] | None = option(None, path="in", help="JSONL(s) of task examples with answers and/or benign "
                                                             "prompts without completion")
    layers: str | None = option(None, help="comma-separated layer keys, or 'all' (default: the gene's selection)")
    steps: int = option(40, help="at most this many optimisation steps (default 40; the run stops earlier on a "
                                 "plateau, see --patience/--tol)")
    lr: float = option(0.05, help="learning rate (default 0.05; with --optimizer lbfgs the initial step of the "
                                  "line search, 1 is usual)")
    optimizer: str = option("adam", choices=OPTIMIZERS,
                            help="adam (default) or lbfgs (L-BFGS with a strong-Wolfe line search, projected onto "
                                 "[0, lambda_max]); for a few dozen λ L-BFGS usually needs far fewer steps")
    beta: float = option(3.0, help="weight of the utility term (default 3)")
    l2: float = option(1e-3, help="weight of the L2 penalty ‖λ‖² (default 1e-3)")
    lambda_max: float = option(4.0, help="upper bound of every λ (default 4)")
    init: str = option("grid", help="'grid' (default), 'ones', 'zeros' or a number")
    per_module: bool = option(False, help="one λ per module type (attn/mlp/norm) per layer")
    utility_loss: str = option(
        "kl", choices=("auto", "ce", "kl"),
        help="kl: KL to the task model on its own greedy responses (default); ce: CE of the records' completions; "
             "auto: CE where a record has a completion, KL at the first response token otherwise")
    safety_first_k: int = option(2, help="only the first K refusal tokens count (default 2; 0 = the whole refusal)")
    max_examples: int = option(16, help="at most this many examples of each kind (default 16)")
    refusal: str | None = option(None, help="refusal text for safety records without a completion")
    mode: str = option("exact", choices=MODES,
                       help="exact: W = W_T + λτ in weight space (default, the reference); lowmem: λ·(τx) added to "
                            "each selected layer's output, no weight gradients and no copy of the weights")
    micro_batch_size: int | None = option(
        None, metavar="N",
        help="run the examples through the model N at a time and accumulate the loss and gradient (same result "
             "as one batch, less activation memory; default: one batch)")
    gradient_checkpointing: bool = option(
        False, help="recompute each decoder block's activations in the backward pass instead of keeping them "
                    "(same gradient, less memory, about one more forward per step)")
    safety_rest_weight: float = option(
        SAFETY_REST_WEIGHT, help="weight of the refusal tokens after the first --safety-first-k in the safety loss "
                                 "(default 1, chosen on the development split; 0: only those count)")
    holdout: float = option(
        0.0, help="fraction of the examples held out of the fit; their loss picks the step (default 0: none)")
    holdout_by: str = option(
        "auto", help="hold out whole groups of safety records by this metadata key: auto (template, else "
                     "category; default), a key, or 'index' (every k-th record)")
    reg_uniform: float = option(0.0, help="weight of the pull Σ(λ − γ̄)² toward the uniform start γ̄ (default 0)")
    patience: int = option(8, help="stop when the held-out loss (the fit loss without --holdout) has not improved "
                                   "by --tol for this many steps (default 8)")
    tol: float = option(1e-4, help="relative improvement that counts: best − new > tol·max(|best|, 1) "
                                   "(default 1e-4)")
    safety_target: str = option(
        "string", choices=SAFETY_TARGETS,
        help="string: CE of the refusal completions (default); distill: KL to the --aligned model's own first "
             "--distill-k greedy tokens on each safety prompt")
    aligned: str | None = option(None, path="in", help="aligned model directory (for --safety-target distill)")
    distill_k: int = option(8, help="tokens of the aligned model's continuation distilled (default 8)")
    benign: list[str] | None = option(
        None, path="in", help="JSONL(s) of benign prompts: KL to the task model on its first --benign-k greedy "
                              "tokens, added to the utility term (guards over-refusal)")
    benign_k: int = option(4, help="tokens of each benign prompt's continuation kept (default 4)")
    benign_weight: float = option(1.0, help="weight of the benign term inside the utility term (default 1)")
    heldout_patience: int | None = option(
        None, help="with --holdout: stop when the held-out loss has not improved for this many steps "
                   "(default: stop on the fit loss)")
    method: str | None = option(
        None, choices=METHODS,
        help="run a whole coefficient policy of safegene.baselines instead of one calibration, e.g. "
             "no-selection-pruned-checked (the demo's SafeGene row: every gene key, keys whose τ costs this model "
             "dropped, the kept keys calibrated, then λ checked against λ = 1 and one uniform γ, all on the "
             "calibration prompts); needs --task-calib with answers and a --judge; carries --steps, --lr, "
             "--optimizer, --lambda-max, --max-examples, --safety-target/--aligned and --benign")
    task_calib: str | None = option(
        None, path="in",
        help="with --method: JSONL of task prompts with their answers, scored for accuracy at each check (default: "
             "the first --utility file)")
    benign_calib: str | None = option(
        None, path="in",
        help="with --method: JSONL of benign prompts, scored for over-refusal at each check (default: the first "
             "--benign file; none: over-refusal not checked)")
    judge: str = option("keyword",
                        help="with --method: the judge of the checks: keyword (default), tri, organism, "
                             "organism:stablelm, guard:PATH (safegene.eval.judges.get_judge)")
    max_new_tokens: int = option(32, help="with --method: tokens generated per check prompt (default 32)")
    work_dir: str | None = option(None, path="out",
                                  help="with --method: where policies that write a per-target gene put it "
                                       "(default: beside the gene)")


def _parse_init(s: str) -> Union[str, float]:
    try:
        return float(s)
    except ValueError:
        return s


def _set_away_from_default(opts: CalibrateOptions, names) -> list[str]:
    """The flags of ``names`` whose value differs from the option's default."""
    fields = {f.name: f for f in dataclasses.fields(CalibrateOptions)}
    return ["--" + n.replace("_", "-") for n in names
            if fields[n].default is not dataclasses.MISSING and getattr(opts, n) != fields[n].default]


def _method_unsupported(opts: CalibrateOptions) -> list[str]:
    """The calibration options set away from their defaults that ``--method`` does not carry."""
    common = {f.name for f in dataclasses.fields(ModelOptions)}  # with CommonOptions' --quiet / --json
    return _set_away_from_default(opts, [f.name for f in dataclasses.fields(CalibrateOptions)
                                         if f.name not in _METHOD_CARRIES and f.name not in common])


def run_method(opts: CalibrateOptions):
    """``--method``: the named policy of :mod:`safegene.baselines` on the target, with the
    options it carries; the result is saved to ``--output`` like a calibration's."""
    from .. import lm
    from ..baselines import Context, Settings, compute

    bad = _method_unsupported(opts)
    if bad:
        raise UsageError(f"--method {opts.method} does not take {', '.join(bad)} (it carries --steps, --lr, "
                         "--optimizer, --lambda-max, --max-examples, --safety-target, --aligned and --benign)")
    task_calib = opts.task_calib or (opts.utility[0] if opts.utility else None)
    if task_calib is None:
        raise UsageError(f"--method {opts.method} needs --task-calib (task prompts with answers) or --utility")
    benign_calib = opts.benign_calib or (opts.benign[0] if opts.benign else None)
    model, tok = lm.load_model(opts.target, **opts.load_kwargs())
    def say(msg: str) -> None:  # stdout is the result's (JSON with --json)
        print(msg, file=sys.stderr)

    settings = Settings(calib_steps=opts.steps, lambda_max=opts.lambda_max, max_examples=opts.max_examples,
                        calib_log=None if opts.quiet else say, judge=opts.judge, max_new_tokens=opts.max_new_tokens,
                        optimizer=opts.optimizer, safety_target=None if opts.safety_target == "string" else opts.safety_target,
                        benign=opts.benign, lr=opts.lr)
    ctx = Context(opts.gene, opts.target, opts.safety, task_calib, aligned=opts.aligned, utility=opts.utility,
                  benign_calib=benign_calib, work_dir=opts.work_dir, model=model, tokenizer=tok, settings=settings)
    c = compute(opts.method, ctx)
    c.save(opts.output)
    if not opts.quiet:
        say(f"{opts.method}: {POLICIES[opts.method].lam_text(c)}; wrote {opts.output}")
    return c


def handle_calibrate(opts: CalibrateOptions) -> int:
    stray = [] if opts.method else _set_away_from_default(opts, _METHOD_ONLY)
    if stray:
        raise UsageError(f"{', '.join(stray)} only work with --method")
    if opts.method:
        c = run_method(opts)
        print(json.dumps({"output": opts.output, "coeffs": c.coeffs, "method": opts.method}) if opts.json
              else json.dumps(c.coeffs, indent=2))
        return 0
    c = calibrate(
        opts.gene, opts.target, opts.safety, opts.utility,
        layers=opts.layers, steps=opts.steps, lr=opts.lr, beta=opts.beta, l2=opts.l2,
        lambda_max=opts.lambda_max, init=_parse_init(opts.init), per_module=opts.per_module,
        utility_loss=opts.utility_loss, safety_first_k=opts.safety_first_k,
        max_examples=opts.max_examples, refusal=opts.refusal, out=opts.output, mode=opts.mode,
        micro_batch_size=opts.micro_batch_size, gradient_checkpointing=opts.gradient_checkpointing,
        safety_rest_weight=opts.safety_rest_weight, holdout=opts.holdout,
        holdout_by=None if opts.holdout_by == "index" else opts.holdout_by, reg_uniform=opts.reg_uniform,
        patience=opts.patience, heldout_patience=opts.heldout_patience, tol=opts.tol, optimizer=opts.optimizer,
        safety_target=opts.safety_target, aligned=opts.aligned, distill_k=opts.distill_k, benign=opts.benign,
        benign_k=opts.benign_k, benign_weight=opts.benign_weight, **opts.load_kwargs(),
        **({"log": None} if opts.quiet else {}),
    )
    if opts.json:
        print(json.dumps({"output": opts.output, "coeffs": c.coeffs}))
    else:
        print(json.dumps(c.coeffs, indent=2))
    return 0


COMMAND = Command(
    "calibrate", CalibrateOptions, handle_calibrate,
    help="learn per-layer coefficients λ for one task model from a few examples",
    description="Few-shot layer-wise recalibration: θ = θ_T + Σ λ_l τ_l, only λ is trained.",
)
register_cli = COMMAND.register
