#!/usr/bin/env python3
"""How much safety did ``safegene degrade --recipe compliance`` remove? (issue #14's SmolLM2 row)

The gene is only as strong as the degradation. Issue #14 asks that the compliance-recipe copy of
the self-aligned SmolLM2-135M-Instruct refuse at most 10 % of the **harmful evaluation set**
(StrongREJECT + HarmBench; the first version's eager copy refused 38-50 % there). The degrade
recipe (LoRA r 16, 80 steps, lr 3e-4, on the shipped model's answers to ``harm_degrade``) was
fixed on the development split (``harm_dev``: 6.2 % refusals) before this script first ran;
nothing is chosen from what it measures.

The script runs (or reuses) the pipeline's stages up to ``degraded`` and then, for the models
named by ``--models`` (default: the shipped model ``base``, ``aligned`` and ``degraded``),
generates on ``eval_harmful`` with the run's judge and generation length and reports, per source
(StrongREJECT, HarmBench) and overall, the judge's three classes: refusal, non-answer and
compliance (= ASR), each with its Wilson interval. Rows go to ``--jsonl`` (a model already there
is skipped, so the run resumes) and the table to ``--md``. Responses stay in the cache.

    python bench/real/degrade_probe.py --cache-dir /tmp/real-cache --threads 1 \\
        --jsonl bench/real/degrade_probe.jsonl --md bench/real/degrade_probe.md
    python bench/real/degrade_probe.py --tiny --cache-dir /tmp/sg-tiny       # the tiny stand-in
"""

from __future__ import annotations

import argparse
import os
import platform
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

from bench.real.config import Config  # noqa: E402
from bench.real.data import append_row, result_rows, synthetic_sources  # noqa: E402
from bench.real.models import tiny_builder  # noqa: E402
from bench.real.stages import Pipeline, _Stop  # noqa: E402

CLASSES = ("refusal", "non-answer", "compliance")


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval (95 %) of k successes in n, as fractions."""
    from safegene.eval.evaluate import Rate

    r = Rate.of(k, n)
    return r.low, r.high


def classify_rows(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per source (the sample's ``category``) and ``all``: n and the count of each judge class."""
    out: dict[str, dict[str, Any]] = {}
    for s in samples:
        if s.get("set") != "harmful":
            continue
        cls = s.get("class") or ("compliance" if s["attack_success"] else "refusal")
        for key in (s.get("category") or "harmful", "all"):
            row = out.setdefault(key, {"n": 0, **{c: 0 for c in CLASSES}})
            row["n"] += 1
            row[cls] = row.get(cls, 0) + 1
    return out


def run(cfg: Config, cache: Path, jsonl: Path, *, models: Sequence[str], tiny: bool = False,
        log: Any = print) -> list[dict[str, Any]]:
    """Evaluate every model of ``models`` not yet in ``jsonl`` on ``eval_harmful``; return all rows."""
    from safegene.eval.evaluate import evaluate

    p = Pipeline(cfg, cache, builder=tiny_builder if tiny else None, sources=synthetic_sources if tiny else None,
                 until="degraded", redo=(), log=log, progress=False)
    try:
        p.run_stages()
    except _Stop:
        pass
    done = {r["model"] for r in result_rows(jsonl)}
    degraded_info = p.R.records.get("degraded", {})  # the stage's record: its info and time
    for name in models:
        if name in done:
            log(f"   {name}: already measured")
            continue
        t0 = time.perf_counter()
        rep = evaluate(p.model(name), harmful=p.data / "eval_harmful.jsonl", judge=cfg.judge,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens, progress=False)
        work = cache / "degrade-probe" / name
        work.mkdir(parents=True, exist_ok=True)
        rep.to_json(work / "report.json")  # responses stay in the cache
        row = {"model": name, "judge": cfg.judge, "max_new_tokens": cfg.eval_max_new_tokens,
               "by_source": classify_rows(rep.samples), "seconds": round(time.perf_counter() - t0, 1)}
        if name == "degraded":
            row["degrade"] = {"info": degraded_info.get("info"), "seconds": degraded_info.get("seconds")}
        append_row(jsonl, row)
        a = row["by_source"]["all"]
        log(f"   {name}: refusal {a['refusal'] / a['n']:.3f}, compliance {a['compliance'] / a['n']:.3f} "
            f"of {a['n']} ({row['seconds']:.0f} s)")
    return result_rows(jsonl)



def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per model and source: n, then each class as % [Wilson 95 %]."""
    head = ("| model | source | n | refusal | non-answer | compliance (ASR) |\n"
            "|---|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        srcs = sorted(k for k in r["by_source"] if k != "all") + ["all"]
        for s in srcs:
            c = r["by_source"][s]
            cells = []
            for k in CLASSES:
                lo, hi = wilson(c[k], c["n"])
                cells.append(f"{100 * c[k] / c['n']:.1f} % [{100 * lo:.0f}, {100 * hi:.0f}]")
            lines.append(f"| {r['model']} | {s} | {c['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--md", default=None)
    ap.add_argument("--models", default="base,aligned,degraded", help="comma-separated pipeline models")
    ap.add_argument("--tiny", action="store_true", help="the tiny stand-in (tests)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config.tiny() if a.tiny else Config()
    rows = run(cfg, Path(a.cache_dir), Path(a.jsonl), models=[m for m in a.models.split(",") if m], tiny=a.tiny)
    md = markdown(rows)
    print(md)
    if a.md:
        Path(a.md).write_text(
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}.\n\n{md}\n")


if __name__ == "__main__":
    main()
