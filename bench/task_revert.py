#!/usr/bin/env python3
"""Can any block-level change restore a task model at all? Revert the task update itself.

τ can only move a task model along aligned − degraded. Where no λ on τ restores refusal
(``bench/lambda_frontier.py``), this asks whether the *task update* δ = θ_T − θ_A has a part that
carries the erosion without the skill, at the granularity the method works on (gene keys): each
key's update reverted alone (that key set back to the aligned model's weights), every key but
one reverted, and all reverted (the aligned model). Measured on the build's development split
exactly as ``bench/dev_split.py`` does; one JSON row per point goes to ``--out``. Diagnostic
only: spent or development builds.

    PYTHONPATH=python python bench/task_revert.py --org CACHE/organism/stablelm-seed11-KEY \\
        --task season --out task_revert.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from dev_split import Family, measure  # noqa: E402
from lambda_frontier import record_point  # noqa: E402

from safegene import lm  # noqa: E402
from safegene.ops.extract import extract  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--org", required=True, help="an organism cache entry (seed dir)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True, help="append JSON rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    org = Family(args.org)
    split = org.dev_split()
    with tempfile.TemporaryDirectory() as tmp:  # the gene only names the keys (tensor -> key)
        gene = extract(org.aligned, org.degraded, Path(tmp) / "gene", progress=False)
        key_of = {n: gene.layer_key(n) for n in gene.tensor_names}
    keys = list(dict.fromkeys(key_of.values()))  # in tensor order, as the committed rows are
    model, tok = lm.load_model(org.tasks[args.task])
    task_w = {k: v.clone() for k, v in model.state_dict().items()}
    aligned_w = lm.load_model(org.aligned)[0].state_dict()
    points = [("none", set()), ("revert all", set(keys))]
    points += [(f"revert only {k}", {k}) for k in keys] + [(f"revert all but {k}", set(keys) - {k}) for k in keys]
    with open(args.out, "a") as fh, torch.no_grad():
        for name, revert in points:
            for n, w in model.state_dict().items():
                w.copy_(aligned_w[n] if key_of.get(n) in revert else task_w[n])
            record_point(fh, org, args.task, name, measure(model, tok, split, args.task, org))


if __name__ == "__main__":
    main()
