"""Reading PEFT LoRA adapters: validated configs and per-tensor factors.

:func:`lora_target_delta` parses and validates a PEFT LoRA adapter against a base checkpoint
and returns the per-tensor factors ``(A, B, scale)`` with ΔW = scale · B @ A
(``target_modules``, per-module ``rank_pattern``/``alpha_pattern``, rsLoRA and
``fan_in_fan_out`` honoured; DoRA, trained biases and ``modules_to_save`` refused).
:func:`merge_lora_into_model` adds those deltas to a loaded model in place.

>>> read_adapter_config("task-lora/")["r"]  # doctest: +SKIP
16
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import CheckpointError, PickleRefusedError
from .checkpoint import PICKLE_SUFFIXES, Checkpoint, TensorInfo, open_checkpoint, read_header, read_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
#: Model types whose linear layers are transformers ``Conv1D`` (weight stored as (in, out)).
CONV1D_MODEL_TYPES = {"gpt2"}


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


#: Files that mean a directory ships a tokenizer (``tokenizer.save_pretrained`` writes the first).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def tokenizer_source(base: "str | os.PathLike[str]", adapter: "str | os.PathLike[str] | None") -> Path:
    """Where the tokenizer of ``BASE+ADAPTER`` comes from: the adapter directory when it ships
    one (a fine-tune that added a chat template or tokens saves it beside the adapter, as PEFT's
    ``AutoPeftModel`` loads it), else the base.

    >>> tokenizer_source("org-base/", "task-lora/")  # doctest: +SKIP
    PosixPath('task-lora')
    """
    if adapter is not None and any((Path(adapter) / f).is_file() for f in TOKENIZER_FILES):
        log.info("using the tokenizer the adapter %s ships (not the base's)", adapter)
        return Path(adapter)
    return Path(base)


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
            raise PickleRefusedError(f"{pickles[0]}: pickled adapter weights are never loaded; re-save the adapter with safetensors")
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS}")
    base = base_ckpt if isinstance(base_ckpt, Checkpoint) else open_checkpoint(base_ckpt)
    # validate the header before touching data
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
    log.info("merged the LoRA adapter %s into %d weights", adapter_dir, len(deltas))
    return list(deltas)
