"""Streaming extract/apply against the I/O roofline, a naive torch merge, and mergekit.

One command, one run, the same synthetic bf16 Llama-shaped checkpoints for every method:

    python bench/bench_stream.py --size-gb 1.2 --size-gb 4 --out bench/results_stream.md

Each measurement runs in its own child process (so its peak RSS is its own) after the page
cache has been warmed with a full read of its inputs and dirty pages synced. The roofline,
safegene and mergekit runs are interleaved in ``--repeats`` rounds (A B C A B C …) so that the
machine's drift hits them alike; the table reports the median wall time, GB/s over the bytes
read + written, the median over rounds of the ratio to the roofline of the same operation
measured in the same round, and peak RSS. The naive torch merges run afterwards. The roofline is the core's own pipeline with the arithmetic switched
off: every input byte is pread and every output byte pwritten, overlapped, as fast as this
machine allows.

``--lowrank R`` (repeatable) adds, per size, a hand-written PEFT LoRA adapter of rank R on every
linear projection (q/k/v/o/gate/up/down) of the ``aligned`` checkpoint, the low-rank gene extracted
from it with ``safegene.extract_from_adapter`` (F32 factors), and two more rows in the same rounds:
``roofline apply (target only)`` (read the target, write the output, nothing else) and
``safegene apply (rank-R gene)``, whose ratio is to that roofline. Its moved bytes are target +
gene factors + output. A line under the table gives the gene sizes on disk, low-rank vs dense.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def llama_shapes(size_gb: float) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    n_layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return shapes, n_layers


def write_checkpoint(d: Path, shapes, n_layers: int, seed: int, base: "numpy.ndarray") -> None:  # noqa: F821
    """Write a bf16 safetensors checkpoint tensor by tensor (never the whole model in memory)."""
    import numpy as np

    from safegene.io.checkpoint import OutTensor, create_files, plan_file

    d.mkdir(parents=True, exist_ok=True)
    outs = [OutTensor(n, "BF16", s, int(np.prod(s)) * 2) for n, s in shapes]
    f = plan_file(d / "model.safetensors", outs)
    create_files([f])
    rng = np.random.default_rng(seed)
    with open(f.path, "r+b") as fh:
        for o in outs:
            n = o.nbytes // 2
            start = int(rng.integers(0, base.size - n)) if base.size > n else 0
            chunk = base[start : start + n] if base.size >= n else np.resize(base, n)
            noise = rng.integers(0, 4, size=min(n, 1 << 16), dtype=np.uint16)  # low-bit "fine-tune"
            arr = chunk.copy()
            arr[: noise.size] ^= noise  # flips mantissa bits only: never makes a NaN or Inf
            fh.seek(o.offset)
            fh.write(arr.tobytes())
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTER,
           "num_hidden_layers": n_layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": VOCAB,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    (d / "config.json").write_text(json.dumps(cfg))


LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_lora_adapter(d: Path, base: Path, rank: int, seed: int = 0) -> int:
    """Write a PEFT LoRA adapter (F32 factors, rank ``rank``, alpha = 2·rank) on every linear
    projection of every block of the checkpoint ``base``; returns the number of modules."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from safegene.io.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    rng = np.random.default_rng(seed)
    tensors = {}
    mods = [n[: -len(".weight")] for n in ck.tensors if n.endswith(".weight") and any(f".{m}." in n for m in LORA_MODULES)]
    for m in mods:
        rows, cols = ck.tensors[m + ".weight"].shape
        a = rng.standard_normal((rank, cols), dtype=np.float32) / np.sqrt(cols)
        b = rng.standard_normal((rows, rank), dtype=np.float32) * 1e-3
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.from_numpy(a)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.from_numpy(b)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
           "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "target_modules": sorted({m.rsplit(".", 1)[1] for m in LORA_MODULES}),
           "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return len(mods)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def make_family(root: Path, size_gb: float) -> dict[str, Path]:
    import numpy as np

    shapes, n_layers = llama_shapes(size_gb)
    rng = np.random.default_rng(0)
    # bf16 bit patterns of N(0, 0.02): one 64 Mi-element pool sliced per tensor keeps generation fast.
    pool = (rng.standard_normal(1 << 26, dtype=np.float32) * 0.02).view(np.uint32)
    base = ((pool + 0x7FFF + ((pool >> 16) & 1)) >> 16).astype(np.uint16)
    fam = {}
    for i, name in enumerate(("aligned", "degraded", "target")):
        d = root / f"{size_gb:g}gb" / name
        if not (d / "model.safetensors").is_file():
            write_checkpoint(d, shapes, n_layers, i, base)
        fam[name] = d
    return fam


# ---- child-process measurements ----------------------------------------------------------------
def child(op: str, args: list[str]) -> dict:
    """Run one operation here and report wall time, bytes moved and peak RSS."""
    import resource

    t0 = time.perf_counter()
    moved = 0
    if op == "extract":
        import safegene

        g = safegene.extract(args[0], args[1], args[2], progress=False)
        moved = g.manifest["stream"]["bytes_read"] + g.manifest["stream"]["bytes_written"]
    elif op == "apply":
        import safegene

        r = safegene.apply(args[0], args[1], args[2], scale=1.0, progress=False)
        moved = _file_bytes([Path(args[1]), Path(args[0]) / "vectors.safetensors"]) + r.bytes_written
    elif op == "apply-lowrank":
        import safegene

        r = safegene.apply(args[0], args[1], args[2], scale=1.0, progress=False)
        # target + the gene's factor (and empty vector) files + output
        moved = _file_bytes([Path(args[1]), Path(args[0])]) + r.bytes_written
    elif op == "roofline-apply-target":
        moved = _roofline(op, args)
    elif op in ("roofline-extract", "roofline-apply"):
        moved = _roofline(op, args)
    elif op == "naive-extract":
        import torch
        from safetensors.torch import load_file, save_file

        a, d = load_file(str(Path(args[0]) / "model.safetensors")), load_file(str(Path(args[1]) / "model.safetensors"))
        save_file({k: a[k].float() - d[k].float() for k in a}, str(Path(args[2])))
        moved = _file_bytes([Path(args[0]), Path(args[1]), Path(args[2])])
    elif op == "naive-apply":
        import torch
        from safetensors.torch import load_file, save_file

        t, tau = load_file(str(Path(args[0]) / "model.safetensors")), load_file(args[1])
        save_file({k: (t[k].float() + tau[k]).to(torch.bfloat16) for k in t}, str(Path(args[2])))
        moved = _file_bytes([Path(args[0]), Path(args[1]), Path(args[2])])
    elif op == "mergekit":
        Path(args[3]).mkdir(parents=True, exist_ok=True)
        cfg = Path(args[3]) / "merge.yml"
        cfg.write_text(
            "merge_method: task_arithmetic\nbase_model: {d}\nmodels:\n  - model: {t}\n    parameters:\n      weight: 1.0\n"
            "  - model: {a}\n    parameters:\n      weight: 1.0\ndtype: bfloat16\n".format(a=args[0], d=args[1], t=args[2])
        )
        subprocess.run([_mergekit(), str(cfg), str(Path(args[3]) / "out"), "--lazy-unpickle"],
                       check=True, capture_output=True)
        moved = _file_bytes([Path(args[0]), Path(args[1]), Path(args[2]), Path(args[3]) / "out"])
    else:
        raise SystemExit(f"unknown op {op}")
    wall = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
    hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    rss = max(hwm_kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if op == "mergekit" else 0)
    return {"wall": wall, "bytes": moved, "rss_mib": rss / 1024}


def _mergekit() -> str | None:
    """mergekit-yaml beside this interpreter (a venv not on PATH) or on PATH."""
    here = Path(sys.executable).parent / "mergekit-yaml"
    return str(here) if here.is_file() else shutil.which("mergekit-yaml")


def _file_bytes(paths: list[Path]) -> int:
    tot = 0
    for p in paths:
        files = [p] if p.is_file() else list(p.glob("*.safetensors"))
        tot += sum(f.stat().st_size for f in files)
    return tot


def _roofline(op: str, args: list[str]) -> int:
    """The same reads and writes as extract/apply (same plan, same pipeline), no arithmetic."""
    from safegene.engine.native import core
    from safegene.engine.stream import Plan
    from safegene.io.checkpoint import OutTensor, create_files, open_checkpoint, plan_file
    from safegene.ops.extract import DEFAULT_BUDGET_MB

    out = Path(args[-1])
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan()
    if op == "roofline-apply-target":  # read the target, write the output: no gene source at all
        t = open_checkpoint(args[0])
        outs = [OutTensor(n, x.dtype, x.shape, x.nbytes) for n, x in t.tensors.items()]
        f = plan_file(out / "model.safetensors", outs)
        create_files([f])
        for o in outs:
            plan.add(f.path, o.offset, o.dtype, t.tensors[o.name].numel, [(t.tensors[o.name], 1.0)])
    elif op == "roofline-extract":
        a, d = open_checkpoint(args[0]), open_checkpoint(args[1])
        outs = [OutTensor(n, "F32", t.shape, t.numel * 4) for n, t in a.tensors.items()]
        f = plan_file(out / "vectors.safetensors", outs)
        create_files([f])
        for o in outs:
            plan.add(f.path, o.offset, "F32", a.tensors[o.name].numel, [(a.tensors[o.name], 1.0), (d.tensors[o.name], -1.0)])
    else:
        t, g = open_checkpoint(args[0]), open_checkpoint(Path(args[1]) / "vectors.safetensors")
        outs = [OutTensor(n, x.dtype, x.shape, x.nbytes) for n, x in t.tensors.items()]
        f = plan_file(out / "model.safetensors", outs)
        create_files([f])
        for o in outs:
            plan.add(f.path, o.offset, o.dtype, t.tensors[o.name].numel, [(t.tensors[o.name], 1.0), (g.tensors[o.name], 1.0)])
    r = core().run_copy_roofline(plan.in_paths, plan.out_paths, plan.jobs, int(DEFAULT_BUDGET_MB * 2**20), 4)
    return r["bytes_read"] + r["bytes_written"]


#: The children's environment: Python's bytecode cache on (as in a pip-installed package, whose
#: .pyc files are written at install time), whatever PYTHONDONTWRITEBYTECODE says here; without
#: it every run would parse safegene's sources again (~0.2 s of a 1 s apply on the dev VM).
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

#: ``--cold``: every run starts with the inputs out of the page cache (as on a machine with less
#: RAM than the checkpoint), instead of warm.
COLD = False


def drop_page_cache() -> None:
    """Write back dirty pages and drop the clean ones (needs root: /proc/sys/vm/drop_caches)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs to drop the page cache (root): {e}") from None


def _run_once(op: str, args: list, warm: list[Path], cleanup: list[Path]) -> dict:
    for p in cleanup:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    os.sync()  # earlier runs' dirty pages must not be written back on this run's clock
    if COLD:
        drop_page_cache()
    else:
        for w in warm:  # page cache warm: a full read of the inputs first
            for f in ([w] if w.is_file() else w.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    cp = subprocess.run([sys.executable, __file__, "--child", op, *map(str, args)], capture_output=True, text=True,
                        env=CHILD_ENV)
    if cp.returncode != 0:
        return {"error": cp.stderr.strip().splitlines()[-1] if cp.stderr.strip() else f"exit {cp.returncode}"}
    return json.loads(cp.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    bad = [r for r in runs if "error" in r]
    if bad:
        return {"error": bad[0]["error"]}
    return {"wall": statistics.median(r["wall"] for r in runs), "walls": [r["wall"] for r in runs],
            "bytes": runs[0]["bytes"], "rss_mib": max(r["rss_mib"] for r in runs)}


def measure(op: str, args: list, warm: list[Path], repeats: int, cleanup: list[Path]) -> dict:
    """``repeats`` runs of one operation back to back; median wall time."""
    return _summary([_run_once(op, args, warm, cleanup) for _ in range(repeats)])


def measure_rounds(specs: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """Interleaved rounds: every round runs each spec once, in order (A B C A B C ...), so a
    slow drift of the machine (other processes, writeback) hits every operation alike; ratios
    are then taken per round (see ``ratio_per_round``)."""
    runs: dict[str, list[dict]] = {k: [] for k in specs}
    for _ in range(repeats):
        for name, (op, args, warm, cleanup) in specs.items():
            runs[name].append(_run_once(op, args, warm, cleanup))
    return {k: {**_summary(v), "runs": v} for k, v in runs.items()}


def ratio_per_round(x: dict, base: dict) -> float | None:
    """Median over rounds of wall(x) / wall(base) measured in the same round."""
    if "error" in x or "error" in base or "runs" not in x or "runs" not in base:
        return None
    return statistics.median(a["wall"] / b["wall"] for a, b in zip(x["runs"], base["runs"]))


def _gene_sizes(dense: Path, lowrank: dict) -> str:
    """One line: the low-rank genes' bytes on disk vs the dense gene's (F32 as extract writes it;
    BF16 computed as 2 bytes per element of the same tensors)."""
    from safegene.io.checkpoint import open_checkpoint

    mb = lambda n: f"{n / 1e6:,.1f} MB"  # noqa: E731
    parts = []
    if (dense / "vectors.safetensors").is_file() or any(dense.glob("vectors-*.safetensors")):
        vec = _file_bytes([dense])
        numel = sum(t.numel for t in open_checkpoint(dense / "vectors.safetensors").tensors.values()) \
            if (dense / "vectors.safetensors").is_file() else vec // 4
        parts.append(f"dense gene (F32, as extract writes it) {mb(_dir_bytes(dense))} on disk ({mb(vec)} vectors; "
                     f"BF16 would be {mb(2 * numel)} of vectors)")
        dense_bytes = _dir_bytes(dense)
    else:
        parts.append("dense gene: missing (extract failed)")
        dense_bytes = 0
    for rk, (lg, n_mod, secs) in lowrank.items():
        fac = sum(f.stat().st_size for f in lg.glob("factors*.safetensors"))
        tot = _dir_bytes(lg)
        ratio = f", 1/{dense_bytes / tot:,.0f} of the dense F32 gene" if dense_bytes else ""
        parts.append(f"rank-{rk} low-rank gene (F32 factors, {n_mod} modules) {mb(tot)} on disk ({mb(fac)} factors; "
                     f"BF16 factors would be ≈ {mb(fac / 2)}){ratio}; extract from adapter {secs:.1f} s")
    return "gene size on disk: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--size-gb", type=float, action="append", help="checkpoint size (repeatable; default 1.2)")
    ap.add_argument("--workdir", default="/tmp/safegene-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-baselines-above-gb", type=float, default=2.0, help="run naive/mergekit only up to this size")
    ap.add_argument("--out", help="append the markdown table to this file")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every run (inputs read from disk; needs root) instead of warming it")
    ap.add_argument("--raw", default=None,
                    help="append every run's wall time, round by round, as JSON lines to this file")
    ap.add_argument("--lowrank", type=int, action="append", metavar="R",
                    help="also apply a rank-R low-rank gene (from a LoRA adapter on the aligned model) against the "
                         "target-only roofline, and report gene sizes (repeatable; default off)")
    a = ap.parse_args()
    global COLD
    COLD = a.cold
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1:])))
        return
    # write the bytecode cache before the first timed run (no run pays for compiling it)
    subprocess.run([sys.executable, "-c", "import safegene, safegene.ops.apply, safegene.ops.extract, numpy"],
                   env=CHILD_ENV, check=True)
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    have_mergekit = _mergekit() is not None
    for size in a.size_gb or [1.2]:
        fam = make_family(root, size)
        w = root / f"{size:g}gb" / "work"
        w.mkdir(exist_ok=True)
        gene = w / "gene"
        specs = {
            "roofline extract": ("roofline-extract", [fam["aligned"], fam["degraded"], w / "rx"], [fam["aligned"], fam["degraded"]], [w / "rx"]),
            "safegene extract": ("extract", [fam["aligned"], fam["degraded"], gene], [fam["aligned"], fam["degraded"]], [gene]),
            "roofline apply": ("roofline-apply", [fam["target"], gene, w / "ra"], [fam["target"], gene], [w / "ra"]),
            "safegene apply": ("apply", [gene, fam["target"], w / "out"], [fam["target"], gene], [w / "out"]),
        }
        lowrank_genes = {}
        if a.lowrank:
            from safegene.ops.extract import extract_from_adapter

            for rk in a.lowrank:
                ad, lg = w / f"lora-r{rk}", w / f"gene-lr{rk}"
                shutil.rmtree(ad, ignore_errors=True)
                n_mod = write_lora_adapter(ad, fam["aligned"], rk)
                t0 = time.perf_counter()
                extract_from_adapter(ad, lg, base=fam["aligned"], overwrite=True)
                lowrank_genes[rk] = (lg, n_mod, time.perf_counter() - t0)
            specs["roofline apply (target only)"] = (
                "roofline-apply-target", [fam["target"], w / "rt"], [fam["target"]], [w / "rt"])
            for rk, (lg, _, _) in lowrank_genes.items():
                specs[f"safegene apply (rank-{rk} gene)"] = (
                    "apply-lowrank", [lg, fam["target"], w / f"out-lr{rk}"], [fam["target"], lg], [w / f"out-lr{rk}"])
        if have_mergekit and size <= a.skip_baselines_above_gb:
            specs["mergekit task_arithmetic (one pass)"] = (
                "mergekit", [fam["aligned"], fam["degraded"], fam["target"], w / "mk"], [fam["aligned"], fam["degraded"], fam["target"]], [w / "mk" / "out"])
        res = measure_rounds(specs, a.repeats)
        if a.raw:
            with open(a.raw, "a") as fh:
                for name, r in res.items():
                    for k, run in enumerate(r.get("runs", [])):
                        fh.write(json.dumps({"size_gb": size, "method": name, "round": k, "wall": run.get("wall"),
                                             "rss_mib": run.get("rss_mib")}) + "\n")
        if size <= a.skip_baselines_above_gb:
            res["naive torch extract"] = measure("naive-extract", [fam["aligned"], fam["degraded"], w / "naive_tau.safetensors"], [fam["aligned"], fam["degraded"]], a.repeats, [w / "naive_tau.safetensors"])
            res["naive torch apply"] = measure("naive-apply", [fam["target"], w / "naive_tau.safetensors", w / "naive_out.safetensors"], [fam["target"]], a.repeats, [w / "naive_out.safetensors"])
        for k in ("rx", "ra", "out", "mk", "naive_tau.safetensors", "naive_out.safetensors", "rt",
                  *(f"out-lr{rk}" for rk in lowrank_genes)):
            p = w / k
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        size_real = _file_bytes([fam["aligned"]]) / 1e9
        for name, r in res.items():
            base = res["roofline extract" if "extract" in name else "roofline apply"]
            if "mergekit" in name:
                base = None
            if name == "roofline apply (target only)" or name.startswith("safegene apply (rank-"):
                base = res["roofline apply (target only)"]
            rows.append((size_real, name, r, base))
        if lowrank_genes:
            rows.append((size_real, _gene_sizes(gene, lowrank_genes), None, None))
            for rk, (lg, _, _) in lowrank_genes.items():
                shutil.rmtree(lg, ignore_errors=True)
                shutil.rmtree(w / f"lora-r{rk}", ignore_errors=True)
        shutil.rmtree(gene, ignore_errors=True)
        if "mergekit task_arithmetic (one pass)" in res and "error" not in res["mergekit task_arithmetic (one pass)"]:
            mkr = res["mergekit task_arithmetic (one pass)"]["runs"]
            r_apply = statistics.median(m["wall"] / x["wall"] for m, x in zip(mkr, res["safegene apply"]["runs"]))
            r_both = statistics.median(m["wall"] / (x["wall"] + y["wall"])
                                       for m, x, y in zip(mkr, res["safegene extract"]["runs"], res["safegene apply"]["runs"]))
            rows.append((size_real, f"ratio mergekit / safegene apply = {r_apply:.1f}x; "
                                    f"mergekit / (extract + apply) = {r_both:.1f}x (medians of per-round ratios)", None, None))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"### Streaming extract/apply ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {cpu}, "
        f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM, page cache {'cold (dropped before every run)' if a.cold else 'warm'}, {a.repeats} interleaved rounds; wall = median, × roofline = median of per-round ratios)",
        "",
        "| checkpoint | method | wall s | GB/s | × roofline | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size, name, r, base in rows:
        if r is None:
            lines.append(f"| {size:.2f} GB | {name} | | | | |")
        elif "error" in r:
            lines.append(f"| {size:.2f} GB | {name} | failed: {r['error'][:80]} | | | |")
        else:
            per_round = ratio_per_round(r, base) if base else None
            ratio = f"{per_round:.2f}" if per_round is not None else f"{r['wall'] / base['wall']:.2f}" if base and "wall" in base else "–"
            lines.append(f"| {size:.2f} GB | {name} | {r['wall']:.2f} | {r['bytes'] / r['wall'] / 1e9:.2f} | {ratio} | {r['rss_mib']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
