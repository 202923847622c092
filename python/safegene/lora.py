"""LoRA in and out: the gene as a standard PEFT LoRA adapter, and PEFT adapters as task updates.

**Out** — :func:`export_lora` turns λ·τ into a PEFT LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained``
loads. For every 2-D linear weight ``<module>.weight`` with λ ≠ 0, ΔW = λ·τ is replaced by its
truncated SVD ``U_r Σ_r V_rᵀ`` split evenly (``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ``); the rank is a
fixed ``rank`` R (capped at min(out, in)) or the smallest rank keeping an ``energy`` fraction E of
Σσ². ``lora_alpha`` equals each module's rank, so PEFT's scale is exactly 1. The relative
reconstruction error ‖ΔW − BA‖/‖ΔW‖ of each module is reported and stored in the sidecar
``safegene_lora.json``. Conv1D models (GPT-2) get ``fan_in_fan_out: true``. Tensors that LoRA cannot carry (norm weights, biases, embeddings, an
lm_head tied to the embedding) are *dropped* and listed there with their share of ‖λτ‖.

**In** — :func:`lora_target_delta` parses and validates a PEFT LoRA adapter against a base
checkpoint and returns the per-tensor factors ``(A, B, scale)`` with ΔW = scale · B @ A
(``target_modules``, per-module ``rank_pattern``/``alpha_pattern``, rsLoRA and
``fan_in_fan_out`` honoured; DoRA, trained biases and ``modules_to_save`` refused).
:func:`merge_lora_into_model` adds those deltas to a loaded model in place.

>>> info = export_lora("gene/", "safety-lora/", coeffs="COEFFS.json", rank=16)  # doctest: +SKIP
>>> info["modules"]["model.layers.3.mlp.down_proj"]["rel_error"]  # doctest: +SKIP
0.031
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ._stream import atomic_output_dir
from .apply import CoeffsLike, resolve_coeffs
from .checkpoint import PICKLE_SUFFIXES, Checkpoint, open_checkpoint, read_json
from .errors import CheckpointError, UsageError
from .gene import Gene, load_gene, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "safegene_lora.json"
PEFT_PREFIX = "base_model.model."
#: Model types whose linear layers are transformers ``Conv1D`` (weight stored as (in, out)).
CONV1D_MODEL_TYPES = {"gpt2"}


# ---------------------------------------------------------------------------------------------
# gene -> LoRA
# ---------------------------------------------------------------------------------------------
def _lambdas(g: Gene, coeffs: CoeffsLike | None, scale: float | None) -> dict[str, float]:
    """Per-tensor λ. With neither ``coeffs`` nor ``scale``: λ = 1 on the gene's selected layers
    (gene.json ``selection``), or on every tensor when the gene has no selection."""
    if coeffs is None and scale is None:
        sel = g.selected_layers()
        if sel:
            return resolve_coeffs(g, None, {k: 1.0 for k in sel})
        scale = 1.0
    return resolve_coeffs(g, scale, coeffs)


def _drop_reason(g: Gene, name: str, shape: list[int], tied: bool) -> str | None:
    """Why a tensor cannot be a LoRA module (None when it can)."""
    if not name.endswith(".weight"):
        return "not a weight (bias or buffer)"
    if len(shape) != 2:
        return f"{len(shape)}-D tensor (norm or other non-linear parameter)"
    key = g.layer_key(name)
    low = name.lower()
    if key == "embed" or "embed" in low.rsplit(".", 2)[-2]:
        return "embedding (LoRA here covers linear layers only)"
    if key == "lm_head" and tied:
        return "lm_head tied to the input embedding (a LoRA on the head would untie them)"
    return None


def _choose_rank(s: "torch.Tensor", rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    e = (s.double() ** 2).cumsum(0)
    total = float(e[-1])
    if total == 0.0:
        return 1
    r = int((e < energy * total * (1 - 1e-12)).sum().item()) + 1
    return max(1, min(r, s.numel()))


def export_lora(
    gene: "str | os.PathLike[str] | Gene",
    out_dir: "str | os.PathLike[str]",
    coeffs: CoeffsLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    base_model_name_or_path: str | None = None,
    *,
    scale: float | None = None,
    dtype: str = "F32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write λ·τ as a PEFT LoRA adapter directory; return the export summary.

    Exactly one of ``rank`` (fixed rank R per module, capped at min(out, in)) and ``energy``
    (0 < E ≤ 1: the smallest rank keeping fraction E of the squared singular values) is
    required. ``coeffs`` is a mapping, a COEFFS.json path or a ``Coeffs`` object (missing keys
    mean λ = 0); ``scale`` gives every tensor the same λ; with neither, λ = 1 on the gene's
    selected layers (or all tensors when there is no selection). ``dtype`` is the storage dtype
    of A and B (``F32``, ``BF16`` or ``F16``). ``base_model_name_or_path`` is recorded in the
    adapter config for ``AutoPeftModelForCausalLM`` (default ``None``: the adapter is meant for
    any task model of the gene's family; ``PeftModel.from_pretrained(model, DIR)`` needs none).

    The summary (also written to ``out_dir/safegene_lora.json``) holds per module its rank,
    ‖λτ‖ and relative reconstruction error, the overall error
    ``sqrt(Σ residual²) / ‖λτ over exported modules‖``, and the dropped tensors with their
    share ``‖λτ_dropped‖ / ‖λτ_all‖``.

    >>> info = export_lora("gene/", "lora/", coeffs={"layer.2": 1.0}, rank=8)  # doctest: +SKIP
    >>> round(info["rel_error"], 3), info["dropped_share"]  # doctest: +SKIP
    (0.412, 0.004)
    """
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of a rank (--rank R) or an energy fraction (--energy E)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"rank must be a positive integer, not {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise UsageError(f"energy must be a fraction in (0, 1], not {energy!r}")
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(str(dtype).upper())
    if torch_dtype is None:
        raise UsageError(f"adapter dtype {dtype!r} is not one of F32, BF16, F16")
    g = load_gene(gene)
    out = Path(out_dir)
    from .checkpoint import check_output_location

    check_output_location(out, [g.path])
    # Conv1D models store weights as (in, out): PEFT's fan_in_fan_out = True, which is one flag
    # for the whole adapter, so a Linear head in such a model cannot be carried alongside.
    conv1d = g.fingerprint.get("model_type") in CONV1D_MODEL_TYPES
    lam = _lambdas(g, coeffs, scale)
    cfg = ((g.manifest.get("sources") or {}).get("aligned") or {}).get("config") or {}
    tied = bool(cfg.get("tie_word_embeddings", False))
    shapes = {n: list(v["shape"]) for n, v in g.fingerprint["tensors"].items()}

    todo = [n for n in g.tensor_names if lam.get(n, 0.0) != 0.0]
    if not todo:
        raise UsageError(f"every coefficient is zero for gene {g.path}; nothing to export")
    modules: dict[str, dict[str, Any]] = {}
    dropped: dict[str, dict[str, Any]] = {}
    tensors: dict[str, "torch.Tensor"] = {}
    sq_total = sq_kept = sq_resid = sq_dropped = 0.0
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="export-lora", unit="tensor", file=sys.stderr, leave=False)
    try:
        for n, tau in g.iter_vectors(todo, dtype=torch.float32):  # the vector file opened once
            c = lam[n]
            shape = shapes.get(n) or []
            reason = _drop_reason(g, n, shape, tied)
            if reason is None and conv1d and g.layer_key(n) == "lm_head":
                reason = "Linear lm_head in a Conv1D model (PEFT's fan_in_fan_out is one flag for all modules)"
            norm = abs(c) * float(tau.double().norm())
            sq_total += norm**2
            if reason is not None:
                dropped[n] = {"reason": reason, "layer": g.layer_key(n), "lambda": c, "norm": norm}
                sq_dropped += norm**2
            else:
                mod = n[: -len(".weight")]
                delta = tau.mul_(c)
                if conv1d:
                    delta = delta.T  # LoRA factors the (out, in) update; PEFT transposes it back
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                r = _choose_rank(s, rank, energy)
                rs = s[:r].sqrt()
                b = (u[:, :r] * rs).to(torch_dtype).contiguous()
                a = (rs[:, None] * vh[:r]).to(torch_dtype).contiguous()
                # the error of what is stored (includes the storage rounding), not just the σ tail
                resid = float((delta.double() - b.double() @ a.double()).norm())
                sq_kept += norm**2
                sq_resid += resid**2
                tensors[f"{PEFT_PREFIX}{mod}.lora_A.weight"] = a
                tensors[f"{PEFT_PREFIX}{mod}.lora_B.weight"] = b
                energy_kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum()) if float(s[0]) > 0 else 1.0
                modules[mod] = {
                    "tensor": n, "layer": g.layer_key(n), "lambda": c, "shape": shape, "rank": r,
                    "full_rank": int(s.numel()), "norm": norm, "energy": energy_kept,
                    "rel_error": resid / norm if norm > 0 else 0.0,
                }
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not modules:
        raise UsageError(
            f"none of the {len(todo)} tensors with λ ≠ 0 is a linear weight (all were dropped: "
            f"{sorted({d['reason'] for d in dropped.values()})}); nothing to export as LoRA"
        )
    ranks = {m: v["rank"] for m, v in modules.items()}
    r_max = max(ranks.values())
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r_max}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    summary: dict[str, Any] = {
        "format": "safegene-lora",
        "gene": str(g.path.resolve()),
        "family_aligned": ((g.manifest.get("sources") or {}).get("aligned") or {}).get("path"),
        "adapter": str(out),
        "mode": {"rank": rank} if rank is not None else {"energy": float(energy)},
        "dtype": str(dtype).upper(),
        "n_modules": len(modules),
        "rank_max": r_max,
        "params": int(sum(t.numel() for t in tensors.values())),
        "rel_error": math.sqrt(sq_resid / sq_kept) if sq_kept > 0 else 0.0,
        "max_module_rel_error": max(v["rel_error"] for v in modules.values()),
        "dropped_share": math.sqrt(sq_dropped / sq_total) if sq_total > 0 else 0.0,
        "modules": modules,
        "dropped": dropped,
        "seconds": 0.0,
    }
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(tmp / SIDECAR, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# PEFT LoRA adapter -> per-tensor deltas
# ---------------------------------------------------------------------------------------------
def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern p with ``(.*\\.)?(p)$`` matching the module."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def _targets(cfg: Mapping[str, Any], module: str) -> bool:
    tm = cfg.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, module) is not None
    return module in tm or any(module.endswith("." + t) for t in tm)


def read_adapter_config(adapter_dir: "str | os.PathLike[str]") -> dict[str, Any]:
    """Read and validate a PEFT LoRA ``adapter_config.json``; refuse what safegene cannot honour.

    >>> read_adapter_config("task-lora/")["r"]  # doctest: +SKIP
    16
    """
    d = Path(adapter_dir)
    p = d / ADAPTER_CONFIG
    if not p.is_file():
        raise CheckpointError(f"{d}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    cfg = read_json(p)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    pt = cfg.get("peft_type")
    if pt != "LORA":
        raise CheckpointError(f"{p}: peft_type is {pt!r}; safegene reads LoRA adapters (peft_type 'LORA') only")
    if cfg.get("use_dora"):
        raise CheckpointError(
            f"{p}: a DoRA adapter (use_dora: true) rescales each column by a learned magnitude, which is not "
            "W + scale·B·A; merge it with PEFT's merge_and_unload() and save the merged model instead"
        )
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{p}: bias {cfg['bias']!r} trains biases too; only bias 'none' adapters are supported")
    if cfg.get("modules_to_save"):
        raise CheckpointError(
            f"{p}: modules_to_save {cfg['modules_to_save']} replaces whole modules; merge with PEFT and save the merged model instead"
        )
    for k in ("target_parameters", "lora_bias"):
        if cfg.get(k):
            raise CheckpointError(f"{p}: {k} is not supported by safegene")
    for k in ("r", "lora_alpha"):
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"{p}: {k} must be a positive number, not {v!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(k) or {}, dict):
            raise CheckpointError(f"{p}: {k} must be an object")
    return cfg


def lora_target_delta(
    base_ckpt: "str | os.PathLike[str] | Checkpoint",
    adapter_dir: "str | os.PathLike[str]",
    *,
    base_tensor: "Callable[[str], torch.Tensor] | None" = None,
) -> dict[str, tuple["torch.Tensor", "torch.Tensor", float]]:
    """Per base tensor, the LoRA factors: ``{weight name: (A, B, scale)}`` with ΔW = scale · B @ A.

    A is (r, in) and B is (out, r) in float32, oriented to the base tensor's own shape
    (``fan_in_fan_out`` and embedding adapters are transposed here). ``scale`` is
    ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA, with ``rank_pattern``/``alpha_pattern``
    applied per module as PEFT does. Every module must match ``target_modules`` and exist in the
    base with a matching shape and rank.

    Adapters saved with ``save_embedding_layers`` also store the full base weight of their
    embedding/head modules (``<module>.base_layer.weight``); those must equal the base's own
    weight (read through ``base_tensor(name)``, default: from the checkpoint), otherwise the
    adapter was trained on a resized vocabulary and is refused.

    >>> deltas = lora_target_delta("base/", "task-lora/")  # doctest: +SKIP
    >>> A, B, s = deltas["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
    """
    import torch
    from safetensors import safe_open

    cfg = read_adapter_config(adapter_dir)
    d = Path(adapter_dir)
    wp = d / ADAPTER_WEIGHTS
    if not wp.is_file():
        pickles = [q for q in d.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            from .errors import PickleRefusedError

            raise PickleRefusedError(f"{pickles[0]}: pickled adapter weights are never loaded; re-save the adapter with safetensors")
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS}")
    base = base_ckpt if isinstance(base_ckpt, Checkpoint) else open_checkpoint(base_ckpt)
    # validate the header before touching data
    from .checkpoint import read_header

    read_header(wp)
    pat_r = cfg.get("rank_pattern") or {}
    pat_a = cfg.get("alpha_pattern") or {}
    fifo = bool(cfg.get("fan_in_fan_out"))
    rs = bool(cfg.get("use_rslora"))
    parts: dict[str, dict[str, "torch.Tensor"]] = {}
    saved_base: dict[str, "torch.Tensor"] = {}
    key_re = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")
    with safe_open(str(wp), framework="pt", device="cpu") as fh:
        for k in fh.keys():
            m = key_re.match(k)
            mb = re.match(r"^(?:base_model\.model\.)?(.+)\.base_layer\.weight$", k)
            if m is None and mb is not None:
                saved_base[mb.group(1) + ".weight"] = fh.get_tensor(k)
                continue
            if m is None:
                raise CheckpointError(f"{wp}: tensor {k!r} is not a LoRA A/B factor; only plain LoRA adapters are supported")
            parts.setdefault(m.group(1), {})[m.group(2)] = fh.get_tensor(k).to(torch.float32)
    if not parts:
        raise CheckpointError(f"{wp}: the adapter holds no LoRA factors")
    if saved_base:
        if base_tensor is None:
            def base_tensor(name: str) -> "torch.Tensor":
                with safe_open(str(base.tensors[name].file), framework="pt", device="cpu") as bf:
                    return bf.get_tensor(name)
        for name, w in saved_base.items():
            if name not in base.tensors:
                raise CheckpointError(f"{wp}: the adapter stores a base weight for {name!r}, which the base {base.root} lacks; wrong base model?")
            bw = base_tensor(name)
            if tuple(w.shape) != tuple(bw.shape) or not torch.equal(w.to(bw.dtype).cpu(), bw.cpu()):
                raise CheckpointError(
                    f"{wp}: the adapter replaces the base weight of {name!r} (shape {list(w.shape)}; the base has {list(bw.shape)}) — "
                    "trained on a resized vocabulary? merge it with PEFT and save the merged model instead"
                )
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mod, fac in sorted(parts.items()):
        emb = "lora_embedding_A" in fac or "lora_embedding_B" in fac
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if ka not in fac or kb not in fac:
            raise CheckpointError(f"{wp}: module {mod!r} has only one of {ka}/{kb}")
        if not _targets(cfg, mod):
            raise CheckpointError(f"{wp}: module {mod!r} has LoRA factors but is not in target_modules {cfg.get('target_modules')!r}")
        name = f"{mod}.weight"
        if name not in base.tensors:
            raise CheckpointError(f"{wp}: module {mod!r} has no weight {name!r} in the base {base.root}; wrong base model?")
        a, b = fac[ka], fac[kb]
        if emb:  # PEFT embedding LoRA: ΔW = (B @ A)ᵀ with A (r, vocab), B (dim, r)
            a, b = b.T.contiguous(), a.T.contiguous()
        elif fifo:  # Conv1D: weight is (in, out) and ΔW = (B @ A)ᵀ
            a, b = b.T.contiguous(), a.T.contiguous()
        r_key = _pattern_key(pat_r, mod)
        a_key = _pattern_key(pat_a, mod)
        r = pat_r[r_key] if r_key is not None else cfg["r"]
        alpha = pat_a[a_key] if a_key is not None else cfg["lora_alpha"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{wp}: module {mod!r} has factors of shapes {list(fac[ka].shape)} and {list(fac[kb].shape)}, which do not multiply")
        if a.shape[0] != r:
            raise CheckpointError(f"{wp}: module {mod!r} has rank {a.shape[0]} but adapter_config.json says r = {r}")
        shape = tuple(base.tensors[name].shape)
        if (b.shape[0], a.shape[1]) != shape:
            raise CheckpointError(
                f"{wp}: module {mod!r} gives a delta of shape {[b.shape[0], a.shape[1]]} but the base weight is {list(shape)}; wrong base model?"
            )
        s = alpha / math.sqrt(r) if rs else alpha / r
        out[name] = (a, b, float(s))
    return out


def merge_lora_into_model(model: "torch.nn.Module", adapter_dir: "str | os.PathLike[str]") -> list[str]:
    """Add a PEFT LoRA adapter to a loaded model in place: ``W += scale · B @ A`` (float32 math).

    Same validation as :func:`lora_target_delta`, with the model's parameters as the base.
    Returns the names of the weights changed.

    >>> model = AutoModelForCausalLM.from_pretrained("base/")  # doctest: +SKIP
    >>> merge_lora_into_model(model, "task-lora/")  # doctest: +SKIP
    ['model.layers.0.self_attn.q_proj.weight', ...]
    """
    import torch

    from .checkpoint import TensorInfo

    params = dict(model.named_parameters())
    fake = Checkpoint(
        Path(f"<in-memory {type(model).__name__}>"), [],
        {n: TensorInfo(n, "F32", tuple(p.shape), Path(), 0, 0) for n, p in params.items()},
    )
    deltas = lora_target_delta(fake, adapter_dir, base_tensor=lambda n: params[n].detach())
    with torch.no_grad():
        for n, (a, b, s) in deltas.items():
            p = params[n]
            merged = p.data.float() + s * (b.to(p.device) @ a.to(p.device))
            p.data.copy_(merged.to(p.dtype))
    return list(deltas)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cli(args: Any) -> int:
    info = export_lora(
        args.gene, args.output, coeffs=args.coeffs, rank=args.rank, energy=args.energy,
        base_model_name_or_path=args.base_model, scale=args.scale, dtype=args.dtype,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k not in ("modules", "dropped")}
                         | {"dropped": sorted(info["dropped"])}))
        return 0
    print(
        f"wrote LoRA adapter {info['adapter']}: {info['n_modules']} modules, max rank {info['rank_max']}, "
        f"{info['params']:,} parameters; relative error {info['rel_error']:.3e} "
        f"(worst module {info['max_module_rel_error']:.3e})"
    )
    if info["dropped"]:
        reasons: dict[str, int] = {}
        for v in info["dropped"].values():
            reasons[v["reason"]] = reasons.get(v["reason"], 0) + 1
        print(
            f"dropped {len(info['dropped'])} tensors that LoRA cannot carry, {100 * info['dropped_share']:.2f}% of ‖λτ‖: "
            + "; ".join(f"{c} × {r}" for r, c in reasons.items())
        )
    print(f"per-module errors in {Path(info['adapter']) / SIDECAR}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``safegene export-lora``."""
    p = subparsers.add_parser(
        "export-lora", help="write the gene (λ·τ) as a standard PEFT LoRA adapter (truncated SVD per linear weight)",
        description="Write λ·τ as a PEFT LoRA adapter: truncated SVD of each linear weight's delta; "
        "norms and embeddings are dropped and reported.",
    )
    p.add_argument("gene", help="gene directory")
    p.add_argument("-o", "--output", required=True, help="adapter directory to create")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank R per module (capped at min(out, in))")
    g.add_argument("--energy", type=float, help="per-module rank keeping this fraction of sum σ² (0 < E ≤ 1)")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--coeffs", help="COEFFS.json (missing keys = 0); default λ = 1 on the gene's selected layers, or all")
    c.add_argument("--scale", type=float, help="one uniform λ for every tensor")
    p.add_argument("--dtype", default="F32", choices=["F32", "BF16", "F16"], help="storage dtype of A and B (default F32)")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record (default none: the adapter fits any model of the gene's family)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=_cli)


__all__ = ["export_lora", "lora_target_delta", "merge_lora_into_model", "read_adapter_config", "register_cli"]
