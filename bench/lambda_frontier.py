#!/usr/bin/env python3
"""Is a miss the calibration's or the gene's? The development split's ASR / accuracy frontier
along a few lines through λ-space (issue 19's analysis; development builds only).

For one family build and task model: the default selection and calibration (as the demo), then
the calibrated λ scaled by ``--scales``, one uniform γ on the kept keys and one on every key
(``--gammas``), each applied to the pristine task model and measured on the development split
exactly as ``bench/dev_split.py`` does. If no point of these lines reaches the issue's targets
(ASR ≤ 5 % with accuracy within 2 points), the calibration's choice is not what is missing.
One JSON row per point goes to ``--out``.

    PYTHONPATH=python python bench/lambda_frontier.py --org CACHE/organism/stablelm-seed1-KEY \\
        --task season --out frontier.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from dev_split import SELECT_VARIANTS, Family, measure  # noqa: E402

from safegene import lm  # noqa: E402
from safegene.method.calibrate import calibrate  # noqa: E402
from safegene.method.merge import apply_to_model  # noqa: E402
from safegene.method.selection import select_layers  # noqa: E402
from safegene.ops.extract import extract  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--org", required=True, help="an organism cache entry (seed dir)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True, help="append JSON rows here")
    ap.add_argument("--select", default="select:validate-z0", choices=sorted(SELECT_VARIANTS))
    ap.add_argument("--scales", type=float, nargs="*", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--gammas", type=float, nargs="*", default=[1.0, 1.5, 2.0, 3.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    org = Family(args.org)
    split = org.dev_split()
    with tempfile.TemporaryDirectory() as tmp:
        gene = extract(org.aligned, org.degraded, Path(tmp) / "gene", progress=False)
        keys = select_layers(gene, org.aligned, org.degraded, org.harmful_calib, org.benign_calib, write=False,
                             **SELECT_VARIANTS[args.select])["selected"]
        model, tok = lm.load_model(org.tasks[args.task])
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        c = calibrate(gene, model, org.harmful_calib, [org.task_calib[args.task], org.benign_calib], layers=keys,
                      tokenizer=tok, log=None)
        points = [(f"calibrated x{s:g}", {k: s * v for k, v in c.coeffs.items()}) for s in args.scales]
        points += [(f"uniform {g:g} on kept keys", {k: g for k in keys}) for g in args.gammas]
        points += [(f"uniform {g:g} on every key", {k: g for k in gene.layer_keys()}) for g in args.gammas]
        measure_points(model, tok, pristine, gene, split, args.task, org, points, args.out)


def measure_points(model, tok, pristine: dict, gene, split: dict, task: str, org: Family,
                   points: list[tuple[str, dict[str, float]]], out: str) -> None:
    """Each named coefficient map applied to the pristine task model and measured on the
    development split; one JSON row per point appended to ``out`` and a line printed."""
    with open(out, "a") as fh:
        for name, coeffs in points:
            model.load_state_dict(pristine)
            if coeffs:
                apply_to_model(model, gene, coeffs)
            record_point(fh, org, task, name, measure(model, tok, split, task, org),
                         coeffs={k: round(v, 4) for k, v in coeffs.items()})


def record_point(fh, org: Family, task: str, name: str, m: dict, **extra) -> None:
    """One measured point: a JSON row (build, task, point, ``extra``, the rounded measurements)
    written to ``fh`` and a line printed; the row format of these diagnostic scripts."""
    row = {"seed": org.label, "task": task, "point": name, **extra, **{k: round(v, 2) for k, v in m.items()}}
    fh.write(json.dumps(row) + "\n")
    print(f"{org.label} {task} {name:<28} ASR {m['asr']:5.1f} acc {m['acc']:5.1f} "
          f"over {m['over_refusal']:5.1f} whole {m['whole_refusal']:5.1f}", flush=True)

if __name__ == "__main__":
    main()
