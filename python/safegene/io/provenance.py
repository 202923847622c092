"""Provenance that travels: local paths replaced by Hub ids + commits or content hashes.

A gene records where its aligned and degraded checkpoints came from; on this machine that is a
path. What is saved for sharing (``save_pretrained``, ``push_to_hub``) and what model cards name
must not be: a path inside a Hub cache snapshot becomes ``org/name`` + commit, any other
checkpoint becomes its base name + the SHA-256 of its files.

>>> describe_path("/root/.cache/huggingface/hub/models--org--m/snapshots/abc")
'org/m@abc'
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .hub import hub_ref_of_path

_CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (for a safetensors file on the Hub: its LFS object id)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listing_sha256(rows: Iterable[tuple[str, str]]) -> str:
    """One hash over ``(name, sha256)`` rows, as ``sha256sum`` would list them."""
    text = "".join(f"{sha}  {name}\n" for name, sha in sorted(rows))
    return hashlib.sha256(text.encode()).hexdigest()


def describe_path(path: str) -> str:
    """An absolute local path made portable: ``org/name@commit`` inside a Hub snapshot, else its
    base name; any other string unchanged.

    >>> describe_path("/home/me/models/aligned"), describe_path("layer.3")
    ('aligned', 'layer.3')
    """
    if not (os.path.isabs(path) or path.startswith("~")):
        return path
    ref = hub_ref_of_path(path)
    return f"{ref[0]}@{ref[1]}" if ref else Path(path).name


def scrub_paths(obj: Any) -> Any:
    """A copy of a JSON value with every absolute local path replaced by :func:`describe_path`."""
    if isinstance(obj, str):
        return describe_path(obj)
    if isinstance(obj, Mapping):
        return {k: scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v) for v in obj]
    return obj


def portable_source(src: Mapping[str, Any], *, hash_content: bool = True) -> dict[str, Any]:
    """A checkpoint's provenance (``Checkpoint.provenance()``) with its local ``path`` replaced.

    From a Hub cache snapshot: ``hub = {repo_id, revision}``. Otherwise ``name`` (the base name)
    and ``sha256``, one hash over the files' SHA-256 (each also recorded per file; for a
    safetensors file that is its Hub LFS object id) when the files are still on disk and
    ``hash_content``, else ``headers_sha256`` over the recorded header hashes.

    >>> portable_source({"path": "/c/hub/models--org--m/snapshots/abc", "files": []})["hub"]
    {'repo_id': 'org/m', 'revision': 'abc'}
    """
    out = {k: copy.deepcopy(v) for k, v in src.items() if k != "path"}
    path = src.get("path")
    if not isinstance(path, str):
        return scrub_paths(out)
    ref = hub_ref_of_path(path)
    if ref is not None:
        out["hub"] = {"repo_id": ref[0], "revision": ref[1]}
        return scrub_paths(out)
    root = Path(path)
    out["name"] = root.name
    listed = out.get("files")
    files: list[Any] = listed if isinstance(listed, list) else []
    on_disk = [(f, (root / f["name"]) if root.is_dir() else root) for f in files if isinstance(f, dict) and "name" in f]
    if hash_content and on_disk and all(p.is_file() for _, p in on_disk):
        for f, p in on_disk:
            f["sha256"] = file_sha256(p)
        out["sha256"] = _listing_sha256((f["name"], f["sha256"]) for f, _ in on_disk)
    else:
        out["headers_sha256"] = _listing_sha256((str(f.get("name")), str(f.get("header_sha256"))) for f in files if isinstance(f, dict))
    return scrub_paths(out)


def source_ref(src: Mapping[str, Any] | None) -> str | None:
    """The Hub id (``org/name``) a recorded source came from, from a local or portable record."""
    if not src:
        return None
    hub = src.get("hub")
    if isinstance(hub, Mapping) and isinstance(hub.get("repo_id"), str):
        return str(hub["repo_id"])
    ref = hub_ref_of_path(src.get("path")) if isinstance(src.get("path"), str) else None
    return ref[0] if ref else None


def recorded_base(manifest: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of the gene's aligned model when it came from the Hub (a portable
    ``hub`` record or a path inside a Hub cache snapshot), else None.

    >>> recorded_base({"sources": {"aligned": {"hub": {"repo_id": "org/m", "revision": "abc"}}}})
    ('org/m', 'abc')
    """
    src = (manifest.get("sources") or {}).get("aligned")
    if not isinstance(src, Mapping):
        return None
    hub = src.get("hub")
    if isinstance(hub, Mapping) and isinstance(hub.get("repo_id"), str):
        rev = hub.get("revision")
        return str(hub["repo_id"]), rev if isinstance(rev, str) else None
    path = src.get("path")
    return hub_ref_of_path(path) if isinstance(path, str) else None


def portable_ref(src: Mapping[str, Any] | None) -> str | None:
    """One portable string for a recorded source: ``org/name@commit``, else its base name."""
    if not src:
        return None
    hub = src.get("hub")
    if isinstance(hub, Mapping) and isinstance(hub.get("repo_id"), str):
        return f"{hub['repo_id']}@{hub.get('revision')}" if hub.get("revision") else str(hub["repo_id"])
    path = src.get("path")
    if isinstance(path, str):
        return describe_path(os.path.abspath(path))
    name = src.get("name")
    return str(name) if name is not None else None


def portable_gene_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """gene.json as saved and pushed: sources by Hub id + revision or content hash, no local paths."""
    man = copy.deepcopy(dict(manifest))
    sources = man.get("sources")
    if isinstance(sources, dict):
        man["sources"] = {k: portable_source(v) if isinstance(v, Mapping) else v for k, v in sources.items()}
    return scrub_paths(man)


__all__ = ["describe_path", "file_sha256", "portable_gene_manifest", "portable_ref", "portable_source", "recorded_base", "scrub_paths",
           "source_ref"]
