#!/usr/bin/env python3
"""Which task fine-tunes erode the aligned SmolLM2's refusals? (issue #15, development split only)

The version-2 protocol's task models are LoRA fine-tunes as users make them. The first probe
(bench/real/README.md) found that one of them, stopped on the validation loss, kept every
refusal. Before any evaluation run this script answers, on the **development split only**
(``harm_dev``, ``task_<t>_dev``, ``benign_dev``), which task recipes erode the refusals at all:

- every task of the configuration (``--tasks``), LoRA r 16 on every linear layer, AdamW;
- stopped on the whole answer's validation loss (``answer``, the protocol's rule), on the
  label tokens' validation loss (``label``), or after all steps (``none``) — ``--stop``;
- learning rates ``--lr`` (the protocol's 2e-4 by default) and at most ``--steps`` steps.

Each variant is trained on the pipeline's cached aligned model (the shared stages run first,
or are reused), measured on the development split (ASR by the run's judge, accuracy, over-
refusal) and appended as one JSON row to ``--jsonl`` (a variant already there is skipped, so the
run resumes). ``--md`` gets the table. The aligned model's own development row is the reference.
No prompt or response leaves the cache.

    python bench/real/erosion.py --cache-dir /tmp/real-cache --tasks sentiment,topic --stop answer,label,none
    python bench/real/erosion.py --tiny --cache-dir /tmp/sg-tiny          # the same on the tiny stand-in
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == HERE:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real.config import STOP_ON, Config  # noqa: E402
from bench.real.data import PipelineError, append_row, read_jsonl, result_rows, synthetic_sources  # noqa: E402
from bench.real.models import lora_fine_tune, tiny_builder  # noqa: E402
from bench.real.stages import Pipeline, _Stop  # noqa: E402


def shared_stages(cfg: Config, cache: Path, *, tiny: bool, log: Any) -> Pipeline:
    """Run (or reuse) the stages up to the aligned model; return the pipeline to read them."""
    p = Pipeline(cfg, cache, builder=tiny_builder if tiny else None, sources=synthetic_sources if tiny else None,
                 until="aligned", redo=(), log=log, progress=False)
    try:
        p.run_stages()
    except _Stop:
        pass
    return p


def variant_id(task: str, stop: str, lr: float, seed: int, steps: int) -> str:
    return f"{task}|{stop}|{lr:g}|s{seed}|{steps}"


def run(cfg: Config, cache: Path, jsonl: Path, *, tasks: Sequence[str], stops: Sequence[str], lrs: Sequence[float],
        seeds: Sequence[int], steps: int, tiny: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Train and measure every variant not yet in ``jsonl``; return all rows of ``jsonl``."""
    for s in stops:
        if s not in STOP_ON:
            raise PipelineError(f"--stop {s!r}: choose from {', '.join(STOP_ON)}")
    p = shared_stages(cfg, cache, tiny=tiny, log=log)
    done = {r["id"] for r in result_rows(jsonl)}
    work = cache / "erosion"
    for t in tasks:  # the reference: the aligned model itself, per task
        if f"aligned|{t}" not in done:
            r = p.dev_eval(p.model("aligned"), t, work, f"aligned ({t})")
            append_row(jsonl, {"id": f"aligned|{t}", "task": t, "model": "aligned", **r})
    for t in tasks:
        for stop in stops:
            for lr in lrs:
                for seed in seeds:
                    vid = variant_id(t, stop, lr, seed, steps)
                    if vid in done:
                        log(f"  {vid}: already measured")
                        continue
                    lora = dataclasses.replace(cfg.task_lora, lr=lr, steps=steps, stop_on=stop)
                    out = work / vid.replace("|", "_")
                    t0 = time.perf_counter()
                    info = lora_fine_tune(p.model("aligned"), out, read_jsonl(p.data / f"task_{t}_train.jsonl"),
                                          read_jsonl(p.data / f"task_{t}_val.jsonl"), lora, cfg,
                                          1000 * (cfg.seed + 1) + seed, log, f"{t} {stop} lr {lr:g} s{seed}")
                    r = p.dev_eval(out, t, work, vid)
                    append_row(jsonl, {"id": vid, "task": t, "model": "lora", "stop_on": stop, "lr": lr, "seed": seed,
                                    "max_steps": steps, **r, "steps_run": info["steps_run"],
                                    "best_step": info["best_step"], "stopped": info["stopped"],
                                    "val_loss_curve": info["val_loss_curve"],
                                    "seconds": round(time.perf_counter() - t0, 1)})
                    shutil.rmtree(out, ignore_errors=True)
    return result_rows(jsonl)



def markdown(rows: list[dict[str, Any]], n_dev: int) -> str:
    """The table: per task, the aligned reference then each variant (ASR / accuracy / over-refusal)."""
    lines = ["| task | model | stop on | lr | steps run (best) | dev ASR | dev accuracy | dev over-refusal | s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["model"] != "aligned", r.get("stop_on", ""), r.get("lr", 0))):
        n = r.get("n") or [n_dev, 0, 0]
        cells = (f"{100 * r['asr']:.1f} % ({round(r['asr'] * n[0])}/{n[0]})", f"{100 * r['accuracy']:.1f} %",
                 f"{100 * r['over_refusal']:.1f} %")
        if r["model"] == "aligned":
            lines.append(f"| {r['task']} | aligned | — | — | — | {' | '.join(cells)} | — |")
        else:
            lines.append(f"| {r['task']} | LoRA s{r['seed']} | {r['stop_on']} | {r['lr']:g} | "
                         f"{r['steps_run']} ({r['best_step']}) | {' | '.join(cells)} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True, help="the pipeline's stage cache (shared with smollm2.py)")
    ap.add_argument("--tiny", action="store_true", help="the tiny stand-in (seconds; for tests)")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the configuration's)")
    ap.add_argument("--stop", default="answer,label,none", help=f"comma-separated, of {', '.join(STOP_ON)}")
    ap.add_argument("--lr", default=None, help="comma-separated learning rates (default: the protocol's)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps (default: the protocol's)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--jsonl", default=None, help="rows (default: <cache>/erosion.jsonl)")
    ap.add_argument("--md", default=None, help="write the table here too")
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config.tiny() if a.tiny else Config()
    cache = Path(a.cache_dir).expanduser()
    jsonl = Path(a.jsonl) if a.jsonl else cache / "erosion.jsonl"
    tasks = [x for x in (a.tasks.split(",") if a.tasks else cfg.tasks) if x]
    lrs = [float(x) for x in a.lr.split(",")] if a.lr else [cfg.task_lora.lr]
    try:
        rows = run(cfg, cache, jsonl, tasks=tasks, stops=[x for x in a.stop.split(",") if x], lrs=lrs,
                   seeds=[int(x) for x in a.seeds.split(",") if x], steps=a.steps or cfg.task_lora.steps,
                   tiny=a.tiny, log=log)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = markdown(rows, cfg.n_harm_dev)
    print(table)
    if a.md:
        Path(a.md).write_text(f"Machine: {machine()}.\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
