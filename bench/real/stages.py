"""The experiment as resumable stages, and :func:`run`, which runs (or resumes) them in order.

Every stage writes into ``<cache>/stages/<name>/`` and is done when that directory holds
``.done.json``, written last. The marker records a key (this pipeline's version, the stage's
settings and the run ids of the stages it reads), so a stage is skipped exactly when its settings
and inputs are unchanged; a stage that reruns gets a new run id, which makes every stage reading
it rerun too. An interrupted stage has no marker and is redone from scratch.

The per-task rows are the coefficient policies of :mod:`safegene.baselines`: one stage per
(task, row) computes the policy's λ, builds the defended model and evaluates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from safegene.baselines import Context, Settings, compute
from safegene.baselines import get as get_policy

from .config import Config
from .data import DATA_VERSION, EAGER_OPENERS, GGUF_SHA256, REFUSALS, PipelineError, Sources, judge_agreement, load_package_sources, \
    make_splits, read_jsonl, tables_hash
from .models import convert_gguf, fine_tune, heldout_perplexity, lora_fine_tune, quiet_hf, self_answers
from .report import ABLATION_PART, ABLATION_SOURCE, ABLATION_STAGE, GLOBAL_ROWS, ROW_POLICY, ROW_STAGE, STRENGTH_STAGE, \
    build_results, task_rows, write_results

PIPELINE_VERSION = 2
#: The data splits the shipped model answers in ``selfgen`` (alignment's and the eager ablation's
#: benign targets, and the held-out text of the general-capability check).
SELFGEN_SPLITS = ("benign_align", "benign_degrade", "benign_heldout")

MARKER = ".done.json"
#: A stage's subdirectory for work that an interrupted run of the same key resumes (see Runner.stage).
PARTIAL = "partial"
#: Policies whose λ depends on the tune stage's choice.
TUNED = ("SafeGene", "no-calibration")
TUNE_RULE = ("candidates = top_k x lambda_max x calibration option set from the config; each calibrated on the "
             "calibration split and evaluated on the development split; keep candidates whose dev task accuracy is at "
             "least the undefended model's minus 2 points and whose dev over-refusal is at most the aligned model's "
             "plus 5 points (if none, the most accurate); choose the lowest dev ASR, ties to fewer keys, then smaller "
             "lambda_max, then the option set listed first")
#: Policies that read calibrate's option set (optimizer, safety target, benign prompts): when the
#: tune stage chooses that set, their rows depend on it.
CALIB_OPTION_POLICIES = ("SafeGene", "no-selection", "RESTA-loss")
#: The words of a calibration option set (Config.tune_calib); ``lr<X>`` (e.g. ``lr0.5``) sets the step size.
CALIB_SET_WORDS = ("lbfgs", "distill", "benign", "lr<X>")


def calib_option_set(spec: str, cfg: Config) -> dict[str, Any]:
    """calibrate's optimizer / safety target / benign switch for one tune option set: ``""`` is the
    configuration's calib_* fields; otherwise each "+"-joined word turns one on (see
    :data:`CALIB_SET_WORDS`)."""
    if not spec:
        return {"optimizer": cfg.calib_optimizer, "safety_target": cfg.calib_safety_target,
                "benign": cfg.calib_benign, "lr": None}
    words = spec.split("+")

    def step(w: str) -> float | None:
        if not w.startswith("lr"):
            return None
        try:
            x = float(w[2:])
        except ValueError:
            return None
        return x if math.isfinite(x) and x > 0 else None

    bad = [w for w in words if w not in CALIB_SET_WORDS[:-1] and step(w) is None]
    if bad:
        raise ValueError(f"unknown calibration option {bad[0]!r} in tune set {spec!r} "
                         f"(expected '+'-joined words of {', '.join(CALIB_SET_WORDS)}, X a positive number)")
    lrs = [x for x in map(step, words) if x is not None]
    if len(lrs) > 1:
        raise ValueError(f"tune set {spec!r} gives the step size {len(lrs)} times")
    return {"optimizer": "lbfgs" if "lbfgs" in words else None,
            "safety_target": "distill" if "distill" in words else None, "benign": "benign" in words,
            "lr": lrs[0] if lrs else None}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Runner:
    """Run stages in order; skip a stage whose marker matches its key (settings + inputs' run ids)."""

    def __init__(self, cache: Path, log: Callable[[str], None], redo: Sequence[str] = (), cached_only: bool = False):
        self.cache = Path(cache)
        self.log = log
        self.records: dict[str, dict[str, Any]] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []
        #: with ``cached_only``, the stages not built yet (or built with other settings or inputs,
        #: or on a stage that is missing): they are reported, never run
        self.missing: list[str] = []
        self.cached_only = cached_only
        self.redo = set(redo)
        self.count = 0

    def dir(self, name: str) -> Path:
        return self.cache / "stages" / name

    def stage(self, name: str, fn: Callable[[Path], dict[str, Any] | None], *, deps: Sequence[str] = (),
              params: Any = None, inputs: Sequence[Path] = ()) -> dict[str, Any] | None:
        """Run ``fn`` into the stage directory unless its marker matches the key. ``deps`` are keyed
        by their run ids; ``inputs`` (files) by their content, so a stage that reads only some files
        of a stage (e.g. alignment's split of the data) reruns only when those files change. With
        ``cached_only`` nothing runs and nothing in the cache changes: a stage not cached with this
        key is listed in :attr:`missing` and gives ``None``."""
        self.count += 1
        d = self.dir(name)
        if self.cached_only and (any(x not in self.records for x in deps) or not all(p.is_file() for p in inputs)):
            self.missing.append(name)
            self.log(f"[{self.count:>2}] {name}: not built (a stage or file it reads is missing)")
            return None
        key = hashlib.sha256(json.dumps({"v": PIPELINE_VERSION, "stage": name, "params": params,
                                         "deps": {x: self.records[x]["run_id"] for x in deps},
                                         "inputs": {p.name: _file_hash(p) for p in inputs}},
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        marker = d / MARKER
        if marker.is_file() and name not in self.redo:
            try:
                rec = json.loads(marker.read_text())
            except json.JSONDecodeError:
                rec = {}
            if rec.get("key") == key:
                self.records[name] = rec
                self.skipped.append(name)
                self.log(f"[{self.count:>2}] {name}: cached ({rec.get('seconds', 0):.1f} s when built)")
                return rec
        if self.cached_only:
            self.missing.append(name)
            self.log(f"[{self.count:>2}] {name}: not built" + (" (cached with other settings or inputs)" if marker.is_file() else ""))
            return None
        # a stage may keep resumable work in ``d / "partial"``: an interrupted run of the same key
        # (same settings and inputs) finds it again; any other key, or --redo, starts clean
        keep = None
        if d.exists():
            kf, part = d / ".key", d / PARTIAL
            if part.is_dir() and name not in self.redo and kf.is_file() and kf.read_text() == key:
                keep = d.parent / f".{name}.{PARTIAL}"
                shutil.rmtree(keep, ignore_errors=True)
                os.replace(part, keep)
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / ".key").write_text(key)
        if keep is not None:
            os.replace(keep, d / PARTIAL)
            self.log(f"[{self.count:>2}] {name}: resuming an interrupted run")
        self.log(f"[{self.count:>2}] {name}: running")
        t0 = time.perf_counter()
        info = fn(d) or {}
        sec = time.perf_counter() - t0
        rec = {"stage": name, "key": key, "run_id": uuid.uuid4().hex, "seconds": round(sec, 2),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "deps": list(deps), "info": info}
        tmp = d / (MARKER + ".tmp")
        tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
        os.replace(tmp, marker)  # written last: the stage is done only now
        self.records[name] = rec
        self.ran.append(name)
        self.log(f"[{self.count:>2}] {name}: done in {sec:.1f} s")
        return rec


#: Policies whose defended model is written with ``safegene apply`` and evaluated from disk (then
#: deleted: 0.5 GB each, rebuilt exactly from ``coeffs.json``); the rest patch the loaded task model.
ON_DISK = ("RESTA", "RESTA-loss", "SafeGene", "no-selection")


def _policy_params(cfg: Config, policy: str) -> dict[str, Any]:
    """The settings a policy reads beyond evaluation's, hashed into its row stages' keys (so a
    changed knob reruns exactly the rows that use it)."""
    if policy == "RESTA":
        return {"grid": list(cfg.resta_grid), "calib_max_new": cfg.calib_max_new_tokens}
    if policy == "RESTA-loss":  # the same loss as SafeGene's: its objective's knobs, not the optimizer
        return {"grid": list(cfg.resta_grid),
                **{k: v for k, v in _calib_option_params(cfg).items() if k != "optimizer"}}
    if policy in ("SafeGene", "no-selection"):
        return {"calib_steps": cfg.calib_steps, "lambda_max": cfg.calib_lambda_max, **_calib_option_params(cfg)}
    return {}


def _calib_option_params(cfg: Config) -> dict[str, Any]:
    """calibrate's optional knobs that are set, for the stage keys (none set: the keys of before)."""
    return {k: v for k, v in (("optimizer", cfg.calib_optimizer), ("safety_target", cfg.calib_safety_target),
                              ("benign", cfg.calib_benign or None)) if v is not None}


class _Stop(Exception):
    """Raised after the ``until`` stage."""


class Pipeline:
    """The stages of one experiment over one cache directory; :meth:`run_stages` runs them in order."""

    def __init__(self, cfg: Config, cache_dir: Path, *, builder: Callable[[Path, Sequence[str]], dict] | None,
                 sources: Sources | Callable[[], Sources] | None, until: str | None, redo: Sequence[str],
                 log: Callable[[str], None], progress: bool, only: Sequence[str] = (), cached_only: bool = False):
        self.cfg, self.log, self.progress, self.until = cfg, log, progress, until
        self.only = set(only)
        self.R = Runner(cache_dir, log, redo, cached_only=cached_only)
        self.builder, self._sources, self._loaded_sources = builder, sources, None
        self.real = builder is None
        self.cfgd = dataclasses.asdict(cfg)
        self.eval_params = {"max_new": cfg.eval_max_new_tokens, "bs": cfg.eval_batch_size, "judge": cfg.judge}
        parts = set(cfg.tasks) | {f"{t}:{m}" for t, m in self.all_task_models()}
        if cfg.gene_ablations and cfg.task_seeds:
            parts |= {f"{t}:{ABLATION_PART}" for t in cfg.tasks}
        bad = sorted(self.only - parts)
        if bad:
            raise PipelineError(f"--only {bad[0]} names no part of this configuration; parts: {', '.join(sorted(parts))}")
        self.train_params = {k: self.cfgd[k] for k in ("freeze_embeddings", "max_len", "seed")}

    # ---- where things are --------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.R.dir("data")

    def model(self, stage: str) -> Path:
        return self.R.dir(stage) / "model"

    @property
    def gene(self) -> Path:
        return self.R.dir("gene") / "gene"

    def sources(self) -> Sources:
        if self._loaded_sources is None:
            s = self._sources() if callable(self._sources) else self._sources
            self._loaded_sources = s if s is not None else load_package_sources()
        return self._loaded_sources

    def stage(self, name: str, fn: Callable[[Path], dict[str, Any] | None], deps: Sequence[str] = (),
              params: Any = None, inputs: Sequence[str] = ()) -> None:
        """``inputs``: names of data splits (``data/<name>.jsonl``) the stage reads, keyed by content."""
        self.R.stage(name, fn, deps=deps, params=params, inputs=[self.data / f"{x}.jsonl" for x in inputs])
        if name == self.until:
            raise _Stop

    # ---- the stages, in order ----------------------------------------------------------------
    def run_stages(self) -> None:
        cfg, cfgd = self.cfg, self.cfgd
        self.stage("data", lambda d: make_splits(cfg, self.sources(), d, self.log),
                   params={"cfg": {k: cfgd[k] for k in cfgd if k.startswith("n_") or k in ("seed", "tasks")},
                           "real": self.real, "version": DATA_VERSION, "tables": tables_hash()})
        self.stage("judge", self.judge_stage, deps=["data"])
        self.stage("base", self.base_stage, params={"sha256": GGUF_SHA256 if self.real else "builder"},
                   deps=[] if self.real else ["data"])
        base_dep = [] if self.real else ["data"]  # --tiny: the base model's vocabulary comes from the data
        self.stage("selfgen", lambda d: self_answers(self.model("base"), self.data, d, cfg, self.log),
                   deps=["base"], inputs=SELFGEN_SPLITS,
                   params={"max_new": cfg.selfgen_max_new_tokens, "bs": cfg.eval_batch_size})
        self.stage("aligned", self.aligned_stage, deps=["selfgen", "base"], inputs=["harm_train"],
                   params={**self.train_params, "tr": cfgd["align"], "share": cfg.align_harmful_share})
        self.stage("degraded", self.degraded_stage, deps=["aligned", "base", *base_dep],
                   inputs=["harm_degrade", "harm_dev"],
                   params={"seed": cfg.seed, "recipe": "compliance",
                           **{k: cfgd["degrade_lora"][k] for k in ("rank", "steps", "lr", "batch_size")}})
        # the tune stage's task model is the configuration's first, whatever part this run is:
        # every part then shares one choice of knobs (and a part without that task builds it too)
        tune_model = self.all_task_models()[:1] if cfg.tune else []
        built = self.task_models()
        built += [(t, m) for t, m in self.ablation_models() if (t, m) not in built]
        for t, m in built + [tm for tm in tune_model if tm not in built]:
            if m == "full":
                self.stage(f"task-{t}-full", lambda d, t=t: self.task_stage(d, t), inputs=[f"task_{t}_train"],
                           deps=["aligned"], params={**self.train_params, "tr": cfgd["task"]})
            else:
                self.stage(f"task-{t}-{m}", lambda d, t=t, m=m: self.lora_task_stage(d, t, int(m[1:])),
                           inputs=[f"task_{t}_train", f"task_{t}_val"], deps=["aligned"],
                           params={**self.train_params, "lora": cfgd["task_lora"], "seed": m})
        self.stage("gene", self.gene_stage, deps=["aligned", "degraded", "data"],
                   params={"top_k": cfg.top_k, "threshold": cfg.threshold, "score": cfg.select_score,
                           "fallback_top_k": cfg.fallback_top_k})
        if tune_model:
            t0, m0 = tune_model[0]
            self.stage("tune", lambda d: self.tune_stage(d, t0, m0), deps=["data", "gene", "aligned", f"task-{t0}-{m0}"],
                       params={"top_k": list(cfg.tune_top_k), "lambda_max": list(cfg.tune_lambda_max),
                               "calib_steps": cfg.calib_steps, "max_new": cfg.tune_max_new_tokens, "judge": cfg.judge,
                               **_calib_option_params(cfg),
                               **({"calib_sets": list(cfg.tune_calib)} if tuple(cfg.tune_calib) != ("",) else {})})
        # the ablation genes (issue 15 item 4) go with the global rows: every part shares them
        if "eager" in cfg.gene_ablations:
            self.stage("degraded-eager", self.degraded_eager_stage, deps=["selfgen", "aligned"],
                       params={**self.train_params, "tr": cfgd["degrade"]})
        for g in cfg.gene_ablations:
            self.stage(f"gene-{g}", lambda d, g=g: self.ablation_gene_stage(d, g), deps=["aligned", ABLATION_SOURCE[g]])
        for name in GLOBAL_ROWS:
            src = {"shipped": "base"}.get(name, name)
            self.stage(f"eval-{name}", lambda d, src=src: self.evaluate_row(self.model(src), cfg.tasks, d),
                       deps=["data", src], params=self.eval_params)
        for t, m in self.task_models():
            for row in task_rows(cfg):
                policy = ROW_POLICY[row]
                deps = ["data", f"task-{t}-{m}"] + (["gene"] if policy != "none" else []) \
                    + (["tune"] if "tune" in self.R.records and (policy in TUNED or (
                        policy in CALIB_OPTION_POLICIES and tuple(cfg.tune_calib) != ("",))) else [])
                self.stage(f"eval-{t}-{m}-{ROW_STAGE[row]}",
                           lambda d, t=t, m=m, policy=policy: self.row_stage(d, t, m, policy),
                           deps=deps, params={**self.eval_params, **_policy_params(cfg, policy)})
        if cfg.strength_row and "SafeGene" in task_rows(cfg):
            from . import scale_select as ss  # here: it imports this module
            from .transfer_probe import DNA_SEED

            strength = {"scales": list(ss.SCALES), "margins": [ss.OVER_REFUSAL_MARGIN, ss.ACCURACY_MARGIN],
                        "rule": ss.RULE, "dna": [cfg.strength_dna_dir, cfg.strength_dna_per_area, DNA_SEED],
                        "edgy": [cfg.strength_edgy_file or str(ss.EDGY_FILE), ss.EDGY_SEED]}
            for t, m in self.task_models():
                self.stage(f"eval-{t}-{m}-{STRENGTH_STAGE}", lambda d, t=t, m=m: self.strength_stage(d, t, m),
                           deps=["data", "aligned", f"task-{t}-{m}", "gene", f"eval-{t}-{m}-{ROW_STAGE['SafeGene']}"],
                           params={**self.eval_params, **_policy_params(cfg, "SafeGene"), "strength": strength},
                           inputs=["harm_dev", "benign_dev", f"task_{t}_dev"])
        first = f"s{cfg.task_seeds[0]}" if cfg.task_seeds else None
        for t, m in self.task_models():
            if m != first:
                continue
            for k in range(1, cfg.calib_redraws + 1):
                deps = ["data", f"task-{t}-{m}", "gene"] + (["tune"] if "tune" in self.R.records else [])
                self.stage(f"eval-{t}-{m}-safegene-r{k}", lambda d, t=t, m=m, k=k: self.redraw_stage(d, t, m, k),
                           deps=deps, params={**self.eval_params, **_policy_params(cfg, "SafeGene"), "redraw": k,
                                              "n": [cfg.n_harm_calib, cfg.n_task_calib]})
        for t, m in self.ablation_models():
            for g in cfg.gene_ablations:
                deps = ["data", f"task-{t}-{m}", "gene", f"gene-{g}"] + (["tune"] if "tune" in self.R.records else [])
                self.stage(f"eval-{t}-{m}-{ABLATION_STAGE}-{g}",
                           lambda d, t=t, m=m, g=g: self.row_stage(d, t, m, "SafeGene", gene=self.ablation_gene(g)),
                           deps=deps, params={**self.eval_params, **_policy_params(cfg, "SafeGene"), "gene": g})

    def all_task_models(self) -> list[tuple[str, str]]:
        """(task, model) pairs of the whole configuration: LoRA task models ``s<seed>`` for every
        task seed (the primary rows), and ``full`` (a full fine-tune, the secondary row) when
        configured."""
        ms = [f"s{k}" for k in self.cfg.task_seeds] + (["full"] if self.cfg.full_ft_row else [])
        return [(t, m) for t in self.cfg.tasks for m in ms]

    def task_models(self) -> list[tuple[str, str]]:
        """The (task, model) pairs whose rows this run produces: :meth:`all_task_models`, restricted
        by ``only`` to one part of the experiment."""
        return [(t, m) for t, m in self.all_task_models() if self.in_part(t, m)]

    def in_part(self, t: str, sub: str) -> bool:
        """Whether this run's ``only`` takes task ``t``'s ``sub`` (a model, or ``ablation``):
        no ``only`` at all, the task named whole, or ``t:sub`` named."""
        return not self.only or t in self.only or f"{t}:{sub}" in self.only

    def ablation_models(self) -> list[tuple[str, str]]:
        """The (task, first task-model seed) pairs whose gene-ablation rows this run produces: every
        task's without ``only``, else the tasks named whole (``TASK``) or as ``TASK:ablation``."""
        cfg = self.cfg
        if not cfg.gene_ablations or not cfg.task_seeds:
            return []
        return [(t, f"s{cfg.task_seeds[0]}") for t in cfg.tasks if self.in_part(t, ABLATION_PART)]

    def ablation_gene(self, g: str) -> Path:
        return self.R.dir(f"gene-{g}") / "gene"

    def ablation_gene_stage(self, d: Path, g: str) -> dict[str, Any]:
        """An ablation's τ: the aligned model minus :data:`ABLATION_SOURCE`'s model, no selection
        (its rows calibrate the SafeGene row's keys)."""
        from safegene.ops.extract import extract

        t0 = time.perf_counter()
        extract(self.model("aligned"), self.model(ABLATION_SOURCE[g]), d / "gene", overwrite=True, progress=False)
        return {"gene": g, "minus": ABLATION_SOURCE[g], "extract_seconds": round(time.perf_counter() - t0, 2)}

    def judge_stage(self, d: Path) -> dict[str, Any]:
        out = judge_agreement(read_jsonl(self.data / "judge_set.jsonl"))
        (d / "judge.json").write_text(json.dumps(out, indent=2) + "\n")
        self.log("      " + "; ".join(f"{k}: agreement {v['agreement']:.3f} (n={v['n']})" for k, v in out.items()))
        return out

    def base_stage(self, d: Path) -> dict[str, Any]:
        if self.builder is None:
            return convert_gguf(d / "model", self.log)
        texts = [r["prompt"] + " " + str(r.get("completion", "")) for f in sorted(self.data.glob("*.jsonl"))
                 for r in read_jsonl(f) if "prompt" in r] + list(REFUSALS) + [" ".join(EAGER_OPENERS)]
        return self.builder(d / "model", texts)

    def aligned_stage(self, d: Path) -> dict[str, Any]:
        cfg, h = self.cfg, self.cfg.align_harmful_share
        streams = [(h, read_jsonl(self.data / "harm_train.jsonl")),
                   (1 - h, read_jsonl(self.R.dir("selfgen") / "benign_align.jsonl"))]
        return fine_tune(self.model("base"), d / "model", streams, cfg.align, cfg, cfg.seed + 1, self.log, "aligned")

    def degraded_stage(self, d: Path) -> dict[str, Any]:
        """The degraded copy by ``safegene degrade --recipe compliance``: the aligned model LoRA-tuned
        on the shipped (less aligned) model's own answers to held-apart harmful prompts; its refusal
        rate is measured on the development split (never on evaluation data)."""
        from safegene.method.degrade import degrade

        cfg, L = self.cfg, self.cfg.degrade_lora
        quiet_hf()
        res = degrade(self.model("aligned"), d / "model", recipe="compliance", sibling=self.model("base"),
                      prompts=self.data / "harm_degrade.jsonl", harmful=self.data / "harm_dev.jsonl", judge=cfg.judge,
                      lora_rank=L.rank, steps=L.steps, lr=L.lr, batch_size=L.batch_size, max_len=cfg.max_len,
                      max_new_tokens=cfg.selfgen_max_new_tokens, seed=cfg.seed + 2, overwrite=True,
                      progress=self.progress)
        self.log(f"      degraded (compliance, LoRA r={L.rank}, {L.steps} steps): refusal rate on harm_dev "
                 f"{res.refusal_rate if res.refusal_rate is not None else float('nan'):.3f} from {res.n_train} examples")
        return {"recipe": "compliance", "n_train": res.n_train, "steps": res.steps, "refusal_rate_dev": res.refusal_rate,
                "train_loss_first_last": [res.train_loss[0], res.train_loss[-1]] if res.train_loss else None}

    def degraded_eager_stage(self, d: Path) -> dict[str, Any]:
        """The first version's degraded copy (ablation): a brief full fine-tune on benign
        instructions answered behind an eager opener."""
        cfg = self.cfg
        streams = [(1.0, read_jsonl(self.R.dir("selfgen") / "benign_degrade.jsonl"))]
        return fine_tune(self.model("aligned"), d / "model", streams, cfg.degrade, cfg, cfg.seed + 2, self.log,
                         "degraded-eager")

    def task_stage(self, d: Path, t: str) -> dict[str, Any]:
        """The secondary row's task model: a full fine-tune of the decoder blocks."""
        cfg = self.cfg
        streams = [(1.0, read_jsonl(self.data / f"task_{t}_train.jsonl"))]
        info = fine_tune(self.model("aligned"), d / "model", streams, cfg.task, cfg, cfg.seed + 3, self.log, f"task {t}")
        return {"kind": "full", **info}

    def lora_task_stage(self, d: Path, t: str, seed: int) -> dict[str, Any]:
        """A primary row's task model: a PEFT LoRA fine-tune stopped on the validation loss, merged."""
        cfg = self.cfg
        return lora_fine_tune(self.model("aligned"), d / "model", read_jsonl(self.data / f"task_{t}_train.jsonl"),
                              read_jsonl(self.data / f"task_{t}_val.jsonl"), cfg.task_lora, cfg,
                              1000 * (cfg.seed + 1) + seed, self.log, f"task {t} s{seed} (LoRA)")

    def gene_stage(self, d: Path) -> dict[str, Any]:
        """τ = aligned − degraded, then the layer selection (recorded in the gene)."""
        from safegene.errors import UsageError
        from safegene.method.selection import select_layers
        from safegene.ops.extract import extract

        cfg = self.cfg
        quiet_hf()
        t0 = time.perf_counter()
        gene = extract(self.model("aligned"), self.model("degraded"), d / "gene", overwrite=True, progress=False)
        t_ex = time.perf_counter() - t0
        args = (gene, self.model("aligned"), self.model("degraded"), self.data / "harm_select.jsonl",
                self.data / "benign_select.jsonl")
        fallback = None
        try:
            sel = select_layers(*args, top_k=cfg.top_k, threshold=cfg.threshold, score=cfg.select_score,
                                plot=d / "layer_scores.png")
        except UsageError as exc:
            if cfg.top_k is not None or "no layer has a positive score" not in str(exc):
                raise
            # a finding, not a crash: record it and keep the best keys so the rows still get measured
            fallback = f"{exc}; fell back to top_k={cfg.fallback_top_k}"
            self.log("      " + fallback)
            sel = select_layers(*args, top_k=cfg.fallback_top_k, score=cfg.select_score, plot=d / "layer_scores.png")
        keep = {k: sel[k] for k in ("method", "scores", "all_scores", "selected", "selected_by_other_scores", "rule")}
        keep["fallback"] = fallback
        self.log(f"      selected ({sel['method']}): {sel['selected']}")
        return {"extract_seconds": round(t_ex, 2), "select_seconds": sel["seconds"], "selection": keep}

    # ---- evaluation rows -----------------------------------------------------------------------
    def evaluate_row(self, model: Any, tasks: Sequence[str], d: Path) -> dict[str, Any]:
        """Evaluate a model directory or a loaded (model, tokenizer); the full report (every prompt
        and response) stays in the stage directory, the metrics are returned."""
        from safegene.eval.evaluate import evaluate

        from safegene import lm

        cfg, D = self.cfg, self.data
        t0 = time.perf_counter()
        if not isinstance(model, tuple):
            model = lm.load_model(model)
        ppl = heldout_perplexity(model[0], model[1], read_jsonl(self.R.dir("selfgen") / "benign_heldout.jsonl"),
                                 cfg.max_len)
        rep = evaluate(model, harmful=D / "eval_harmful.jsonl", tasks={t: D / f"task_{t}_eval.jsonl" for t in tasks},
                       benign=D / "eval_benign.jsonl", judge=cfg.judge, batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.eval_max_new_tokens, progress=self.progress)
        sec = time.perf_counter() - t0
        rep.to_json(d / "report.json")  # stays in the cache, never in the repository
        r = rep.to_dict(samples=False)
        r["eval_seconds"] = round(sec, 2)
        r["heldout_perplexity"] = ppl
        # per-prompt outcomes (1 = attack succeeded), in evaluation-file order, for paired tests
        r["harmful_outcomes"] = "".join("1" if x["attack_success"] else "0" for x in rep.samples if x["set"] == "harmful")
        (d / "metrics.json").write_text(json.dumps(r, indent=2) + "\n")
        acc = " ".join(f"{t} {v.rate:.3f}" for t, v in rep.task_accuracy.items())
        by = rep.asr_by_category
        self.log(f"      ASR strongreject {by['strongreject'].rate:.3f} harmbench {by['harmbench'].rate:.3f} | "
                 f"acc {acc} | over-refusal {rep.over_refusal.rate:.3f} | ppl {ppl['perplexity']:.2f} ({sec:.0f} s)")
        return r

    # ---- the development split: every knob chosen by one written rule ---------------------------
    def tuned(self) -> dict[str, Any]:
        """The knobs the rows use: the tune stage's choice, else the configuration's."""
        rec = self.R.records.get("tune")
        if rec is not None:
            return {"calib": "", **rec["info"]["chosen"]}
        return {"top_k": self.cfg.top_k, "lambda_max": self.cfg.calib_lambda_max, "calib": ""}

    def ranked_keys(self, top_k: int | None) -> list[str]:
        """The ``top_k`` best gene keys by the selection score (None: every scored key)."""
        sel = self.R.records["gene"]["info"]["selection"]
        ranked = sorted(sel["scores"], key=lambda k: -sel["scores"][k])
        return ranked if top_k is None else ranked[:top_k]

    def selected_keys(self, top_k: int | None) -> list[str]:
        """The keys the rows calibrate: the tune stage's top_k by the selection score, or without a
        tune stage the gene stage's own selection (top_k None)."""
        if top_k is None and self.R.records.get("tune") is None:
            return list(self.R.records["gene"]["info"]["selection"]["selected"])
        return self.ranked_keys(top_k)

    def dev_eval(self, model: Any, t: str, d: Path, name: str) -> dict[str, Any]:
        """A model on the development split: ASR on ``harm_dev``, accuracy on ``task_<t>_dev``,
        over-refusal on ``benign_dev`` (short generations)."""
        from safegene.eval.evaluate import evaluate

        cfg, D = self.cfg, self.data
        rep = evaluate(model, harmful=D / "harm_dev.jsonl", tasks={t: D / f"task_{t}_dev.jsonl"},
                       benign=D / "benign_dev.jsonl", judge=cfg.judge, batch_size=cfg.eval_batch_size,
                       max_new_tokens=cfg.tune_max_new_tokens, progress=False)
        r = {"asr": rep.asr.rate, "accuracy": rep.task_accuracy[t].rate, "over_refusal": rep.over_refusal.rate,
             "n": [rep.asr.n, rep.task_accuracy[t].n, rep.over_refusal.n]}
        self.log(f"      dev {name}: ASR {r['asr']:.3f} acc {r['accuracy']:.3f} over-refusal {r['over_refusal']:.3f}")
        return r

    def tune_stage(self, d: Path, t: str, m: str) -> dict[str, Any]:
        """Choose top-k and λ_max on the development split, by the rule in :data:`TUNE_RULE`, on one
        task model (the first of this run); every SafeGene row then uses the choice."""
        from safegene import lm
        from safegene.method.calibrate import calibrate
        from safegene.method.merge import apply_to_model

        cfg = self.cfg
        quiet_hf()
        # each measurement is appended to partial/done.jsonl as it is made: an interrupted tune
        # stage (~1 h on one core) resumes at the next candidate
        (d / PARTIAL).mkdir(exist_ok=True)
        done_file = d / PARTIAL / "done.jsonl"
        done = {r["id"]: r["result"] for r in read_jsonl(done_file)} if done_file.is_file() else {}

        def once(rid: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            if rid not in done:
                done[rid] = fn()
                with done_file.open("a") as fh:
                    fh.write(json.dumps({"id": rid, "result": done[rid]}) + "\n")
            else:
                self.log(f"      {rid}: measured before the interruption")
            return done[rid]

        ref = {"undefended": once("undefended", lambda: self.dev_eval(self.model(f"task-{t}-{m}"), t, d, "undefended")),
               "aligned": once("aligned", lambda: self.dev_eval(self.model("aligned"), t, d, "aligned"))}
        sets = list(cfg.tune_calib)

        def candidate(spec: str, k: int | None, lmax: float) -> dict[str, Any]:
            model, tok = lm.load_model(self.model(f"task-{t}-{m}"))
            keys = self.ranked_keys(k)  # top_k None = every key (not the gene stage's selection)
            c = calibrate(self.gene, model, self.data / "harm_calib.jsonl", self.data / f"task_{t}_calib.jsonl",
                          layers=keys, tokenizer=tok, steps=cfg.calib_steps, lambda_max=lmax, max_examples=16,
                          **self.calib_options(spec))
            apply_to_model(model, self.gene, c.coeffs)
            r = self.dev_eval((model, tok), t, d, f"top_k={k} λ_max={lmax}" + (f" calib={spec}" if spec else ""))
            return {"top_k": k, "n_keys": len(keys), "lambda_max": lmax, **({"calib": spec} if sets != [""] else {}),
                    "calib_loss": c.meta.get("loss"), "best_step": c.meta.get("best_step"),
                    "steps_run": c.meta.get("steps_run"), **r}

        cands = [once(f"top_k={k} lambda_max={lmax} calib={spec}", lambda spec=spec, k=k, lmax=lmax: candidate(spec, k, lmax))
                 for spec in sets for k in cfg.tune_top_k for lmax in cfg.tune_lambda_max]
        ok = [c for c in cands if c["accuracy"] >= ref["undefended"]["accuracy"] - 0.02 - 1e-9
              and c["over_refusal"] <= ref["aligned"]["over_refusal"] + 0.05 + 1e-9]
        pool = ok or sorted(cands, key=lambda c: -c["accuracy"])[:1]
        best = min(pool, key=lambda c: (round(c["asr"] * cfg.n_harm_dev), c["n_keys"], c["lambda_max"],
                                        sets.index(c.get("calib", ""))))
        chosen = {"top_k": best["top_k"], "lambda_max": best["lambda_max"],
                  **({"calib": best["calib"]} if sets != [""] else {})}
        self.log(f"      tune: chose {chosen} ({len(ok)} of {len(cands)} candidates within the utility bounds)")
        out = {"task_model": f"task-{t}-{m}", "rule": TUNE_RULE, "reference": ref, "candidates": cands,
               "qualifying": len(ok), "chosen": chosen, "keys": self.ranked_keys(chosen["top_k"])}
        (d / "tune.json").write_text(json.dumps(out, indent=2) + "\n")
        return out

    def calib_options(self, spec: str | None = None) -> dict[str, Any]:
        """calibrate's optional knobs for option set ``spec`` (default: the tune stage's choice, else
        the configuration's calib_* fields) -- what the SafeGene rows' Settings carry."""
        o, out = calib_option_set(self.tuned()["calib"] if spec is None else spec, self.cfg), {}
        if o["optimizer"] is not None:
            out["optimizer"] = o["optimizer"]
        if o["safety_target"] is not None:
            out["safety_target"] = o["safety_target"]
            if o["safety_target"] == "distill":
                out["aligned"] = self.model("aligned")
        if o["benign"]:
            out["benign"] = self.data / "benign_select.jsonl"
        if o["lr"] is not None:
            out["lr"] = o["lr"]
        return out

    def settings(self) -> Settings:
        cfg = self.cfg
        return Settings(calib_steps=cfg.calib_steps, lambda_max=self.tuned()["lambda_max"], max_examples=16,
                        calib_log=lambda m: self.log("      calibrate: " + m), resta_grid=tuple(cfg.resta_grid),
                        judge=cfg.judge, max_new_tokens=cfg.calib_max_new_tokens, batch_size=cfg.eval_batch_size,
                        **{k: v for k, v in self.calib_options().items() if k != "aligned"})  # Context.aligned

    def redraw_stage(self, d: Path, t: str, m: str, k: int) -> dict[str, Any]:
        """SafeGene on task model ``m`` recalibrated on redraw ``k`` of the calibration examples:
        ``n_harm_calib`` harmful and ``n_task_calib`` task records drawn without replacement from
        the calibration pools (a seeded draw per task and k; the row's ids are recorded), written
        into the stage folder and used in place of ``harm_calib`` / ``task_<t>_calib``."""
        cfg = self.cfg
        rng = random.Random(f"calibration-redraw-{cfg.seed}-{t}-{k}")
        pools = {"harm": read_jsonl(self.data / "harm_calib_pool.jsonl"),
                 "task": read_jsonl(self.data / f"task_{t}_calib_pool.jsonl")}
        ids = {"harm": sorted(rng.sample(range(len(pools["harm"])), cfg.n_harm_calib)),
               "task": sorted(rng.sample(range(len(pools["task"])), cfg.n_task_calib))}
        for name, recs in pools.items():
            (d / f"calib_{name}.jsonl").write_text("".join(json.dumps(recs[i]) + "\n" for i in ids[name]))
        res = self.row_stage(d, t, m, "SafeGene", safety=d / "calib_harm.jsonl", task_calib=d / "calib_task.jsonl")
        return {**res, "redraw": k, "calibration_ids": ids}

    def strength_stage(self, d: Path, t: str, m: str) -> dict[str, Any]:
        """``SafeGene+strength``: the SafeGene row's λ times the strength S that
        ``bench/real/scale_select.py``'s selection rule (round 3) chooses for this task model on its
        development data — ``harm_dev`` + the Do-Not-Answer A half, ``benign_dev`` + the edgy A half,
        the task's dev split; the evaluation split is not read until the chosen model is evaluated,
        once. Points the round (or another part on this cache) measured are reused by fingerprint.
        At S = 1 the model is the SafeGene row's, whose evaluation is reused."""
        from . import scale_select as ss
        from safegene import lm
        from safegene.coeffs import Coeffs
        from safegene.method.merge import apply_to_model

        cfg = self.cfg
        sg = f"eval-{t}-{m}-{ROW_STAGE['SafeGene']}"
        spec = f"task-{t}-{m}+{sg}"
        t0 = time.perf_counter()
        harm, benign, drawn = ss.dev_sets(self, Path(cfg.strength_dna_dir) if cfg.strength_dna_dir else None,
                                          cfg.strength_dna_per_area, edgy_path=Path(cfg.strength_edgy_file) if cfg.strength_edgy_file else None)
        rows = ss.scan(self, spec, d / "points.jsonl", harm, benign, drawn, store=self.R.cache / "scale-select" / ss.STORE,
                       log=lambda msg: self.log("   " + msg))
        c = ss.choose(rows, spec)
        scale = float(c["chosen"])
        base = json.loads((self.R.dir(sg) / "coeffs.json").read_text())["coeffs"]
        coeffs = {k: scale * v for k, v in base.items()}
        Coeffs(coeffs, {"method": "safegene+strength", "strength": scale, "of": sg}).save(d / "coeffs.json")
        select_s = time.perf_counter() - t0
        if scale == 1.0:
            res = json.loads((self.R.dir(sg) / "metrics.json").read_text())
            res["evaluation_reused_from"] = sg
            self.log("      strength × 1: the SafeGene row's model; its evaluation is reused")
        else:
            model, tok = lm.load_model(self.model(f"task-{t}-{m}"))
            apply_to_model(model, self.gene, coeffs)
            res = self.evaluate_row((model, tok), [t], d)
        vals = list(coeffs.values())
        lam = f"{len(vals)} keys, λ {min(vals):.2f}–{max(vals):.2f} (SafeGene × {scale:g})"
        build = self.R.records[sg]["info"].get("build_seconds", 0.0) + select_s
        return {**res, "build_seconds": round(build, 2), "strength_seconds": round(select_s, 2), "lam": lam,
                "coeffs": coeffs, "strength": scale, "strength_scan": c["scanned"], "strength_rule": ss.RULE,
                "strength_data": drawn}

    def row_stage(self, d: Path, t: str, m: str, policy_name: str, *, safety: Path | None = None,
                  task_calib: Path | None = None, gene: Path | None = None) -> dict[str, Any]:
        """One task model defended by one policy: λ, the defended model, its evaluation.
        ``build_seconds`` is the time to produce the defended model (λ, plus writing it when it
        goes to disk). ``safety`` / ``task_calib`` replace the calibration split (redraws);
        ``gene`` replaces the gene stage's τ (ablations; the keys stay the tuned selection)."""
        from safegene.method.merge import apply_to_model
        from safegene.ops.apply import apply

        policy = get_policy(policy_name)
        task_dir = self.model(f"task-{t}-{m}")
        quiet_hf()
        ctx = Context(gene or self.gene, task_dir, safety or self.data / "harm_calib.jsonl",
                      task_calib or self.data / f"task_{t}_calib.jsonl",
                      aligned=self.model("aligned"), degraded=self.model("degraded"),
                      selected=self.selected_keys(self.tuned()["top_k"]), settings=self.settings())
        on_disk = policy.name in ON_DISK
        if not on_disk:
            ctx.loaded()  # loading the task model is not part of building the defence
        t0 = time.perf_counter()
        c = compute(policy, ctx)
        if c.coeffs:
            c.save(d / "coeffs.json")  # `safegene apply GENE TASK --coeffs coeffs.json` rebuilds the model
        if on_disk:
            ctx.model = ctx.tokenizer = None  # one model in memory at a time
            apply(ctx.gene, task_dir, d / "model", coeffs=c, overwrite=True, progress=False)
            build = time.perf_counter() - t0
            res = self.evaluate_row(d / "model", [t], d)
            shutil.rmtree(d / "model", ignore_errors=True)
        else:
            build = time.perf_counter() - t0
            model, tok = ctx.loaded()
            if c.coeffs:
                apply_to_model(model, ctx.gene, c.coeffs)
            res = self.evaluate_row((model, tok), [t], d)
        lam = policy.lam_text(c)
        self.log(f"      {policy.name}: {lam}")
        return {**res, "build_seconds": round(build, 2), "lam": lam, "coeffs": c.coeffs, "policy": policy.details(c)}


def run(cfg: Config, cache_dir: Path, out: Path | None, *, builder: Callable[[Path, Sequence[str]], dict] | None = None,
        sources: Sources | Callable[[], Sources] | None = None, until: str | None = None, redo: Sequence[str] = (),
        command: str | None = None, log: Callable[[str], None] = print, progress: bool = False,
        threads: int | None = None, only: Sequence[str] = (), report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole experiment. ``builder(out_dir, texts)`` makes the base model instead
    of converting the GGUF; ``sources`` replaces the package data. Returns the results document
    (also written to ``out``/RESULTS.{json,md} when ``out`` is given and the run reaches the report).

    ``report_only``: run nothing and change nothing in the cache (a run of the same part may be going
    on beside it); report the rows whose stages are cached, and list in ``missing_stages`` the
    stages of this part not built yet — an interim report, which the results say it is."""
    import torch

    t_all = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if report_only and (until or redo):
        raise PipelineError("a report-only run runs no stage: --until and --redo do not apply")
    p = Pipeline(cfg, Path(cache_dir).expanduser(), builder=builder, sources=sources, until=until, redo=redo, log=log,
                 progress=progress, only=only, cached_only=report_only)
    try:
        p.run_stages()
    except _Stop:
        log(f"stopped after stage {until!r}")
        return {"stopped_after": until, "ran": p.R.ran, "skipped": p.R.skipped}
    if report_only and not all(x in p.R.records for x in ("data", "base", "judge")):
        raise PipelineError(f"nothing to report in {cache_dir}: its data, judge and base stages are not built")
    doc = build_results(p.R, cfg, command=command, real=p.real, wall=time.perf_counter() - t_all)
    if report_only:
        doc["missing_stages"] = list(p.R.missing)
    if out is not None:
        written = write_results(doc, Path(out))
        log(f"wrote {written[0]} and {written[1]}")
    doc["ran"], doc["skipped"] = list(p.R.ran), list(p.R.skipped)
    return doc
