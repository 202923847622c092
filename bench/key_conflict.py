#!/usr/bin/env python3
"""Does any single key of the gene restore refusal without costing the task? (issue 19's
analysis of the selection-sensitive task; development builds only.)

For one family build and task model, τ is applied to the pristine task model in three ways and
each point is measured on the development split exactly as ``bench/dev_split.py`` does:

* ``only K @ γ``: one key's τ alone, at each ``--gammas`` value;
* ``all but K``: the whole gene at γ = 1 without key K (leave-one-out);
* ``all``: the whole gene at γ = 1.

If some key (or key set) restores the refusal at the undefended model's accuracy, a selection
made *at the target* could find it; if every key that restores refusal also costs accuracy, no
block-level selection can meet issue 19's selection target on this build. One JSON row per
point goes to ``--out``.

    PYTHONPATH=python python bench/key_conflict.py --org CACHE/organism/stablelm-seed1-KEY \\
        --task season --out key_conflict.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from dev_split import Family  # noqa: E402
from lambda_frontier import measure_points  # noqa: E402

from safegene import lm  # noqa: E402
from safegene.ops.extract import extract  # noqa: E402


def points(keys: list[str], gammas: list[float]) -> list[tuple[str, dict[str, float]]]:
    """The coefficient maps measured: none, every key, leave-one-out, single keys at each γ."""
    out: list[tuple[str, dict[str, float]]] = [("none", {}), ("all", {k: 1.0 for k in keys})]
    out += [(f"all but {k}", {j: 1.0 for j in keys if j != k}) for k in keys]
    out += [(f"only {k} @ {g:g}", {k: g}) for k in keys for g in gammas]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--org", required=True, help="an organism cache entry (seed dir)")
    ap.add_argument("--task", action="append", required=True)
    ap.add_argument("--out", required=True, help="append JSON rows here")
    ap.add_argument("--gammas", type=float, nargs="*", default=[1.0, 2.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    org = Family(args.org)
    split = org.dev_split()
    with tempfile.TemporaryDirectory() as tmp:
        gene = extract(org.aligned, org.degraded, Path(tmp) / "gene", progress=False)
        keys = list(gene.layer_keys())
        for task in args.task:
            model, tok = lm.load_model(org.tasks[task])
            pristine = {k: v.clone() for k, v in model.state_dict().items()}
            measure_points(model, tok, pristine, gene, split, task, org, points(keys, args.gammas), args.out)


if __name__ == "__main__":
    main()
