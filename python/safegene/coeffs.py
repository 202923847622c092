"""The coefficients artifact, COEFFS.json: per-layer λ plus metadata, with exactly one reader.

A file is either the tagged form ``{"format": "safegene-coeffs", "format_version": 1,
"coeffs": {...}, ...metadata}`` that ``calibrate`` writes, or a plain mapping of layer keys (or
tensor names) to numbers; every value must be a finite number.

>>> Coeffs({"layer.3": 1.0}).coeffs
{'layer.3': 1.0}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from .errors import GeneError, UsageError
from .io.atomic import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from .gene import Gene

COEFFS_FORMAT = "safegene-coeffs"
COEFFS_VERSION = 1

CoeffsLike = Union[Mapping[str, float], str, os.PathLike, "Coeffs", Any]


def _check_table(table: Any, src: str) -> dict[str, float]:
    if not isinstance(table, Mapping):
        raise UsageError(f"{src}: expected a mapping from layer keys to numbers")
    out: dict[str, float] = {}
    for k, v in table.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"{src}: coefficient {k!r} = {v!r} must be a finite number")
        out[k] = float(v)
    return out


@dataclass
class Coeffs:
    """Per-layer coefficients λ (a missing key means λ = 0) plus free-form metadata.

    >>> c = Coeffs({"layer.2": 0.9, "layer.3": 1.1}, {"method": "safegene"})
    >>> c.save("COEFFS.json")  # doctest: +SKIP
    >>> Coeffs.load("COEFFS.json").coeffs["layer.2"]  # doctest: +SKIP
    0.9
    """

    coeffs: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The tagged COEFFS.json document."""
        out: dict[str, Any] = {"format": COEFFS_FORMAT, "format_version": COEFFS_VERSION,
                               "coeffs": {k: float(v) for k, v in self.coeffs.items()}}
        for k, v in self.meta.items():
            if k not in out:
                out[k] = v
        return out

    def save(self, path: "str | os.PathLike[str]") -> Path:
        """Write COEFFS.json atomically (temporary sibling, then rename)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "Coeffs":
        """Read a COEFFS.json: the tagged form (``format`` may be left out), or a plain
        ``{key: number}`` mapping.

        Every value must be a finite number; a tagged file must carry a ``coeffs`` object.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such coefficients file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: not valid JSON ({exc}); expected a safegene COEFFS.json") from None
        if isinstance(doc, dict) and ("format" in doc or isinstance(doc.get("coeffs"), dict)):
            if doc.get("format", COEFFS_FORMAT) != COEFFS_FORMAT or not isinstance(doc.get("coeffs"), dict):
                raise UsageError(f"{path}: not a safegene coefficients file (need format={COEFFS_FORMAT!r} and a 'coeffs' object)")
            meta = {k: v for k, v in doc.items() if k not in ("format", "format_version", "coeffs")}
            return cls(_check_table(doc["coeffs"], str(path)), meta)
        return cls(_check_table(doc, str(path)))

    # ---- sharing (Hugging Face Hub; logic in safegene.io.artifacts) ---------------------------
    @classmethod
    def from_pretrained(cls, repo_id_or_path: "str | os.PathLike[str]", revision: str | None = None) -> "Coeffs":
        """Coefficients from a COEFFS.json file, a directory holding one, or a Hub repository
        ``org/name[@revision]`` (through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` honoured).

        >>> Coeffs.from_pretrained("org/llama-safety-coeffs").coeffs  # doctest: +SKIP
        {'layer.2': 0.9, 'layer.3': 1.1}
        """
        from .io.artifacts import resolve_coeffs_file

        return cls.load(resolve_coeffs_file(repo_id_or_path, revision))

    def save_pretrained(self, save_directory: "str | os.PathLike[str]", *, overwrite: bool = False) -> Path:
        """Write ``COEFFS.json`` (absolute local paths in the metadata made portable) and a model
        card ``README.md`` into the directory ``save_directory``.

        >>> Coeffs({"layer.3": 1.0}).save_pretrained("share/coeffs")  # doctest: +SKIP
        """
        from .io.artifacts import save_coeffs

        return save_coeffs(self.to_json(), save_directory, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Push :meth:`save_pretrained`'s directory to ``repo_id``; returns the commit URL.
        Keywords: ``revision``, ``private``, ``token``, ``commit_message``, ``create_pr``.

        >>> Coeffs.load("COEFFS.json").push_to_hub("me/llama-safety-coeffs")  # doctest: +SKIP
        """
        from .io.artifacts import push_coeffs

        return push_coeffs(self.to_json(), repo_id, **kwargs)

    def summary(self) -> str:
        """Short human summary, e.g. ``'2 keys, λ 0.85–1.10'``."""
        vals = list(self.coeffs.values())
        if not any(v != 0.0 for v in vals):
            return "λ = 0"
        if len(set(round(v, 4) for v in vals)) == 1:
            return f"{len(vals)} keys, λ = {vals[0]:.2f}"
        return f"{len(vals)} keys, λ {min(vals):.2f}–{max(vals):.2f}"


def _is_hub_ref(ref: "str | os.PathLike[str]") -> bool:
    """A reference that is not on disk and reads as a Hub id (``org/name[@rev]``, not ``dir/x.json``)."""
    from .io.hub import parse_hub_id

    s = os.fspath(ref)
    return not Path(s).expanduser().exists() and not s.lower().endswith(".json") and parse_hub_id(s) is not None


def load_coeffs(coeffs: CoeffsLike) -> dict[str, float]:
    """Coefficients from a mapping, a COEFFS.json path (through :meth:`Coeffs.load`), a Hub
    repository id (through :meth:`Coeffs.from_pretrained`), or a :class:`Coeffs`; every value
    checked finite.

    >>> load_coeffs({"layer.3": 1})
    {'layer.3': 1.0}
    """
    if isinstance(coeffs, (str, os.PathLike)):
        if _is_hub_ref(coeffs) or Path(coeffs).is_dir():
            return Coeffs.from_pretrained(coeffs).coeffs
        return Coeffs.load(coeffs).coeffs
    if not isinstance(coeffs, Mapping) and hasattr(coeffs, "coeffs"):
        coeffs = coeffs.coeffs
    return _check_table(coeffs, "coefficients")


def resolve_coeffs(gene: "Gene", scale: float | None, coeffs: CoeffsLike | None) -> dict[str, float]:
    """Per-tensor λ for every gene tensor (0 where no key applies)."""
    if scale is not None and coeffs is not None:
        raise UsageError("give either a uniform scale or per-layer coefficients, not both")
    if scale is None and coeffs is None:
        raise UsageError("give a uniform scale (--scale S) or per-layer coefficients (--coeffs COEFFS.json)")
    if scale is not None:
        if not math.isfinite(scale):
            raise UsageError(f"scale {scale} must be finite")
        return {n: float(scale) for n in gene.tensor_names}
    table = load_coeffs(coeffs)
    keys = set(gene.layer_keys()) | set(gene.tensor_names)
    unknown = sorted(k for k in table if k not in keys)
    if unknown:
        raise GeneError(
            f"coefficients name {unknown[:3]} which the gene {gene.path} does not have; valid keys: {gene.layer_keys()} or tensor names"
        )
    return {n: table.get(n, table.get(gene.layer_key(n), 0.0)) for n in gene.tensor_names}


__all__ = ["COEFFS_FORMAT", "COEFFS_VERSION", "Coeffs", "CoeffsLike", "load_coeffs", "resolve_coeffs"]
