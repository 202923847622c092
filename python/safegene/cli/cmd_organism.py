"""``safegene organism build``: train or fetch the built-in organism."""

from __future__ import annotations

import argparse
from typing import Any

from ..organism import build


def _build_handler(args: argparse.Namespace) -> int:
    org = build(cache_dir=args.cache_dir, seed=args.seed, progress=not args.no_progress, force=args.force)
    print(f"organism seed {org.seed} ({org.key}) at {org.root}")
    for name in ("base", "aligned", "degraded"):
        print(f"  {name:<10} {getattr(org, name)}")
    for t, p in org.tasks.items():
        print(f"  task {t:<5} {p}")
    print(f"  data       {org.harmful_eval.parent}")
    return 0



def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``safegene organism build [--seed N] [--cache-dir D] [--force]``."""
    p = subparsers.add_parser("organism", help="the built-in model organism (tiny LM family)")
    sub = p.add_subparsers(dest="organism_command", metavar="COMMAND", required=True)
    b = sub.add_parser("build", help="train (or fetch from the cache) the organism family",
                       description="Train base/aligned/degraded/task models from scratch (about 3 minutes on two "
                       "CPU cores) into the cache ($SAFEGENE_CACHE or ~/.cache/safegene); reused when the recipe is unchanged.")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cache-dir", default=None, help="cache root (default: $SAFEGENE_CACHE or ~/.cache/safegene)")
    b.add_argument("--force", action="store_true", help="rebuild even when the cache holds this recipe")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_build_handler)
    return p
