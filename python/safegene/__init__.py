"""safegene: restore the safety alignment of fine-tuned LLMs with a reusable safety adapter.

    θ_safe = θ_task + Σ_l λ_l τ_l,   τ = θ_aligned − θ_degraded

>>> import safegene
>>> gene = safegene.extract("aligned/", "degraded/", "gene/")  # doctest: +SKIP
>>> safegene.apply(gene, "task/", "task-safe/", coeffs={"layer.3": 1.0})  # doctest: +SKIP

Importing safegene never needs a GPU and does not import torch; the compiled core
(``safegene._core``) is loaded on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .apply import ApplyResult, apply, apply_to_model, load_coeffs
from .checkpoint import Checkpoint, TensorInfo, layer_key, open_checkpoint, read_header
from .errors import (
    CheckpointError,
    DataError,
    GeneError,
    HeaderError,
    MismatchError,
    NonFiniteError,
    OutputError,
    PickleRefusedError,
    SafeGeneError,
    UsageError,
)
from .extract import extract
from .gene import Gene, load_gene
from .hub import resolve_model, resolve_target
from .inspect import inspect_gene, plot_safety_utility
from .lora import export_lora, lora_target_delta, merge_lora_into_model, read_adapter_config
from .runconfig import load_config, run_config


def has_cuda() -> bool:
    """True only when the CUDA kernels were compiled in and a CUDA device answers."""
    from ._native import has_cuda as _h

    return _h()


__all__ = [
    "__version__",
    "ApplyResult",
    "Checkpoint",
    "CheckpointError",
    "DataError",
    "Gene",
    "GeneError",
    "HeaderError",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "PickleRefusedError",
    "SafeGeneError",
    "TensorInfo",
    "UsageError",
    "apply",
    "apply_to_model",
    "export_lora",
    "extract",
    "has_cuda",
    "inspect_gene",
    "layer_key",
    "load_coeffs",
    "load_config",
    "load_gene",
    "lora_target_delta",
    "merge_lora_into_model",
    "open_checkpoint",
    "plot_safety_utility",
    "read_adapter_config",
    "read_header",
    "resolve_model",
    "resolve_target",
    "run_config",
]
