#!/usr/bin/env python3
"""Can any block-level change restore a task model at all? Revert the task update itself.

τ can only move a task model along aligned − degraded. Where no λ on τ restores refusal
(``bench/lambda_frontier.py``), this asks whether the *task update* δ = θ_T − θ_A has a part that
carries the erosion without the skill, at the granularity the method works on (gene keys): each
key's update reverted alone (that key set back to the aligned model's weights), every key but
one reverted, and all reverted (the aligned model). Measured on the build's development split
exactly as ``bench/dev_split.py`` does; one JSON row per point goes to ``--out``. Finer units:
``--unit tensor`` (one tensor) or ``--unit kind`` (one kind of tensor in every block, e.g. every
``mlp.up_proj``); ``--alphas`` the task update shrunk everywhere, θ_T − α·δ (interpolation between
the task model and the aligned one); ``--svd-ranks`` the top-r singular directions of every
matrix's update reverted, or only those kept (directions inside a tensor). Diagnostic only: spent
or development builds.

    PYTHONPATH=python python bench/task_revert.py --org CACHE/organism/stablelm-seed11-KEY \\
        --task season --out task_revert.jsonl
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from dev_split import Family, measure  # noqa: E402
from lambda_frontier import record_point  # noqa: E402

from safegene import lm  # noqa: E402
from safegene.ops.extract import extract  # noqa: E402


def _svd_parts(task_w: dict, aligned_w: dict) -> dict:
    """The SVD of every matrix's task update (token embeddings left out: their update is a few
    rows, round 14), in float64."""
    return {n: torch.linalg.svd(w.double() - aligned_w[n].double(), full_matrices=False)
            for n, w in task_w.items() if w.dim() == 2 and "embed" not in n}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--org", required=True, help="an organism cache entry (seed dir)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True, help="append JSON rows here")
    ap.add_argument("--unit", choices=("key", "tensor", "kind"), default="key",
                    help="what one revert point sets back: a gene key (block), one tensor, or one kind "
                         "of tensor in every block (its name with the block index removed)")
    ap.add_argument("--alphas", default="",
                    help="instead of the revert points: the task update shrunk everywhere, "
                         "theta_T - alpha * delta, at these comma-separated alphas (0 = the task model, "
                         "1 = the aligned model)")
    ap.add_argument("--svd-ranks", default="",
                    help="instead of the revert points: in every matrix but the embedding, the top-r "
                         "singular directions of the task update reverted (and, as separate points, "
                         "only those kept), at these comma-separated ranks r")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    org = Family(args.org)
    split = org.dev_split()
    with tempfile.TemporaryDirectory() as tmp:  # the gene only names the keys (tensor -> key)
        gene = extract(org.aligned, org.degraded, Path(tmp) / "gene", progress=False)
        key_of = {n: gene.layer_key(n) for n in gene.tensor_names}
    if args.unit == "tensor":
        key_of = {n: n for n in key_of}
    elif args.unit == "kind":
        key_of = {n: re.sub(r"\.\d+\.", ".N.", n) for n in key_of}
    keys = list(dict.fromkeys(key_of.values()))  # in tensor order, as the committed rows are
    model, tok = lm.load_model(org.tasks[args.task])
    task_w = {k: v.clone() for k, v in model.state_dict().items()}
    aligned_w = lm.load_model(org.aligned)[0].state_dict()

    def shrink(alpha: dict):  # the task update times 1 - alpha[key] (0: task weights, 1: aligned)
        def weight(n):
            a = alpha.get(key_of.get(n), 0.0)
            return task_w[n] if a == 0.0 else aligned_w[n] if a == 1.0 else task_w[n] - a * (task_w[n] - aligned_w[n])
        return weight

    def low_rank(r: int, keep: bool):  # aligned + (top-r part) or task - (top-r part)
        def weight(n):
            if n not in svd:
                return task_w[n]
            u, sv, vh = svd[n]
            top = (u[:, :r] * sv[:r]) @ vh[:r]
            base = aligned_w[n].double() if keep else task_w[n].double()
            return (base + top if keep else base - top).to(task_w[n].dtype)
        return weight

    if args.svd_ranks:
        svd = _svd_parts(task_w, aligned_w)
        ranks = [int(r) for r in args.svd_ranks.split(",")]
        points = [(f"revert top-{r} directions", low_rank(r, False)) for r in ranks]
        points += [(f"keep only top-{r} directions", low_rank(r, True)) for r in ranks]
    elif args.alphas:
        points = [(f"shrink all alpha={a:g}", shrink({k: float(a) for k in keys})) for a in map(float, args.alphas.split(","))]
    else:
        sets = [("none", set()), ("revert all", set(keys))]
        sets += [(f"revert only {k}", {k}) for k in keys] + [(f"revert all but {k}", set(keys) - {k}) for k in keys]
        points = [(name, shrink({k: 1.0 for k in revert})) for name, revert in sets]
    with open(args.out, "a") as fh, torch.no_grad():
        for name, weight in points:
            for n, w in model.state_dict().items():
                w.copy_(weight(n))
            record_point(fh, org, args.task, name, measure(model, tok, split, args.task, org))


if __name__ == "__main__":
    main()
