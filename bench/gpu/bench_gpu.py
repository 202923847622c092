"""GPU benchmarks for the batched kernels, calibration steps and apply_to_model.

Run by bench/gpu/run.sh on a GPU host; writes ``results.json`` and ``table.md`` to ``--out``.

1. scale-and-add and per-tensor dot over a Llama-7B-shaped list of bf16 tensors: safegene's
   multi-tensor kernels against ``torch._foreach_*`` and a per-tensor ``add_(alpha=)`` loop,
   with a device-to-device copy of the same bytes as the roofline (CUDA events, warm-up,
   medians; effective bandwidth counts every byte read and written);
2. calibration steps (forward with the merge kernel, backward with the dot kernel) on the
   organism-sized and a ~1B-parameter random Llama, GPU against CPU;
3. ``apply_to_model`` on a GPU-resident ~1B model;
4. ``calibrate`` (exact and low-memory mode, micro-batched) on a ~1B and an 8B-shaped random bf16
   Llama on one GPU: peak device memory and seconds per step, against the model's own bytes and
   the model's own forward+backward on the same tokens (gradient into the input embeddings only:
   the least any λ-gradient can cost).

``--dry-run`` runs step 4 on CPU at a tiny shape (no GPU needed): the path CI can check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from safegene.engine import native as _native


def cuda_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def llama7b_shapes() -> list[tuple[int, ...]]:
    h, inter, vocab, layers = 4096, 11008, 32000, 32
    shapes = [(vocab, h)]
    for _ in range(layers):
        shapes += [(h,), (h, h), (h, h), (h, h), (h, h), (h,), (inter, h), (inter, h), (h, inter)]
    return shapes + [(h,), (vocab, h)]


def bench_kernels(res: dict) -> None:
    dev = torch.device("cuda")
    shapes = llama7b_shapes()
    g = torch.Generator(device=dev).manual_seed(0)
    W = [torch.randn(s, device=dev, dtype=torch.bfloat16, generator=g) for s in shapes]
    T = [(0.01 * torch.randn(s, device=dev, generator=g)).to(torch.bfloat16) for s in shapes]
    coeffs = [0.5 + 0.001 * i for i in range(len(W))]
    scal = torch.tensor(coeffs, device=dev)
    nbytes = sum(w.numel() * 2 for w in W)
    res["kernel_tensors"] = len(W)
    res["kernel_params"] = sum(w.numel() for w in W)

    src = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src))
    src = dst = None  # free the copy buffers before the kernels run
    copy_bw = 2 * nbytes / t_copy
    rows = {"d2d copy (roofline)": (t_copy, 2 * nbytes)}

    # The merge reads W and tau and writes W: 3 x bytes. Coefficients alternate sign so W
    # does not drift across repetitions.
    flip = [1.0]

    def sg():
        flip[0] = -flip[0]
        _native.scale_add_(W, T, [flip[0] * c for c in coeffs])

    rows["safegene scale_add (one call)"] = (cuda_time(sg), 3 * nbytes)
    rows["torch._foreach_add_(alpha=one scalar)"] = (cuda_time(lambda: torch._foreach_add_(W, T, alpha=0.5)), 3 * nbytes)

    def foreach_per_tensor():
        torch._foreach_add_(W, torch._foreach_mul(T, list(scal.unbind())))

    rows["torch._foreach_mul + _foreach_add_ (per-tensor)"] = (cuda_time(foreach_per_tensor, reps=5), 5 * nbytes)

    def loop():
        for w, t, c in zip(W, T, coeffs):
            w.add_(t, alpha=c)

    rows["per-tensor add_(alpha=) loop"] = (cuda_time(loop), 3 * nbytes)
    rows["safegene dot (one call)"] = (cuda_time(lambda: _native.dot(W, T)), 2 * nbytes)
    rows["per-tensor torch.dot loop"] = (
        cuda_time(lambda: torch.stack([torch.dot(w.view(-1), t.view(-1)).float() for w, t in zip(W, T)]).cpu()),
        2 * nbytes,
    )
    res["kernels"] = {
        k: {"seconds": t, "bytes": b, "GBps": b / t / 1e9, "frac_of_copy_bw": (b / t) / copy_bw} for k, (t, b) in rows.items()
    }
    # Correctness on the real sizes: one call against float64 on a sample of tensors.
    idx = [0, 5, len(W) - 1]
    before = [W[i].double().clone() for i in idx]
    _native.scale_add_([W[i] for i in idx], [T[i] for i in idx], [0.25] * len(idx))
    err = max(float((W[i].double() - (b + 0.25 * T[i].double())).abs().max()) for i, b in zip(idx, before))
    res["kernel_max_abs_err_vs_float64"] = err
    W.clear()
    T.clear()
    torch.cuda.empty_cache()


def _random_llama(hidden: int, layers: int, inter: int, vocab: int, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def calib_step_time(model, device: str, steps: int = 5, selected_last: int = 4) -> float:
    """Seconds per calibration step: merge (scale_add) -> forward -> backward -> dot per layer."""
    model = model.to(device)
    params = dict(model.named_parameters())
    n_layers = model.config.num_hidden_layers
    names = [n for n in params if any(f".layers.{i}." in n for i in range(n_layers - selected_last, n_layers))]
    taus = [0.01 * torch.randn_like(params[n]) for n in names]
    ids = torch.randint(0, model.config.vocab_size, (8, 128), device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)

    def step():
        with torch.no_grad():
            _native.scale_add_([params[n].data for n in names], taus, [1e-3] * len(names))
        out = model(ids, labels=ids)
        out.loss.backward()
        _native.dot([params[n].grad for n in names], taus)
        for n in names:
            params[n].grad = None

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_calibrate(res: dict) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        res["calibrate"] = "skipped: transformers is not installed on this host"
        return
    out = {}
    for label, shape, cpu_steps in (("organism (4x128)", (128, 4, 512, 512), 5), ("~1B Llama", (2048, 16, 5632, 32000), 1)):
        m = _random_llama(*shape, dtype=torch.float32)
        params = sum(p.numel() for p in m.parameters())
        gpu = calib_step_time(m, "cuda")
        m = m.cpu()
        torch.cuda.empty_cache()
        cpu = calib_step_time(m, "cpu", steps=cpu_steps)
        out[label] = {"params": params, "gpu_s_per_step": gpu, "cpu_s_per_step": cpu, "speedup": cpu / gpu}
        del m
    res["calibrate"] = out


def bench_apply_to_model(res: dict, tmp: Path) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        res["apply_to_model"] = "skipped: transformers is not installed on this host"
        return
    import safegene

    a = _random_llama(2048, 16, 5632, 32000, torch.bfloat16)
    a.save_pretrained(tmp / "a")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a.save_pretrained(tmp / "d")
    gene = safegene.extract(tmp / "a", tmp / "d", tmp / "gene", progress=False)
    model = a.cuda()
    coeffs = {k: 1.0 for k in gene.layer_keys()}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    safegene.apply_to_model(model, gene, coeffs)
    torch.cuda.synchronize()
    t_total = time.perf_counter() - t0
    res["apply_to_model"] = {"params": sum(p.numel() for p in model.parameters()), "seconds_incl_loading_tau": t_total}


#: name -> (hidden, layers, intermediate, heads, kv heads, vocab)
CALIB_SHAPES = {
    "~1B Llama (TinyLlama shape)": (2048, 22, 5632, 32, 4, 32000),
    "8B-shaped Llama (Llama-3-8B)": (4096, 32, 14336, 32, 8, 128256),
}
DRY_SHAPES = {"tiny Llama (dry run)": (128, 4, 344, 4, 2, 32000)}


def _records(n: int, words: int, completion: str, seed: int) -> list[dict]:
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_memory import WORDS

    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(words)), "completion": completion} for _ in range(n)]


def _build_gene(model, layers: list[int], tmp: Path):
    """A BF16 gene for ``layers`` of ``model``: extract from the blocks' tensors and a perturbed copy,
    written as two lone safetensors files (only those blocks: no full checkpoint on disk)."""
    import safetensors.torch as st

    import safegene

    want = tuple(f"model.layers.{i}." for i in layers)
    a = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.startswith(want)}
    g = torch.Generator().manual_seed(1)
    d = {n: (t.float() + 0.05 * t.float().abs().mean() * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in a.items()}
    tmp.mkdir(parents=True, exist_ok=True)
    st.save_file(a, str(tmp / "aligned.safetensors"))
    st.save_file(d, str(tmp / "degraded.safetensors"))
    del a, d
    gene = safegene.extract(tmp / "aligned.safetensors", tmp / "degraded.safetensors", tmp / "gene", dtype="BF16",
                            progress=False, overwrite=True)
    (tmp / "aligned.safetensors").unlink()
    (tmp / "degraded.safetensors").unlink()
    return gene


class _Mem:
    """Peak memory of a region: device bytes on CUDA (max_memory_allocated), VmHWM on CPU (the dry run)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


def _fwd_bwd_fn(model, pairs: list, pad: int, device: str, micro_batch: int):
    """The model's own forward+backward over ``pairs``, micro-batched, gradient into the input
    embeddings only (no weight gradient): the floor under any λ-gradient."""
    from safegene import lm

    emb = model.get_input_embeddings()

    def fwd_bwd() -> None:
        for i in range(0, len(pairs), micro_batch):
            b = lm.collate(pairs[i:i + micro_batch], pad, device)
            x = emb(b.input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, attention_mask=b.attention_mask, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b.input_ids.flatten()).backward()

    return fwd_bwd


def _calibrate_shape(shape: tuple, tok, safety: list, utility: list, mem: "_Mem", tmp: Path, device: str, steps: int,
                     micro_batch: int, n_selected: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safegene import lm
    from safegene.method.calibrate import calibrate

    hidden, layers, inter, heads, kv, vocab = shape
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialised where it runs: no host copy of an 8B model
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sel = list(range(layers - 2 * n_selected, layers - n_selected))
    t0 = time.perf_counter()
    gene = _build_gene(model, sel, tmp / "calib-gene")
    tau_bytes = sum(p.numel() * 2 for n, p in model.named_parameters()
                    if n.startswith(tuple(f"model.layers.{i}." for i in sel)))
    row: dict = {"params": sum(p.numel() for p in model.parameters()), "model_bytes": model_bytes,
                 "selected": [f"layer.{i}" for i in sel], "tau_bytes_bf16": tau_bytes,
                 "gene_build_s": round(time.perf_counter() - t0, 1), "records": len(safety) + len(utility),
                 "micro_batch": micro_batch}
    pairs = lm.encode_pairs(tok, safety, "safety") + lm.encode_pairs(tok, utility, "utility")
    row["tokens_per_step"] = sum(len(p) + len(c) for p, c in pairs)
    for p in model.parameters():
        p.requires_grad_(False)
    fwd_bwd = _fwd_bwd_fn(model, pairs, lm.pad_id_of(tok), device, micro_batch)
    fwd_bwd()  # warm-up
    mem.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        fwd_bwd()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    row["fwd_bwd_s"] = (time.perf_counter() - t0) / steps
    row["fwd_bwd_peak_bytes"] = mem.peak()

    for mode in ("exact", "lowmem"):
        stamps: list[float] = []

        def log(msg: str, stamps: list = stamps) -> None:
            if msg.startswith("step "):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())

        mem.reset()
        t0 = time.perf_counter()
        c = calibrate(gene, model, safety, utility, layers="all", tokenizer=tok, steps=steps + 1, init=1.0, utility_loss="ce",
                      max_examples=len(safety), mode=mode, micro_batch_size=micro_batch, log=log, patience=100)
        peak = mem.peak()
        diffs = [b - a for a, b in zip(stamps, stamps[1:])]  # the first step also pays for the set-up
        sps = statistics.median(diffs) if diffs else None
        row[mode] = {"peak_bytes": peak, "peak_over_model": peak / model_bytes, "s_per_step": sps,
                     "step_over_fwd_bwd": sps / row["fwd_bwd_s"] if sps else None,
                     "wall_s": round(time.perf_counter() - t0, 1), "lambda": c.coeffs}
    row["max_abs_lambda_diff"] = max(abs(row["exact"]["lambda"][k] - row["lowmem"]["lambda"][k])
                                     for k in row["exact"]["lambda"])
    return row


def bench_calibrate_memory(res: dict, tmp: Path, device: str = "cuda", shapes: dict | None = None, steps: int = 3,
                           n_records: int = 8, words: int = 96, micro_batch: int = 4, n_selected: int = 4) -> None:
    """calibrate on a random bf16 Llama on one device: peak memory and s/step per mode, against the
    model's own bytes and its own forward+backward on the same records."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_memory import make_tokenizer

    tok = make_tokenizer()
    safety = _records(n_records, words, "i cannot help with that .", 0)
    utility = _records(n_records, words, "sure ! the answer is ok", 1)
    mem = _Mem(device)
    out = {}
    res["calibrate_memory"] = out
    for label, shape in (shapes or CALIB_SHAPES).items():
        out[label] = _calibrate_shape(shape, tok, safety, utility, mem, tmp, device, steps, micro_batch, n_selected)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def calibrate_memory_lines(res: dict) -> list[str]:
    if not isinstance(res.get("calibrate_memory"), dict):
        return []
    gib = 1 << 30
    lines = ["", "| calibrate on one device | params | model GiB | selected τ GiB (bf16) | mode | peak GiB | peak / model | "
             "s/step | × model fwd+bwd | model fwd+bwd s (peak GiB) |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for k, v in res["calibrate_memory"].items():
        for mode in ("exact", "lowmem"):
            m = v[mode]
            sps = "–" if m["s_per_step"] is None else f"{m['s_per_step']:.3f}"
            ratio = "–" if m["step_over_fwd_bwd"] is None else f"{m['step_over_fwd_bwd']:.2f}"
            lines.append(f"| {k} | {v['params'] / 1e9:.2f} B | {v['model_bytes'] / gib:.2f} | {v['tau_bytes_bf16'] / gib:.2f} "
                         f"| {mode} | {m['peak_bytes'] / gib:.2f} | {m['peak_over_model']:.2f} | {sps} | {ratio} | "
                         f"{v['fwd_bwd_s']:.3f} ({v['fwd_bwd_peak_bytes'] / gib:.2f}) |")
    lines.append("")
    lines.append("(λ exact vs lowmem, max |Δ|: " + ", ".join(f"{k} {v['max_abs_lambda_diff']:.1e}"
                                                          for k, v in res["calibrate_memory"].items()) + ")")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/gpu/out")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps")
    ap.add_argument("--dry-run", action="store_true", help="calibrate_memory on CPU at a tiny shape (no GPU)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        res: dict = {"device": "cpu (dry run)", "torch": torch.__version__}
        steps = [("calibrate_memory", lambda: bench_calibrate_memory(res, out / "tmp", "cpu", DRY_SHAPES, steps=2,
                                                                     n_records=4, words=12, micro_batch=2, n_selected=1))]
    else:
        res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        steps = [("kernels", lambda: bench_kernels(res)), ("calibrate", lambda: bench_calibrate(res)),
                 ("apply_to_model", lambda: bench_apply_to_model(res, out / "tmp")),
                 ("calibrate_memory", lambda: bench_calibrate_memory(res, out / "tmp"))]
    results = out / ("results.json" if a.only is None else f"results-{'-'.join(a.only)}.json")
    for name, fn in steps:
        if name in a.skip or (a.only is not None and name not in a.only):
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep going: a partial result still teaches something
            res[name] = f"failed: {type(exc).__name__}: {exc}"
        res[f"{name}_wall_s"] = time.perf_counter() - t0
        results.write_text(json.dumps(res, indent=1))
    lines = [f"GPU: {res['device']}, torch {res['torch']}"]
    if isinstance(res.get("kernels"), dict):
        lines += ["", "| kernel | ms | GB/s | × copy bandwidth |", "|---|---:|---:|---:|"]
    for k, v in (res.get("kernels") or {}).items() if isinstance(res.get("kernels"), dict) else []:
        lines.append(f"| {k} | {v['seconds'] * 1e3:.2f} | {v['GBps']:.0f} | {v['frac_of_copy_bw']:.2f} |")
    if isinstance(res.get("calibrate"), dict):
        lines += ["", "| calibrate step | params | GPU s | CPU s | speed-up |", "|---|---:|---:|---:|---:|"]
        for k, v in res["calibrate"].items():
            lines.append(f"| {k} | {v['params'] / 1e6:.0f} M | {v['gpu_s_per_step']:.3f} | {v['cpu_s_per_step']:.2f} | {v['speedup']:.0f}× |")
    if isinstance(res.get("apply_to_model"), dict):
        v = res["apply_to_model"]
        lines += ["", f"apply_to_model on a GPU-resident {v['params'] / 1e9:.2f} B model: {v['seconds_incl_loading_tau']:.2f} s including loading τ"]
    lines += calibrate_memory_lines(res)
    for k in ("kernels", "calibrate", "apply_to_model", "calibrate_memory"):
        if isinstance(res.get(k), str):
            lines.append(f"{k}: {res[k]}")
    (out / ("table.md" if a.only is None else f"table-{'-'.join(a.only)}.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
