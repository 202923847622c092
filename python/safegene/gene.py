"""The gene: a family-level safety adapter on disk.

A gene directory holds ``vectors.safetensors`` (τ = θ_aligned − θ_degraded for every float
tensor, under the checkpoint's own names) and ``gene.json``::

    {
      "format": "safegene-gene", "format_version": 1,
      "storage_dtype": "F32",               # policy: see extract.py
      "fingerprint": {"model_type", "num_layers", "tensors": {name: {shape, dtype}}, "sha256"},
      "layers": {tensor name: "layer.<i>" | "embed" | "final_norm" | "lm_head" | "other"},
      "tensors": {tensor name: {tau_norm, aligned_norm, degraded_norm, rel_change, cosine,
                                rounding_rel_error, nonfinite}},
      "layer_stats": {layer key: {tau_norm, aligned_norm, rel_change, n_tensors}},
      "skipped": [non-float tensors, which carry no vector],
      "rounding": {"storage_dtype", "rel_error"},
      "sources": {"aligned": {...}, "degraded": {...}},    # paths, header hashes, configs
      "selection": null | {"method", "scores", "selected", ...}
    }

>>> g = Gene.load("gene/")  # doctest: +SKIP
>>> g.layer_keys()[:3], g.num_layers  # doctest: +SKIP
(['embed', 'layer.0', 'layer.1'], 4)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import GeneError, MismatchError
from .io.atomic import write_json_atomic
from .io.checkpoint import Checkpoint, open_checkpoint, read_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

GENE_FORMAT = "safegene-gene"
GENE_VERSION = 1
MANIFEST = "gene.json"
VECTORS = "vectors.safetensors"
_KEY_ORDER = {"embed": 0, "final_norm": 2, "lm_head": 3, "other": 4}


def key_sort(key: str) -> tuple[int, int]:
    """Order coefficient keys as in the network: embed, layer.0 … layer.N-1, final_norm, lm_head, other."""
    if key.startswith("layer."):
        return (1, int(key.split(".", 1)[1]))
    return (_KEY_ORDER.get(key, 5), 0)


def fingerprint(ckpt: Checkpoint, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Architecture fingerprint: model type, layer count, tensor names, shapes and dtypes."""
    names = list(names) if names is not None else list(ckpt.tensors)
    tensors = {n: {"shape": list(ckpt.tensors[n].shape), "dtype": ckpt.tensors[n].dtype} for n in names}
    cfg = ckpt.config or {}
    body = {
        "model_type": cfg.get("model_type"),
        "num_layers": cfg.get("num_hidden_layers", cfg.get("n_layer")),
        "tensors": tensors,
    }
    shapes_only = json.dumps({n: v["shape"] for n, v in sorted(tensors.items())}, separators=(",", ":"))
    body["sha256"] = hashlib.sha256(shapes_only.encode()).hexdigest()
    return body


@dataclass
class Gene:
    """A loaded gene manifest with lazy access to its vectors."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Gene":
        """Load a gene directory (checks the format and that the vectors file exists).

        >>> Gene.load("gene/").storage_dtype  # doctest: +SKIP
        'F32'
        """
        p = Path(path)
        mf = p / MANIFEST
        if not mf.is_file():
            raise GeneError(f"{p}: not a gene directory (no {MANIFEST}); create one with `safegene extract`")
        man = read_json(mf, error=GeneError, hint="re-run `safegene extract`")
        if not isinstance(man, dict) or man.get("format") != GENE_FORMAT:
            raise GeneError(f"{mf}: not a safegene gene manifest")
        if man.get("format_version") != GENE_VERSION:
            raise GeneError(f"{mf}: gene format version {man.get('format_version')} is not supported (this safegene reads {GENE_VERSION})")
        for k in ("layers", "tensors", "fingerprint"):
            if not isinstance(man.get(k), dict):
                raise GeneError(f"{mf}: missing or malformed {k!r}")
        if not (p / VECTORS).is_file():
            raise GeneError(f"{p}: {VECTORS} is missing; the gene is incomplete, re-run `safegene extract`")
        return cls(p, man)

    # ---- structure ---------------------------------------------------------------------------
    @property
    def vectors_path(self) -> Path:
        return self.path / VECTORS

    @property
    def storage_dtype(self) -> str:
        return str(self.manifest.get("storage_dtype", "F32"))

    @property
    def tensor_names(self) -> list[str]:
        """Names of the tensors that carry a vector, in checkpoint order."""
        return list(self.manifest["layers"])

    def layer_key(self, name: str) -> str:
        """Coefficient key of a tensor (``layer.<i>``, ``embed``, ``final_norm``, ``lm_head``, ``other``)."""
        try:
            return self.manifest["layers"][name]
        except KeyError:
            raise GeneError(f"{self.path}: the gene has no vector for tensor {name!r}") from None

    def layer_keys(self) -> list[str]:
        """All coefficient keys present, in network order."""
        return sorted(set(self.manifest["layers"].values()), key=key_sort)

    @property
    def num_layers(self) -> int:
        return sum(1 for k in self.layer_keys() if k.startswith("layer."))

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def selection(self) -> dict[str, Any] | None:
        return self.manifest.get("selection")

    def selected_layers(self) -> list[str] | None:
        sel = self.selection
        return list(sel["selected"]) if sel else None

    # ---- checks --------------------------------------------------------------------------------
    def check_target(self, ckpt: Checkpoint) -> None:
        """Refuse a target whose architecture differs from the gene's sources."""
        fp = self.fingerprint
        mt = ckpt.model_type
        if fp.get("model_type") and mt and fp["model_type"] != mt:
            raise MismatchError(
                f"gene {self.path} was extracted from model_type {fp['model_type']!r} but {ckpt.root} is {mt!r}; "
                "extract a gene from this model family"
            )
        want = fp["tensors"]
        missing = [n for n in want if n not in ckpt.tensors]
        extra = [n for n in ckpt.tensors if n not in want]
        if missing or extra:
            detail = f"{len(missing)} gene tensors missing from the target" + (f" (e.g. {missing[0]!r})" if missing else "")
            detail += f", {len(extra)} target tensors unknown to the gene" + (f" (e.g. {extra[0]!r})" if extra else "")
            raise MismatchError(f"gene {self.path} does not fit {ckpt.root}: {detail}; use a gene of this architecture")
        for n, spec in want.items():
            if list(ckpt.tensors[n].shape) != list(spec["shape"]):
                raise MismatchError(
                    f"gene {self.path} does not fit {ckpt.root}: tensor {n!r} has shape {list(ckpt.tensors[n].shape)} "
                    f"in the target but {spec['shape']} in the gene; use a gene of this architecture"
                )

    # ---- data --------------------------------------------------------------------------------------
    def load_vectors(
        self, names: Iterable[str] | None = None, device: str = "cpu", dtype: "torch.dtype | None" = None
    ) -> dict[str, "torch.Tensor"]:
        """Load τ for ``names`` (default: all) as torch tensors.

        >>> taus = Gene.load("gene/").load_vectors(["lm_head.weight"])  # doctest: +SKIP
        """
        return dict(self.iter_vectors(names, device=device, dtype=dtype))

    def iter_vectors(
        self, names: Iterable[str] | None = None, device: str = "cpu", dtype: "torch.dtype | None" = None
    ) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(name, τ)`` for ``names`` (default: all) in order, one tensor at a time, with
        the vector file opened once for the whole walk.

        >>> for name, tau in Gene.load("gene/").iter_vectors():  # doctest: +SKIP
        ...     print(name, float(tau.norm()))
        """
        from safetensors import safe_open

        names = self.tensor_names if names is None else list(names)
        with safe_open(str(self.vectors_path), framework="pt", device="cpu") as fh:
            have = set(fh.keys())
            for n in names:
                if n not in have:
                    raise GeneError(f"{self.vectors_path}: no vector for tensor {n!r}")
                t = fh.get_tensor(n)
                if dtype is not None:
                    t = t.to(dtype)
                yield n, (t.to(device) if device != "cpu" else t)

    def set_selection(self, scores: dict[str, float], selected: list[str], method: str, extra: dict[str, Any] | None = None) -> None:
        """Record a layer selection in gene.json (atomically).

        >>> Gene.load("gene/").set_selection({"layer.3": 2.1}, ["layer.3"], "contrast-ratio")  # doctest: +SKIP
        """
        known = set(self.layer_keys())
        bad = [k for k in selected if k not in known]
        if bad:
            raise GeneError(f"{self.path}: cannot select {bad}; the gene's keys are {self.layer_keys()}")
        sel = {"method": method, "scores": dict(scores), "selected": sorted(selected, key=key_sort)}
        sel.update(extra or {})
        self.manifest["selection"] = sel
        write_json_atomic(self.path / MANIFEST, self.manifest)


def load_gene(gene: "str | os.PathLike[str] | Gene") -> Gene:
    """Accept a gene directory or an already loaded :class:`Gene`."""
    return gene if isinstance(gene, Gene) else Gene.load(gene)


__all__ = ["Gene", "load_gene", "fingerprint", "key_sort", "open_checkpoint"]
