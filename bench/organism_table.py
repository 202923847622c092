"""Build the model organism and print the README results table.

Rows: aligned, degraded, each task model, and RESTA (θ_T + γ·τ over all tensors, γ grid-searched
on the calibration split only) on each task model. Columns: ASR on the held-out harmful split,
task accuracy on the held-out task split, over-refusal on the held-out benign split, n.

    python bench/organism_table.py [--seed 0] [--cache-dir D] [--judge keyword] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _pct(r) -> str:
    return "–" if r is None else f"{100 * r.rate:.1f} % [{100 * r.low:.0f}, {100 * r.high:.0f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--judge", default="keyword")
    ap.add_argument("--json", default=None, help="also write every number as JSON")
    ap.add_argument("--no-resta", action="store_true", help="skip the RESTA rows")
    args = ap.parse_args(argv)

    from safegene.eval.evaluate import evaluate
    from safegene.organism import build

    t0 = time.perf_counter()
    org = build(cache_dir=args.cache_dir, seed=args.seed, progress=True)
    build_s = time.perf_counter() - t0
    all_tasks = dict(org.task_eval)
    kw = dict(harmful=org.harmful_eval, benign=org.benign_eval, judge=args.judge, progress=False, max_new_tokens=32, batch_size=64)

    rows: list[tuple[str, object, str]] = []  # (name, report, task shown)
    out: dict[str, object] = {"seed": args.seed, "organism": str(org.root), "judge": args.judge}
    for name, path in (("aligned", org.aligned), ("degraded", org.degraded)):
        rep = evaluate(path, tasks=all_tasks, **kw)
        rows.append((name, rep, "all"))
    for t, path in org.tasks.items():
        rows.append((f"task: {t}", evaluate(path, tasks={t: org.task_eval[t]}, **kw), t))

    if not args.no_resta:
        import safegene
        from safegene.baselines import Context, Settings, compute

        work = Path(tempfile.mkdtemp(prefix="safegene-bench-"))
        gene = work / "gene"
        safegene.extract(org.aligned, org.degraded, gene, progress=False)
        resta = {}
        for t, path in org.tasks.items():
            # the RESTA policy of safegene.baselines: the same γ grid and choice as the demo's row
            c = compute("RESTA", Context(gene, path, org.harmful_calib, org.task_calib[t],
                                         settings=Settings(judge=args.judge)))
            res_dir = work / f"resta-{t}"
            safegene.apply(gene, path, res_dir, coeffs=c, progress=False)
            resta[t] = c.meta["resta"]
            rep = evaluate(res_dir, tasks={t: org.task_eval[t]}, **kw)
            rows.append((f"RESTA γ={c.meta['gamma']:g} on {t}", rep, t))
        out["resta"] = resta

    lines = [
        "| model | ASR | task accuracy | over-refusal | n (harmful / task / benign) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rep, shown in rows:
        accs = rep.task_accuracy if shown == "all" else {shown: rep.task_accuracy[shown]}
        acc = "<br>".join(f"{t}: {_pct(r)}" for t, r in accs.items()) if len(accs) > 1 else _pct(next(iter(accs.values())))
        n_task = "+".join(str(r.n) for r in accs.values())
        lines.append(f"| {name} | {_pct(rep.asr)} | {acc} | {_pct(rep.over_refusal)} | {rep.asr.n} / {n_task} / {rep.over_refusal.n} |")
    print()
    print("\n".join(lines))
    print()
    print(f"Percentages with 95 % Wilson intervals; judge: {args.judge}; held-out evaluation split of organism seed {args.seed}.")
    print(f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"organism build/fetch {build_s:.0f} s (recorded build {org.build_seconds:.0f} s); total {time.perf_counter() - t0:.0f} s.")
    if args.json:
        out["rows"] = {name: rep.to_dict(samples=False) for name, rep, _ in rows}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
