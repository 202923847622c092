"""The architecture contract: folders are layers, imports point only downward, no cycles.

The contract lives in pyproject.toml ([tool.importlinter]); ``lint-imports`` checks it. These
tests run it on the package as installed, and on a copy with one upward import put back in,
to show that the contract would catch it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import safegene

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

pytestmark = pytest.mark.skipif(not Path(LINT).exists(), reason="import-linter is not installed (pip install '.[test]')")


def _lint(pkg_parent: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pkg_parent))
    return subprocess.run([LINT, "--config", str(PYPROJECT), "--no-cache"], cwd=pkg_parent, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_package(tmp_path: Path) -> Path:
    src = Path(safegene.__file__).parent
    dst = tmp_path / "pkg" / "safegene"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    return dst


def test_the_package_keeps_its_import_contract(tmp_path):
    res = _lint(_copy_package(tmp_path).parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0 broken" in res.stdout, res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    pkg = _copy_package(tmp_path)
    low = pkg / "io" / "atomic.py"
    low.write_text(low.read_text() + "\nfrom ..cli import main as _upward  # noqa: E402,F401\n")
    res = _lint(pkg.parent)
    assert res.returncode != 0
    assert "safegene.io is not allowed to import safegene.cli" in res.stdout, res.stdout


def test_a_cycle_inside_a_layer_breaks_the_contract(tmp_path):
    if "acyclic_siblings" not in PYPROJECT.read_text():
        pytest.skip("no acyclic-siblings contract configured")
    pkg = _copy_package(tmp_path)
    ckpt = pkg / "io" / "checkpoint.py"  # io.hub imports io.checkpoint; make it import back
    ckpt.write_text(ckpt.read_text() + "\nfrom . import hub as _cycle  # noqa: E402,F401\n")
    res = _lint(pkg.parent)
    assert res.returncode != 0, res.stdout
