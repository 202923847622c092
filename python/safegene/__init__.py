"""safegene: restore the safety alignment of fine-tuned LLMs with a reusable safety adapter.

    θ_safe = θ_task + Σ_l λ_l τ_l,   τ = θ_aligned − θ_degraded

>>> import safegene
>>> gene = safegene.extract("aligned/", "degraded/", "gene/")  # doctest: +SKIP
>>> safegene.apply(gene, "task/", "task-safe/", coeffs={"layer.3": 1.0})  # doctest: +SKIP

Importing safegene never needs a GPU and does not import torch; the compiled core
(``safegene._core``) is loaded on first use.
"""

from __future__ import annotations

from ._version import __version__

from .coeffs import Coeffs, load_coeffs
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
from .engine.native import has_cuda
from .gene import Gene, load_gene
from .io.checkpoint import Checkpoint, TensorInfo, layer_key, open_checkpoint, read_header
from .io.hub import resolve_model, resolve_target
from .io.peft import lora_target_delta, merge_lora_into_model, read_adapter_config
from .method.merge import apply_to_model
from .ops.apply import ApplyResult, apply
from .ops.export_lora import export_lora
from .ops.extract import extract
from .ops.inspection import inspect_gene

# Loaded on first use (PEP 562): the run-config runner pulls in the whole command line and the
# plots matplotlib's wrapper, which ``extract`` / ``apply`` never need (~70 ms of every import).
_LAZY = {"load_config": ".cli.runconfig", "run_config": ".cli.runconfig", "plot_safety_utility": ".eval.plots"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'safegene' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "ApplyResult",
    "Checkpoint",
    "CheckpointError",
    "Coeffs",
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
