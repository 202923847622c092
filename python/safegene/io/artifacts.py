"""The gene and COEFFS as Hub artifacts: resolve, save a portable copy, push.

A gene or a coefficients file travels like a model: a local directory or a Hub repository
``org/name[@revision]`` resolved through the Hugging Face cache (``HF_HUB_OFFLINE`` honoured),
saved with a model card, and pushed with ``huggingface_hub``. What is saved or pushed is
*portable*: every absolute local path in the manifest is replaced by the Hub id and commit it
came from (when it lies in a Hub cache snapshot) or by a content hash and the base name.

This module works on directories and manifest dicts only; :class:`~safegene.gene.Gene` and
:class:`~safegene.coeffs.Coeffs` call it from their ``from_pretrained`` / ``save_pretrained`` /
``push_to_hub``.

>>> resolve_gene_dir("org/llama-safety-gene", "v1")  # doctest: +SKIP
PosixPath('/root/.cache/huggingface/hub/models--org--llama-safety-gene/snapshots/3f1c.../')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import GeneError, OutputError, UsageError
from .atomic import atomic_output_dir, write_json_atomic, write_text_atomic
from .cards import coeffs_card, gene_card
from .hub import download_snapshot, parse_hub_id
from .provenance import portable_gene_manifest, scrub_paths

GENE_MANIFEST = "gene.json"
#: The files of a gene repository: tensors (vectors, shards, factors), JSON (manifest, index), card.
GENE_PATTERNS = ["*.safetensors", "*.json", "README.md"]
COEFFS_FILE = "COEFFS.json"
COEFFS_PATTERNS = [COEFFS_FILE, "README.md"]
CARD = "README.md"
log = logging.getLogger(__name__)


# ---- resolving -----------------------------------------------------------------------------
def split_ref(ref: "str | os.PathLike[str]", revision: str | None) -> tuple[Path | None, str | None, str | None]:
    """``(local path, None, None)`` when ``ref`` exists on disk, else ``(None, repo_id, revision)``.

    A revision may be given in the reference (``org/name@v1``) or as ``revision``, not both.

    >>> split_ref("org/gene@v1", None)
    (None, 'org/gene', 'v1')
    """
    s = os.fspath(ref)
    if not s:
        raise UsageError("an artifact reference must be a non-empty path or Hub id")
    local = Path(s).expanduser()
    if local.exists():
        if revision is not None:
            raise UsageError(f"{s}: a revision ({revision!r}) only applies to a Hub id, and this is a local path")
        return local, None, None
    hub = parse_hub_id(s)
    if hub is None:
        return None, None, None
    repo_id, rev = hub
    if rev is not None and revision is not None and rev != revision:
        raise UsageError(f"{s}: the reference names revision {rev!r} but revision={revision!r} was also given; give one")
    return None, repo_id, revision if revision is not None else rev


def resolve_gene_dir(ref: "str | os.PathLike[str]", revision: str | None = None) -> Path:
    """A gene directory: ``ref`` itself when it exists locally, else the cached snapshot of the Hub
    repository ``ref`` (``org/name[@revision]``), downloading only the gene's files.

    >>> resolve_gene_dir("gene/")  # doctest: +SKIP
    PosixPath('gene')
    """
    local, repo_id, rev = split_ref(ref, revision)
    if local is not None:
        return local
    if repo_id is None:
        raise GeneError(f"{os.fspath(ref)}: no such gene directory (and not a Hub id of the form org/name[@revision])")
    snap = download_snapshot(repo_id, rev, GENE_PATTERNS, error=GeneError)
    log.info("gene %s%s resolved to %s", repo_id, f"@{rev}" if rev else "", snap)
    if not (snap / GENE_MANIFEST).is_file():
        raise GeneError(f"{repo_id}: the Hub repository holds no {GENE_MANIFEST}; it is not a safegene gene")
    return snap


def resolve_coeffs_file(ref: "str | os.PathLike[str]", revision: str | None = None) -> Path:
    """A COEFFS.json: ``ref`` itself (a file, or a directory holding ``COEFFS.json``) when it
    exists locally, else ``COEFFS.json`` in the cached snapshot of the Hub repository ``ref``.

    >>> resolve_coeffs_file("org/llama-safety-coeffs@main")  # doctest: +SKIP
    """
    local, repo_id, rev = split_ref(ref, revision)
    if local is not None:
        return local / COEFFS_FILE if local.is_dir() else local
    if repo_id is None:
        raise UsageError(f"{os.fspath(ref)}: no such coefficients file (and not a Hub id of the form org/name[@revision])")
    snap = download_snapshot(repo_id, rev, COEFFS_PATTERNS, error=UsageError)
    if not (snap / COEFFS_FILE).is_file():
        raise UsageError(f"{repo_id}: the Hub repository holds no {COEFFS_FILE}; it is not a safegene coefficients repository")
    return snap / COEFFS_FILE


# ---- saving ------------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> None:
    # vectors are immutable once written (selection rewrites gene.json only), so a hard link is safe;
    # a Hub cache snapshot holds relative symlinks to blobs, and link() would copy the link itself
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def gene_files(src_dir: Path) -> list[Path]:
    """The files a gene directory carries besides gene.json and its card: every ``*.safetensors``
    (vectors, shards, factors) and ``*.json`` (shard index) file, hidden temporaries excluded."""
    return sorted(
        q for q in src_dir.iterdir()
        if q.is_file() and not q.name.startswith(".") and q.name not in (GENE_MANIFEST, CARD) and q.suffix in (".safetensors", ".json")
    )


def save_gene(
    src_dir: "str | os.PathLike[str]",
    manifest: Mapping[str, Any],
    out: "str | os.PathLike[str]",
    *,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Write a portable copy of the gene in ``src_dir`` into ``out``: its tensor files
    (:func:`gene_files`), gene.json from ``manifest`` made portable (:func:`portable_gene_manifest`)
    and a model card README.md. Appears complete or not at all.

    >>> save_gene(g.path, g.manifest, "share/gene")  # doctest: +SKIP
    """
    src, dst = Path(src_dir), Path(out)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise OutputError(f"{dst}: save_pretrained needs a new directory, not the gene {src} itself or one inside it")
    man = portable_gene_manifest(manifest)
    files = gene_files(src)
    with atomic_output_dir(dst, overwrite) as tmp:
        for f in files:
            _place(f, tmp / f.name)
        write_json_atomic(tmp / GENE_MANIFEST, man)
        write_text_atomic(tmp / CARD, str(gene_card(man, repo_id=repo_id)))
    log.info("saved a portable copy of gene %s in %s (%d tensor files)", src, dst, len(files))
    return dst


def save_coeffs(doc: Mapping[str, Any], out: "str | os.PathLike[str]", *, overwrite: bool = False, repo_id: str | None = None) -> Path:
    """Write a COEFFS.json document (local paths scrubbed) and its model card into the directory ``out``.

    >>> save_coeffs(Coeffs({"layer.3": 1.0}).to_json(), "share/coeffs")  # doctest: +SKIP
    """
    clean = scrub_paths(dict(doc))
    with atomic_output_dir(Path(out), overwrite) as tmp:
        write_text_atomic(tmp / COEFFS_FILE, json.dumps(clean, indent=2) + "\n")
        write_text_atomic(tmp / CARD, str(coeffs_card(clean, repo_id=repo_id)))
    return Path(out)


# ---- pushing -----------------------------------------------------------------------------------
def push_folder(
    folder: Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with safegene",
    create_pr: bool = False,
    delete_patterns: Sequence[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; return the commit URL.

    >>> push_folder(Path("share/gene"), "me/llama-safety-gene")  # doctest: +SKIP
    'https://huggingface.co/me/llama-safety-gene/commit/3f1c...'
    """
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise UsageError(f"{repo_id!r} is not a Hub repository id of the form org/name")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover
        raise OutputError("pushing needs huggingface_hub; pip install huggingface_hub") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, commit_message=commit_message,
            create_pr=create_pr, delete_patterns=list(delete_patterns) if delete_patterns else None,
        )
    except HfHubHTTPError as exc:
        log.debug("push of %s to %s failed", folder, repo_id, exc_info=True)
        raise OutputError(f"{repo_id}: push to the Hub failed ({str(exc).splitlines()[0]}); check the id and log in with `hf auth login`") from None
    url = str(getattr(info, "commit_url", None) or info)
    log.info("pushed %s to %s: %s", folder, repo_id, url)
    return url


def push_gene(src_dir: "str | os.PathLike[str]", manifest: Mapping[str, Any], repo_id: str, **push: Any) -> str:
    """Save a portable copy of the gene (:func:`save_gene`) to a temporary directory and push it
    to ``repo_id``; tensor files of an earlier version are deleted in the same commit.

    >>> push_gene(g.path, g.manifest, "me/llama-safety-gene", private=True)  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory(prefix="safegene-push-") as td:
        folder = save_gene(src_dir, manifest, Path(td) / "gene", repo_id=repo_id)
        push.setdefault("commit_message", f"safegene gene ({manifest.get('fingerprint', {}).get('model_type')})")
        return push_folder(folder, repo_id, delete_patterns=["*.safetensors", "*.json"], **push)


def push_coeffs(doc: Mapping[str, Any], repo_id: str, **push: Any) -> str:
    """Save COEFFS.json and its card (:func:`save_coeffs`) to a temporary directory and push them.

    >>> push_coeffs(Coeffs.load("COEFFS.json").to_json(), "me/llama-safety-coeffs")  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory(prefix="safegene-push-") as td:
        folder = save_coeffs(doc, Path(td) / "coeffs", repo_id=repo_id)
        push.setdefault("commit_message", "safegene coefficients")
        return push_folder(folder, repo_id, **push)


__all__ = [
    "COEFFS_FILE", "GENE_PATTERNS", "gene_files", "push_coeffs", "push_folder", "push_gene", "resolve_coeffs_file", "resolve_gene_dir",
    "save_coeffs", "save_gene", "split_ref",
]
