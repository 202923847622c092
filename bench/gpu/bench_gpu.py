"""GPU benchmarks for the batched kernels, calibration steps and apply_to_model.

Run by bench/gpu/run.sh on a GPU host; writes ``results.json`` and ``table.md`` to ``--out``.

1. scale-and-add and per-tensor dot over a Llama-7B-shaped list of bf16 tensors: safegene's
   multi-tensor kernels against ``torch._foreach_*`` and a per-tensor ``add_(alpha=)`` loop,
   with a device-to-device copy of the same bytes as the roofline (CUDA events, warm-up,
   medians; effective bandwidth counts every byte read and written);
2. calibration steps (forward with the merge kernel, backward with the dot kernel) on the
   organism-sized and a ~1B-parameter random Llama, GPU against CPU;
3. ``apply_to_model`` on a GPU-resident ~1B model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from safegene import _native


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/gpu/out")
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    steps = [("kernels", lambda: bench_kernels(res)), ("calibrate", lambda: bench_calibrate(res)),
             ("apply_to_model", lambda: bench_apply_to_model(res, out / "tmp"))]
    for name, fn in steps:
        if name in a.skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep going: a partial result still teaches something
            res[name] = f"failed: {type(exc).__name__}: {exc}"
        res[f"{name}_wall_s"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"GPU: {res['device']}, torch {res['torch']}", "", "| kernel | ms | GB/s | × copy bandwidth |", "|---|---:|---:|---:|"]
    for k, v in (res.get("kernels") or {}).items() if isinstance(res.get("kernels"), dict) else []:
        lines.append(f"| {k} | {v['seconds'] * 1e3:.2f} | {v['GBps']:.0f} | {v['frac_of_copy_bw']:.2f} |")
    if isinstance(res.get("calibrate"), dict):
        lines += ["", "| calibrate step | params | GPU s | CPU s | speed-up |", "|---|---:|---:|---:|---:|"]
        for k, v in res["calibrate"].items():
            lines.append(f"| {k} | {v['params'] / 1e6:.0f} M | {v['gpu_s_per_step']:.3f} | {v['cpu_s_per_step']:.2f} | {v['speedup']:.0f}× |")
    if isinstance(res.get("apply_to_model"), dict):
        v = res["apply_to_model"]
        lines += ["", f"apply_to_model on a GPU-resident {v['params'] / 1e9:.2f} B model: {v['seconds_incl_loading_tau']:.2f} s including loading τ"]
    for k in ("kernels", "calibrate", "apply_to_model"):
        if isinstance(res.get(k), str):
            lines.append(f"{k}: {res[k]}")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
