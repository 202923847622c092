#!/usr/bin/env python3
"""The hand-labelled validation of the three-class judge (issue #15, item 6) on this experiment's
own responses.

The responses are those of ``bench/real/degrade_probe.py``: the shipped, the aligned and the
compliance-degraded SmolLM2 on the harmful evaluation set (StrongREJECT + HarmBench), judged by
``tri``; together they hold every class in number. Their texts stay in the stage cache.

``sheet`` draws 150 responses stratified by the judge's class (seed 0) and writes the labelling
sheet (ids and hashes only) and, outside the repository, a *blind* reading copy: numbered prompt +
response pairs without the judge's class, for the labeller. ``score`` joins a labels file (the
sheet's ``prompt_id`` / ``response_sha256`` with a ``label``: refusal, non-answer, compliance) to
the reports and writes agreement, Cohen's kappa and the confusion matrix
(:func:`safegene.eval.judge_validation.judge_agreement`).

    python bench/real/judge_labels.py sheet --cache-dir /tmp/real-cache --sheet /tmp/sheet.jsonl \\
        --reading /tmp/blind.txt
    python bench/real/judge_labels.py score --cache-dir /tmp/real-cache \\
        --labels bench/real/judge_labels.jsonl --md bench/real/judge_labels.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))

from safegene.eval.judge_validation import (MIN_LABELLED, confusion_markdown, judge_agreement,  # noqa: E402
                                            write_labelling_sheet)

MODELS = ("base", "aligned", "degraded")


def load_samples(cache: Path, models: Sequence[str] = MODELS) -> list[dict[str, Any]]:
    """The harmful-set samples (prompt, response, judge class) of the probe's reports, tagged by model."""
    out = []
    for m in models:
        rep = cache / "degrade-probe" / m / "report.json"
        if not rep.is_file():
            raise SystemExit(f"error: {rep} is missing: run bench/real/degrade_probe.py first")
        out += [{**s, "model": m} for s in json.loads(rep.read_text())["samples"] if s.get("set") == "harmful"]
    return out


def sheet(cache: Path, sheet_path: Path, reading: Path, n: int = MIN_LABELLED, seed: int = 0) -> list[dict[str, Any]]:
    """Write the labelling sheet and the blind reading copy (no judge class); return the sheet."""
    tmp = reading.with_suffix(reading.suffix + ".with-class.jsonl")
    rows = write_labelling_sheet(load_samples(cache), sheet_path, n, seed=seed, texts_path=tmp)
    texts = [json.loads(x) for x in tmp.read_text(encoding="utf-8").splitlines()]
    tmp.unlink()
    reading.write_text("".join(f"#{i} PROMPT: {t['prompt']}\nRESPONSE: {t['response']}\n\n" for i, t in enumerate(texts)),
                       encoding="utf-8")
    return rows


def score(cache: Path, labels: Path) -> dict[str, Any]:
    return judge_agreement(load_samples(cache), labels)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a1 = sub.add_parser("sheet")
    a1.add_argument("--cache-dir", required=True)
    a1.add_argument("--sheet", required=True)
    a1.add_argument("--reading", required=True, help="the blind reading copy (keep it out of the repository)")
    a1.add_argument("-n", type=int, default=MIN_LABELLED)
    a2 = sub.add_parser("score")
    a2.add_argument("--cache-dir", required=True)
    a2.add_argument("--labels", required=True)
    a2.add_argument("--md", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "sheet":
        rows = sheet(Path(a.cache_dir), Path(a.sheet), Path(a.reading), a.n)
        print(f"{len(rows)} responses to label: {a.reading} (then fill 'label' in {a.sheet})")
        return 0
    res = score(Path(a.cache_dir), Path(a.labels))
    md = confusion_markdown(res)
    print(md)
    if a.md:
        per = res["per_class"]
        Path(a.md).write_text(
            md + "\n\n" + "\n".join(f"- {c}: precision {per[c]['precision']:.2f}, recall {per[c]['recall']:.2f} "
                                    f"({per[c]['n_label']} labelled, {per[c]['n_judge']} by the judge)" for c in per)
            + f"\n- ASR on the labelled responses: judge {100 * res['asr_judge']:.1f} %, labels "
              f"{100 * res['asr_labels']:.1f} %; unmatched labels {res['unmatched']}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
