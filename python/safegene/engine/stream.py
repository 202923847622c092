"""Running streaming plans in the core, and writing output directories atomically."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import SafeGeneError
from ..io.checkpoint import SafetensorsFile, TensorInfo
from .native import core, dtype_of

if TYPE_CHECKING:  # pragma: no cover
    from .._core import Job


@dataclass
class Plan:
    """A streaming plan in the shape ``safegene._core.run_stream`` takes."""

    in_paths: list[str] = field(default_factory=list)
    in_sizes: list[int] = field(default_factory=list)
    in_mtimes: list[int] = field(default_factory=list)
    out_paths: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    #: ``(job, A, B, scale)``: a low-rank update merged into that job's input 0 (float32 numpy
    #: factors): a LoRA target's own update, a low-rank gene's λ·τ, or both stacked (one per job)
    lowrank: list[tuple[int, Any, Any, float]] = field(default_factory=list)
    _in_index: dict[str, int] = field(default_factory=dict)
    _out_index: dict[str, int] = field(default_factory=dict)
    _expected: dict[str, tuple[int, int]] = field(default_factory=dict)

    def expect(self, files: Iterable[SafetensorsFile]) -> "Plan":
        """Pin each file to the size and mtime seen when its header was parsed: the core
        refuses to run (or to finish) if a file changed since, so a header and the data read
        under it always belong together."""
        for f in files:
            self._expected[str(f.path)] = (f.size, f.mtime_ns)
        return self

    def _in(self, t: TensorInfo) -> int:
        key = str(t.file)
        if key not in self._in_index:
            if key in self._expected:
                size, mtime = self._expected[key]
            else:
                st = os.stat(t.file)
                size, mtime = st.st_size, st.st_mtime_ns
            self._in_index[key] = len(self.in_paths)
            self.in_paths.append(key)
            self.in_sizes.append(size)
            self.in_mtimes.append(mtime)
        return self._in_index[key]

    def add(
        self,
        out_path: Path,
        out_offset: int,
        out_dtype: str,
        numel: int,
        inputs: Sequence[tuple[TensorInfo, float]],
        lowrank: "tuple[Any, Any, float] | None" = None,
    ) -> int:
        """Add a job ``out = sum(c * t for t, c in inputs)``; returns its index.

        ``lowrank = (A, B, scale)`` first merges the LoRA update ``scale · B @ A`` into the
        first input, rounded to that input's dtype (A is (r, cols), B is (rows, r))."""
        key = str(out_path)
        if key not in self._out_index:
            self._out_index[key] = len(self.out_paths)
            self.out_paths.append(key)
        c = core()
        terms = [c.Term(self._in(t), t.offset, dtype_of(t.dtype), float(k)) for t, k in inputs]
        out_code = dtype_of(out_dtype)
        if out_code == c.DType.RAW:
            numel = inputs[0][0].nbytes  # opaque bytes: copied, never computed
        self.jobs.append(c.Job(self._out_index[key], out_offset, out_code, numel, terms))
        if lowrank is not None:
            import numpy as np

            a, b, scale = lowrank
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            self.lowrank.append((len(self.jobs) - 1, a, b, float(scale)))
        return len(self.jobs) - 1

    @property
    def out_bytes(self) -> int:
        return sum(j.numel * j.out_dtype.itemsize for j in self.jobs)


def run_plan(plan: Plan, budget_bytes: int, desc: str, progress: bool = True, stats: str = "full") -> dict[str, Any]:
    """Run a plan in the core with a byte progress bar; core errors become SafeGeneError.

    ``stats`` is ``"full"`` (norms, dot, rounding, non-finite counts: extract) or ``"guard"``
    (non-finite count of the result only: apply).
    """
    c = core()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.out_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr, leave=False)

    def cb(done: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        level = c.StatsLevel.__members__[stats.upper()]
        return c.run_stream(plan.in_paths, plan.in_sizes, plan.in_mtimes, plan.out_paths, plan.jobs, int(budget_bytes), 4, cb, level, plan.lowrank)
    except c.CoreError as exc:
        raise SafeGeneError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()


