"""``safegene organism build``: train or fetch the built-in organism."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..organism import DEFAULT_FAMILY, FAMILIES, build
from .options import Command, CommonOptions, option


@dataclass(kw_only=True)
class OrganismBuildOptions(CommonOptions):
    seed: int = option(0, help="organism seed (default 0)")
    cache_dir: str | None = option(None, help="cache root (default: $SAFEGENE_CACHE or ~/.cache/safegene)")
    force: bool = option(False, help="rebuild even when the cache holds this recipe")
    family: str = option(DEFAULT_FAMILY, choices=tuple(FAMILIES),
                         help=f"organism family (default {DEFAULT_FAMILY}; choices: {', '.join(FAMILIES)})")
    threads: int | None = option(None, help="compute threads of the build (part of the recipe; default 1)")


def handle_organism_build(opts: OrganismBuildOptions) -> int:
    org = build(cache_dir=opts.cache_dir, seed=opts.seed, progress=not opts.quiet, force=opts.force,
                family=opts.family, threads=opts.threads)
    if opts.json:
        print(json.dumps({"seed": org.seed, "key": org.key, "root": str(org.root), "family": org.family,
                          "threads": org.manifest.get("threads"),
                          **{n: str(getattr(org, n)) for n in ("base", "aligned", "degraded")},
                          "tasks": {t: str(p) for t, p in org.tasks.items()}, "data": str(org.harmful_eval.parent)}))
        return 0
    print(f"organism {org.family} seed {org.seed} ({org.key}, {org.manifest.get('threads')} thread(s)) at {org.root}")
    for name in ("base", "aligned", "degraded"):
        print(f"  {name:<10} {getattr(org, name)}")
    for t, p in org.tasks.items():
        print(f"  task {t:<5} {p}")
    print(f"  data       {org.harmful_eval.parent}")
    return 0


COMMAND = Command(
    "organism build", OrganismBuildOptions, handle_organism_build,
    help="train (or fetch from the cache) the organism family",
    description="Train base/aligned/degraded/task models from scratch (about 3 minutes on two CPU cores) into the "
    "cache ($SAFEGENE_CACHE or ~/.cache/safegene); reused when the recipe is unchanged.",
)
register_cli = COMMAND.register
