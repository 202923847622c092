"""The GPU script's path, on CPU (issue 16 item 6): ``bench/gpu/run.sh`` is valid bash and
``bench/gpu/bench_gpu.py --dry-run`` runs the calibration memory benchmark end to end at a tiny
shape, both calibration modes, with every term the GPU table reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_run_script_is_valid_bash():
    cp = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu" / "run.sh")], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr


def test_gpu_calibration_benchmark_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cp = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "bench_gpu.py"), "--dry-run", "--out", str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert cp.returncode == 0, cp.stdout[-2000:] + cp.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["device"] == "cpu (dry run)"
    (row,) = res["calibrate_memory"].values()
    assert row["params"] > 0 and row["model_bytes"] == 2 * row["params"]  # bf16
    assert row["tau_bytes_bf16"] > 0 and row["selected"] and row["tokens_per_step"] > 0
    for mode in ("exact", "lowmem"):
        m = row[mode]
        assert m["peak_bytes"] >= row["model_bytes"] and m["s_per_step"] > 0
        assert set(m["lambda"]) == set(row["selected"])
    assert row["max_abs_lambda_diff"] <= 1e-5
    table = (tmp_path / "table.md").read_text()
    assert "| tiny Llama (dry run) |" in table and "| exact |" in table and "| lowmem |" in table
