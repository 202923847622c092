#!/usr/bin/env python3
"""CPU cost of the core's streaming low-rank term (``add_lowrank_range``): the extra process CPU
seconds an apply-shaped plan spends when a rank-R update is merged into one BF16 tensor, per
element; min over ``--repeats`` runs of each (one kernel thread, file in the page cache).

    PYTHONPATH=python python bench/bench_lowrank_kernel.py --ranks 4 16 64

Prints the output's sha256 too: two builds of the core must give the same bits.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from safegene.engine.native import core
from safegene.engine.stream import Plan, run_plan
from safegene.io.checkpoint import read_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    core().set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        f = d / "w.safetensors"
        save_file({"w": (torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0)) * 0.02)
                   .to(torch.bfloat16)}, str(f))
        h = read_header(f)
        t = h.tensors["w"]
        out = d / "out.bin"

        def once(lowrank) -> float:
            out.write_bytes(b"")
            os.truncate(out, t.nbytes)
            p = Plan().expect([h])
            p.add(out, 0, "BF16", t.numel, [(t, 1.0)], lowrank=lowrank)
            c0 = time.process_time()
            run_plan(p, 32 << 20, "bench", progress=False, stats="guard")
            return time.process_time() - c0

        base = min(once(None) for _ in range(a.repeats))
        for r in a.ranks:
            rng = np.random.default_rng(r)
            A = rng.standard_normal((r, a.cols), dtype=np.float32) * 0.01
            B = rng.standard_normal((a.rows, r), dtype=np.float32) * 0.01
            sec = min(once((A, B, 0.5)) for _ in range(a.repeats))
            sha = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
            print(f"rank {r:>3}: {1e9 * (sec - base) / t.numel:.2f} ns/element above the copy "
                  f"({sec:.3f} s vs {base:.3f} s CPU for {t.numel / 1e6:.0f} M elements), output sha {sha}", flush=True)


if __name__ == "__main__":
    main()
