"""``safegene demo``: the whole pipeline on the built-in organism."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..demo import (ALT_SCORE, CHECKED, EMBED_MASKED, GENE_RECIPES, METHODS, NOSEL_CHECKED, NOSEL_PRUNED, NOSEL_TRIMMED,
                    PRUNED, PRUNED_CHECKED, TASK_AWARE, TRIMMED, run_demo)
from ..organism import DEFAULT_FAMILY, FAMILIES
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class DemoOptions(CommonOptions):
    output: str = option("safegene-demo", short="-o", aliases=("--out",),
                         help="output directory (default ./safegene-demo)")
    cache_dir: str | None = option(None, help="organism cache (default $SAFEGENE_CACHE or ~/.cache/safegene)")
    family: str = option(DEFAULT_FAMILY, choices=tuple(FAMILIES),
                         help=f"organism family (default {DEFAULT_FAMILY}; choices: {', '.join(FAMILIES)})")
    seed: int = option(0, help="organism seed (default 0)")
    tasks: list[str] | None = option(None, help="task models to run (default: all)")
    score: str | None = option(None, choices=("restore", "refusal", "contrast"), help="selection score (default: restore)")
    top_k: int | None = option(None, help="keep the K best-scoring keys (default: the score's threshold rule)")
    judge: str | None = option(None, help="judge of the evaluations (default: the family's own, organism or "
                                          "organism:<family>)")
    max_new_tokens: int = option(24, help="greedy tokens per response (default 24)")
    steps: int = option(40, help="calibration steps (default 40)")
    threads: int | None = option(None, help="compute threads of the whole run: the organism build (part of its "
                                           "recipe, so its own cache entry; default 1) and every later stage "
                                           "(default: torch's count)")
    gene_recipe: str = option("organism", choices=GENE_RECIPES,
                              help="where τ comes from: organism (aligned − the organism's degraded copy, default), "
                                   "lora-compliance or lora-eager (a LoRA degrade made in the run, low-rank gene)")
    compare_scores: bool = option(False, help="add a SafeGene row calibrated on the layers the other selection "
                                              "score picks")
    task_aware: bool = option(False, help="add a SafeGene-task-aware row: τ or τ projected off the task update, "
                                          "chosen per task model on the calibration prompts (development round 8)")
    check_lambda: bool = option(False, help="add a SafeGene-checked row: the calibrated λ, λ = 1 or the grid's "
                                            "uniform γ on the selected keys, chosen on the calibration prompts "
                                            "(development round 9), and a no-selection-checked row: the same "
                                            "check on every gene key (round 12)")
    prune: bool = option(False, help="add a SafeGene-pruned row: the selected keys less those whose τ at λ = 1 "
                                     "costs the task model on the calibration prompts (backward elimination), then "
                                     "calibrated, and a no-selection-pruned row: the same from every gene key "
                                     "(development round 13); and SafeGene-trimmed / no-selection-trimmed rows: "
                                     "the calibrated λ with keys set to 0 the same way; and a SafeGene-pruned-checked "
                                     "row: the selected keys pruned, then the λ check (the default SafeGene row does "
                                     "this from every key)")
    embed_mask: bool = option(False, help="add a no-selection-pruned-checked-embed-masked row: the default SafeGene "
                                          "procedure on τ whose token-embedding rows the task fine-tune moved are "
                                          "zero (development round 14)")


def handle_demo(opts: DemoOptions) -> int:
    res = run_demo(out=opts.output, cache_dir=opts.cache_dir, seed=opts.seed, tasks=opts.tasks, score=opts.score,
                   top_k=opts.top_k, judge=opts.judge, max_new_tokens=opts.max_new_tokens,
                   calib_steps=opts.steps, progress=not opts.quiet, family=opts.family, threads=opts.threads,
                   gene_recipe=opts.gene_recipe, methods=METHODS + ((ALT_SCORE,) if opts.compare_scores else ())
                   + ((TASK_AWARE,) if opts.task_aware else ()) + ((CHECKED, NOSEL_CHECKED) if opts.check_lambda else ())
                   + ((PRUNED, NOSEL_PRUNED, TRIMMED, NOSEL_TRIMMED, PRUNED_CHECKED) if opts.prune else ())
                   + ((EMBED_MASKED,) if opts.embed_mask else ()))
    if opts.json:
        print(json.dumps({
            "out": str(res.out), "json": str(res.json_path), "png": str(res.png) if res.png else None,
            "selection": {"method": res.selection["method"], "selected": res.selection["selected"]},
            "targets_met": res.targets_met, "seconds": round(res.seconds, 3),
            "organism_seconds": round(res.organism_seconds, 3),
            "family": opts.family, "gates": res.gates,
            "threads": json.loads(res.json_path.read_text())["settings"]["threads"],
            "rows": [{"method": r.method, "task": r.task, "asr": r.asr, "whole_refusal": r.whole, "accuracy": r.accuracy,
                      "over_refusal": r.over_refusal, "coeffs": r.coeffs, "seconds": r.seconds} for r in res.rows],
        }))
        return 0
    print(res.table)
    print()
    if res.gates:
        print(res.gates)
        print()
    print(f"selected layers ({res.selection['method']}): {', '.join(res.selection['selected'])}; "
          f"targets met: {res.targets_met}")
    print(f"wrote {res.json_path}, {res.png}; {res.seconds:.0f} s in all "
          f"(organism {res.organism_seconds:.0f} s)")
    return 0


COMMAND = Command(
    "demo", DemoOptions, handle_demo,
    help="run the whole method on the built-in model organism with baselines",
    description="Build/load the organism, extract, select, calibrate, apply and evaluate every task model against "
    "none / RESTA / SafeMERGE / ablations.",
)
register_cli = COMMAND.register
