"""The gene: a family-level safety adapter on disk.

A gene directory holds the vectors (τ = θ_aligned − θ_degraded for every float tensor, or for
the kept keys only, under the checkpoint's own names) and ``gene.json``. The vectors are one
``vectors.safetensors``, or, past the shard size, ``vectors-0000i-of-0000N.safetensors`` with
``vectors.safetensors.index.json`` (the Hugging Face index format: ``metadata.total_size`` and a
``weight_map``); every reader here accepts both::

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
      "selection": null | {"method", "scores", "selected", ...},
      "keys": null | [coefficient keys kept by ``extract --keys`` or ``select --prune``],
      "shards": {"files": [...], "max_shard_bytes", "factor_files": [...] (low-rank genes)},
      "degradation": null | the degraded model's ``safegene_degrade.json`` (how it was made),
      # version 2 only:
      "factored": {tensor name: {"rank", "shape"}},
      "lowrank": {"scale_folded_into": "B", "untouched": [float tensors the adapter leaves alone: τ = 0, not stored]}
    }

**Low-rank (factored) genes, format version 2.** A gene extracted from a LoRA degrade
(``extract ALIGNED ALIGNED+ADAPTER`` or ``extract --from-adapter ADAPTER``) stores τ of each
adapter-touched tensor as two factors in ``factors.safetensors`` (past the shard size
``factors-0000i-of-0000N.safetensors`` with ``factors.safetensors.index.json``, the two factors of
a tensor always in one shard): ``<name>.A`` (r × in) and
``<name>.B`` (out × r) with the adapter's scale folded into B, so that τ = B·A exactly
(degraded = aligned + s·B_ad·A_ad, hence B = −s·B_ad). Dense and factored tensors live side by
side: a name is in ``vectors*`` or in ``factors.safetensors``, never both, and every carried name
is in ``layers``. gene.json then has ``"format_version": 2`` and
``"factored": {name: {"rank": r, "shape": [out, in]}}`` (a gene without factors is written as
version 1, byte for byte as before). Readers:

- :meth:`Gene.iter_factors` / :meth:`Gene.load_factors` give the factors (``apply`` streams them
  through the core's low-rank term and ``export-lora`` writes them out: neither densifies);
- :meth:`Gene.iter_vectors` / :meth:`Gene.load_vectors` give a *dense* τ for every name: a
  factored one is densified by :func:`densify`, the one place where B·A is multiplied out
  (out × in float32 per tensor, one at a time; meant for small-model readers such as select and
  calibrate);
- :meth:`Gene.open_vectors` (the streaming engine's view) covers the dense names only.

>>> g = Gene.load("gene/")  # doctest: +SKIP
>>> g.layer_keys()[:3], g.num_layers  # doctest: +SKIP
(['embed', 'layer.0', 'layer.1'], 4)
>>> {n: g.factor_rank(n) for n in g.factored}  # doctest: +SKIP
{'model.layers.0.self_attn.q_proj.weight': 8, ...}
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
from .io.checkpoint import Checkpoint, SafetensorsFile, TensorInfo, open_checkpoint, read_header, read_json

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

GENE_FORMAT = "safegene-gene"
GENE_VERSION = 1
#: Written only when the gene holds factored tensors (``factors.safetensors``).
GENE_VERSION_FACTORED = 2
SUPPORTED_VERSIONS = (GENE_VERSION, GENE_VERSION_FACTORED)
MANIFEST = "gene.json"
VECTORS = "vectors.safetensors"
FACTORS = "factors.safetensors"
VECTORS_INDEX = "vectors.safetensors.index.json"
FACTORS_INDEX = "factors.safetensors.index.json"
#: Written by ``safegene degrade`` into the degraded model; ``extract`` copies it into gene.json.
DEGRADE_PROVENANCE = "safegene_degrade.json"
DEGRADE_PROVENANCE_FORMAT = "safegene-degrade"
_KEY_ORDER = {"embed": 0, "final_norm": 2, "lm_head": 3, "other": 4}


def key_sort(key: str) -> tuple[int, int]:
    """Order coefficient keys as in the network: embed, layer.0 … layer.N-1, final_norm, lm_head, other."""
    if key.startswith("layer."):
        return (1, int(key.split(".", 1)[1]))
    return (_KEY_ORDER.get(key, 5), 0)


def vector_shard_names(n: int) -> list[str]:
    """File names of a gene's ``n`` vector shards (``vectors.safetensors`` when ``n`` is 1)."""
    if n == 1:
        return [VECTORS]
    return [f"vectors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def factor_shard_names(n: int) -> list[str]:
    """File names of a low-rank gene's ``n`` factor shards (``factors.safetensors`` when ``n`` is 1)."""
    if n == 1:
        return [FACTORS]
    return [f"factors-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def read_degrade_provenance(model_dir: "str | os.PathLike[str]") -> dict[str, Any] | None:
    """The ``safegene_degrade.json`` beside a model's weights (written by ``safegene degrade``), or None."""
    p = Path(model_dir)
    f = p / DEGRADE_PROVENANCE if p.is_dir() else p.parent / DEGRADE_PROVENANCE
    if not f.is_file():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == DEGRADE_PROVENANCE_FORMAT else None


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
        version = man.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise GeneError(f"{mf}: gene format version {version} is not supported (this safegene reads "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade safegene")
        for k in ("layers", "tensors", "fingerprint"):
            if not isinstance(man.get(k), dict):
                raise GeneError(f"{mf}: missing or malformed {k!r}")
        _check_factored(mf, man, version)
        g = cls(p, man)
        g._vector_map()  # checks that the vector file(s) exist
        if g.factored:
            g._factor_map()  # and the factor file(s)
        return g

    # ---- structure ---------------------------------------------------------------------------
    @property
    def vectors_path(self) -> Path:
        """``vectors.safetensors`` of a single-file gene, the shard index of a sharded one."""
        return self.path / VECTORS if (self.path / VECTORS).is_file() else self.path / VECTORS_INDEX

    @property
    def sharded(self) -> bool:
        return not (self.path / VECTORS).is_file() and (self.path / VECTORS_INDEX).is_file()

    def _weight_map(self, single: str, index_name: str) -> tuple[Path, dict[str, str]]:
        """The validated ``weight_map`` of a shard index (``single`` named in the error when the index
        is missing too)."""
        index = self.path / index_name
        if not index.is_file():
            raise GeneError(f"{self.path}: {single} is missing; the gene is incomplete, re-run `safegene extract`")
        idx = read_json(index, error=GeneError, hint="re-run `safegene extract`")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise GeneError(f"{index}: missing or malformed weight_map; re-run `safegene extract`")
        return index, wm

    def _shard_file(self, index: Path, fn: str) -> Path:
        """A shard named by an index: a .safetensors file name inside the gene that exists."""
        if Path(fn).name != fn or not fn.endswith(".safetensors"):
            raise GeneError(f"{index}: weight_map entry {fn!r} must be a .safetensors file name inside the gene")
        f = self.path / fn
        if not f.is_file():
            raise GeneError(f"{index}: shard {fn!r} is listed but missing; the gene is incomplete, re-run `safegene extract`")
        return f

    def _vector_map(self) -> dict[str, Path]:
        """Vector name -> the file that holds it (from the index of a sharded gene)."""
        if (self.path / VECTORS).is_file():
            return {}
        index, wm = self._weight_map(VECTORS, VECTORS_INDEX)
        return {name: self._shard_file(index, fn) for name, fn in wm.items()}

    def _factor_map(self) -> dict[str, Path]:
        """Factored tensor name -> the file holding its ``.A`` and ``.B`` (``factors.safetensors``, or
        the shard the index names)."""
        single = self.path / FACTORS
        fac = self.manifest.get("factored") or {}
        if single.is_file():
            return {n: single for n in fac}
        index, wm = self._weight_map(FACTORS, FACTORS_INDEX)
        out: dict[str, Path] = {}
        for n in fac:
            fa, fb = wm.get(f"{n}.A"), wm.get(f"{n}.B")
            if fa is None or fa != fb:
                raise GeneError(f"{index}: factors {n}.A / {n}.B must be listed in one shard, not {fa!r} / {fb!r}; "
                                "the gene is damaged")
            out[n] = self._shard_file(index, fa)
        return out

    @property
    def factor_files(self) -> list[Path]:
        """The safetensors file(s) holding the factors, in shard order (empty for a dense gene)."""
        if not self.factored:
            return []
        return list(dict.fromkeys(self._factor_map().values()))

    @property
    def vector_files(self) -> list[Path]:
        """The safetensors file(s) holding the vectors, in shard order."""
        vm = self._vector_map()
        return list(dict.fromkeys(vm.values())) if vm else [self.path / VECTORS]

    def open_vectors(self) -> Checkpoint:
        """The vectors as a :class:`~safegene.io.checkpoint.Checkpoint` (headers only; one file or shards),
        ready for the streaming engine. It holds the dense vectors only; factored tensors are in
        :meth:`iter_factors`.

        >>> Gene.load("gene/").open_vectors().tensors["lm_head.weight"].shape  # doctest: +SKIP
        """
        vm = self._vector_map()
        if not vm:
            return open_checkpoint(self.path / VECTORS)
        files: list[SafetensorsFile] = []
        tensors = {}
        for f in dict.fromkeys(vm.values()):
            sf = read_header(f)
            files.append(sf)
            for name, info in sf.tensors.items():
                if vm.get(name) != f:
                    raise GeneError(f"{self.path / VECTORS_INDEX}: tensor {name!r} is in {f.name} but the index says {vm.get(name)!r}")
                tensors[name] = info
        missing = [n for n in vm if n not in tensors]
        if missing:
            raise GeneError(f"{self.path / VECTORS_INDEX}: {len(missing)} vectors are in no shard, e.g. {missing[0]!r}; the gene is damaged")
        return Checkpoint(self.path, files, tensors, None, self.path / VECTORS_INDEX)

    @property
    def degradation(self) -> dict[str, Any] | None:
        """How the degraded model was made (its ``safegene_degrade.json``), when ``safegene degrade`` made it."""
        return self.manifest.get("degradation")

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
    def factored(self) -> dict[str, dict[str, Any]]:
        """Factored tensors: ``{name: {"rank": r, "shape": [out, in]}}`` (empty for a dense gene)."""
        return dict(self.manifest.get("factored") or {})

    def is_factored(self, name: str) -> bool:
        """True when τ of ``name`` is stored as factors B·A rather than densely."""
        return name in (self.manifest.get("factored") or {})

    def factor_rank(self, name: str) -> int:
        """Rank r of a factored tensor's τ = B·A."""
        try:
            return int(self.manifest["factored"][name]["rank"])
        except (KeyError, TypeError):
            raise GeneError(f"{self.path}: tensor {name!r} is not factored in this gene") from None

    @property
    def dense_names(self) -> list[str]:
        """Names whose τ is stored densely (in ``vectors*``), in checkpoint order."""
        fac = self.manifest.get("factored") or {}
        return [n for n in self.tensor_names if n not in fac]

    @property
    def factors_path(self) -> Path:
        """``factors.safetensors`` of a low-rank gene, its shard index when the factors are sharded."""
        return self.path / FACTORS if (self.path / FACTORS).is_file() or not (self.path / FACTORS_INDEX).is_file() \
            else self.path / FACTORS_INDEX

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
        the vector file opened once for the whole walk. A factored τ is densified here
        (:func:`densify`, float32 unless ``dtype`` says otherwise); use :meth:`iter_factors` to
        keep it factored.

        >>> for name, tau in Gene.load("gene/").iter_vectors():  # doctest: +SKIP
        ...     print(name, float(tau.norm()))
        """
        from contextlib import ExitStack

        from safetensors import safe_open

        names = self.tensor_names if names is None else list(names)
        vm = self._vector_map()
        single = self.path / VECTORS
        fac = self.manifest.get("factored") or {}
        fmap = self._factor_map() if any(n in fac for n in names) else {}
        with ExitStack() as stack:
            handles: dict[Path, tuple[Any, set[str]]] = {}
            fac_handles: dict[Path, Any] = {}
            for n in names:
                if n in fac:
                    ff = fmap[n]
                    if ff not in fac_handles:
                        fac_handles[ff] = stack.enter_context(safe_open(str(ff), framework="pt", device="cpu"))
                    a, b = self._read_factors(fac_handles[ff], n, ff)
                    t = densify(a, b)
                    if dtype is not None:
                        t = t.to(dtype)
                    yield n, (t.to(device) if device != "cpu" else t)
                    continue
                f = vm.get(n) if vm else single
                if f is None:
                    raise GeneError(f"{self.vectors_path}: no vector for tensor {n!r}")
                if f not in handles:
                    h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                    handles[f] = (h, set(h.keys()))
                fh, have = handles[f]
                if n not in have:
                    raise GeneError(f"{f}: no vector for tensor {n!r}")
                t = fh.get_tensor(n)
                if dtype is not None:
                    t = t.to(dtype)
                yield n, (t.to(device) if device != "cpu" else t)

    def iter_factors(
        self, names: Iterable[str] | None = None, dtype: "torch.dtype | None" = None
    ) -> Iterator[tuple[str, "torch.Tensor", "torch.Tensor"]]:
        """Yield ``(name, A, B)`` with τ = B @ A for the factored ``names`` (default: all factored
        tensors), A (r × in) and B (out × r) as stored (or cast to ``dtype``); each factor file
        (or shard) is opened once. Nothing is densified.

        >>> for name, a, b in Gene.load("gene/").iter_factors():  # doctest: +SKIP
        ...     print(name, a.shape[0])
        """
        from contextlib import ExitStack

        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for n, ff in self._factor_sources(names):
                if ff not in handles:
                    handles[ff] = stack.enter_context(safe_open(str(ff), framework="pt", device="cpu"))
                a, b = self._read_factors(handles[ff], n, ff)
                if dtype is not None:
                    a, b = a.to(dtype), b.to(dtype)
                yield n, a, b

    def _factor_sources(self, names: Iterable[str] | None) -> Iterator[tuple[str, Path]]:
        """``(name, file holding its factors)`` for the factored ``names`` (default: all), in order;
        a name that is not factored fails when reached."""
        fac = self.manifest.get("factored") or {}
        names = list(fac) if names is None else list(names)
        if not names:
            return
        fmap = self._factor_map()
        for n in names:
            if n not in fac:
                raise GeneError(f"{self.path}: tensor {n!r} is not factored in this gene")
            yield n, fmap[n]

    def load_factors(
        self, names: Iterable[str] | None = None, dtype: "torch.dtype | None" = None
    ) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
        """``{name: (A, B)}`` for the factored ``names`` (default: all), as :meth:`iter_factors`.

        >>> a, b = Gene.load("gene/").load_factors()["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
        """
        return {n: (a, b) for n, a, b in self.iter_factors(names, dtype)}

    def _read_factors(self, fh: Any, name: str, f: Path) -> tuple["torch.Tensor", "torch.Tensor"]:
        """A and B of ``name`` from the open factors file ``f``, checked against gene.json's rank and shape."""
        try:
            a, b = fh.get_tensor(f"{name}.A"), fh.get_tensor(f"{name}.B")
        except Exception:  # safetensors raises its own error type for a missing key
            raise self._missing_factors(name, f) from None
        self._check_factor_shapes(name, f, tuple(a.shape), tuple(b.shape))
        return a, b

    def _missing_factors(self, name: str, f: Path) -> GeneError:
        return GeneError(f"{f}: no factors {name}.A / {name}.B; the gene is damaged, re-run `safegene extract`")

    def _check_factor_shapes(self, name: str, f: Path, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        spec = self.manifest["factored"][name]
        r, (rows, cols) = int(spec["rank"]), spec["shape"]
        if a != (r, cols) or b != (rows, r):
            raise GeneError(f"{f}: factors of {name!r} have shapes {list(a)} and {list(b)}, but gene.json "
                            f"says rank {r} for a {rows} x {cols} tensor; the gene is damaged")

    def iter_factors_f32(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, "np.ndarray", "np.ndarray"]]:
        """:meth:`iter_factors` as float32 numpy arrays, read without importing torch (what ``apply``
        streams, so a low-rank apply is as light as a dense one: no torch runtime, ~40 MiB). F16
        and BF16 factors are widened exactly; the same checks as :meth:`iter_factors`.

        >>> a = dict((n, a) for n, a, _ in Gene.load("gene/").iter_factors_f32())  # doctest: +SKIP
        """
        headers: dict[Path, SafetensorsFile] = {}
        for n, ff in self._factor_sources(names):
            if ff not in headers:
                headers[ff] = read_header(ff)
            ta, tb = headers[ff].tensors.get(f"{n}.A"), headers[ff].tensors.get(f"{n}.B")
            if ta is None or tb is None:
                raise self._missing_factors(n, ff)
            self._check_factor_shapes(n, ff, tuple(ta.shape), tuple(tb.shape))
            yield n, _read_f32(ta), _read_f32(tb)

    def set_selection(self, scores: dict[str, float], selected: list[str], method: str, extra: dict[str, Any] | None = None) -> None:
        """Record a layer selection in gene.json (atomically) and in the gene's card (README.md).

        >>> Gene.load("gene/").set_selection({"layer.3": 2.1}, ["layer.3"], "contrast-ratio")  # doctest: +SKIP
        """
        known = set(self.layer_keys())
        bad = [k for k in selected if k not in known]
        if bad:
            raise GeneError(f"{self.path}: cannot select {bad}; the gene's keys are {self.layer_keys()}")
        hub = self.hub_ref
        if hub is not None:
            # a Hub cache snapshot is shared by every user of the cache: never rewrite it in place
            raise GeneError(f"{hub[0]}@{hub[1]}: a gene from the Hub cache is read-only; save a local copy first "
                            "(`Gene.from_pretrained(ID).save_pretrained(DIR)`, or `safegene select ID -o DIR`)")
        sel = {"method": method, "scores": dict(scores), "selected": sorted(selected, key=key_sort)}
        sel.update(extra or {})
        self.manifest["selection"] = sel
        write_json_atomic(self.path / MANIFEST, self.manifest)
        from .io.cards import write_gene_card

        write_gene_card(self.path, self.manifest)  # the card's selection section follows gene.json

    # ---- sharing (Hugging Face Hub; logic in safegene.io.artifacts) ---------------------------
    @property
    def hub_ref(self) -> tuple[str, str] | None:
        """``(repo_id, commit)`` when this gene was loaded from a Hub cache snapshot, else None."""
        from .io.hub import hub_ref_of_path

        return hub_ref_of_path(self.path.resolve())

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: "str | os.PathLike[str]", revision: str | None = None) -> "Gene":
        """A gene from a local directory or a Hub repository ``org/name[@revision]`` (through the
        Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only).

        >>> Gene.from_pretrained("org/llama-safety-gene", revision="v1")  # doctest: +SKIP
        """
        from .io.artifacts import resolve_gene_dir

        return cls.load(resolve_gene_dir(repo_id_or_dir, revision))

    def save_pretrained(self, save_directory: "str | os.PathLike[str]", *, overwrite: bool = False) -> Path:
        """A portable copy in ``save_directory``: the vectors, gene.json with sources as Hub ids or
        content hashes (no local paths), and a model card README.md.

        >>> Gene.load("gene/").save_pretrained("share/gene")  # doctest: +SKIP
        """
        from .io.artifacts import save_gene

        return save_gene(self.path, self.manifest, save_directory, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Push the portable copy (:meth:`save_pretrained`) to ``repo_id``; returns the commit URL.
        Keywords: ``revision``, ``private``, ``token``, ``commit_message``, ``create_pr``.

        >>> Gene.load("gene/").push_to_hub("me/llama-safety-gene", private=True)  # doctest: +SKIP
        """
        from .io.artifacts import push_gene

        return push_gene(self.path, self.manifest, repo_id, **kwargs)


def _check_factored(mf: Path, man: dict[str, Any], version: Any) -> None:
    """Validate gene.json's ``factored`` table: only in version 2, each entry a carried 2-D tensor."""
    fac = man.get("factored")
    if version == GENE_VERSION:
        if fac:
            raise GeneError(f"{mf}: a version 1 gene cannot hold factored tensors; the manifest is damaged")
        return
    if not isinstance(fac, dict):
        raise GeneError(f"{mf}: a version 2 gene needs a 'factored' table; re-run `safegene extract`")
    for n, spec in fac.items():
        ok = (isinstance(spec, dict) and isinstance(spec.get("rank"), int) and spec["rank"] >= 1
              and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 2
              and all(isinstance(x, int) and x >= 1 for x in spec["shape"]))
        if not ok:
            raise GeneError(f"{mf}: factored entry {n!r} must be {{'rank': r >= 1, 'shape': [out, in]}}, not {spec!r}")
        if n not in man["layers"]:
            raise GeneError(f"{mf}: factored tensor {n!r} is not in 'layers'; the manifest is damaged")


def densify(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """τ = B @ A as a dense float32 tensor: the product in float64, rounded once.

    The one place a factored τ is multiplied out (``Gene.iter_vectors`` calls it); ``apply``
    and ``export-lora`` never do. It costs out × in float32, so it is meant for models small
    enough to hold one such tensor at a time.

    >>> import torch
    >>> densify(torch.ones(1, 3), torch.full((2, 1), 2.0)).tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    import torch

    return (b.to(torch.float64) @ a.to(torch.float64)).to(torch.float32)


def factors_sq_norm(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """‖B @ A‖_F² in float64 from the r × r Gram matrices (never forms B @ A):
    trace((BᵀB)(AAᵀ)).

    >>> import torch
    >>> factors_sq_norm(torch.ones(1, 3), torch.full((2, 1), 2.0))
    24.0
    """
    import torch

    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return float(((b64.T @ b64) * (a64 @ a64.T)).sum())


def load_gene(gene: "str | os.PathLike[str] | Gene") -> Gene:
    """Accept an already loaded :class:`Gene`, a gene directory, or a Hub repository id
    ``org/name[@revision]`` when no local path of that name exists (:meth:`Gene.from_pretrained`:
    through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only).

    >>> load_gene("org/llama-safety-gene@v1").hub_ref  # doctest: +SKIP
    ('org/llama-safety-gene', '3f1c...')
    """
    if isinstance(gene, Gene):
        return gene
    from .io.hub import parse_hub_id

    s = os.fspath(gene)
    if s and not Path(s).expanduser().exists() and parse_hub_id(s) is not None:
        try:
            return Gene.from_pretrained(s)
        except GeneError as exc:
            # a relative path that does not exist also reads as org/name: say both
            why = str(exc).removeprefix(f"{s}: ")
            raise GeneError(f"{s}: not a gene directory on this disk, and as a Hub id: {why}") from None
    return Gene.load(gene)


__all__ = ["DEGRADE_PROVENANCE", "FACTORS", "FACTORS_INDEX", "Gene", "densify", "factors_sq_norm", "factor_shard_names", "fingerprint", "key_sort",
           "load_gene", "open_checkpoint", "read_degrade_provenance", "vector_shard_names"]


def _read_f32(t: TensorInfo) -> "np.ndarray":
    """One F32/F16/BF16 safetensors tensor as a float32 array, read with numpy (BF16: the 16 bits
    become the high half of a float32, exact). numpy is imported here, on the first factor read:
    a dense apply never imports it."""
    import numpy as np

    raw = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}.get(t.dtype)
    if raw is None:
        raise GeneError(f"{t.file}: factor {t.name!r} is {t.dtype}; a gene's factors are F32, F16 or BF16")
    arr = np.fromfile(t.file, dtype=raw, count=t.nbytes // np.dtype(raw).itemsize, offset=t.offset)
    if t.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False).reshape(t.shape)
