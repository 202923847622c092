"""``safegene demo``: the whole pipeline on the built-in organism."""

from __future__ import annotations

from ..demo import ALT_SCORE, METHODS, run_demo


def _cli(args) -> int:
    res = run_demo(out=args.out, cache_dir=args.cache_dir, seed=args.seed, tasks=args.tasks, score=args.score,
                   top_k=args.top_k, judge=args.judge, max_new_tokens=args.max_new_tokens,
                   calib_steps=args.steps, progress=not args.quiet,
                   methods=METHODS + ((ALT_SCORE,) if args.compare_scores else ()))
    print(res.table)
    print()
    print(f"selected layers ({res.selection['method']}): {', '.join(res.selection['selected'])}; "
          f"targets met: {res.targets_met}")
    print(f"wrote {res.json_path}, {res.png}; {res.seconds:.0f} s in all "
          f"(organism {res.organism_seconds:.0f} s)")
    return 0



def register_cli(subparsers) -> None:
    """Add ``safegene demo``."""
    p = subparsers.add_parser("demo", help="run the whole method on the built-in model organism with baselines",
                              description="Build/load the organism, extract, select, calibrate, apply and evaluate "
                                          "every task model against none / RESTA / SafeMERGE / ablations.")
    p.add_argument("--out", default="safegene-demo", help="output directory (default ./safegene-demo)")
    p.add_argument("--cache-dir", default=None, help="organism cache (default $SAFEGENE_CACHE or ~/.cache/safegene)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=None, help="task models to run (default: all)")
    p.add_argument("--score", default=None, choices=["restore", "refusal", "contrast"],
                   help="selection score (default: restore)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--judge", default="organism")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=40, help="calibration steps")
    p.add_argument("--compare-scores", action="store_true",
                   help="add a SafeGene row calibrated on the layers the other selection score picks")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cli)
