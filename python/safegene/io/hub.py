"""Model references: local paths or Hugging Face Hub ids ``org/name[@revision]``.

A reference that exists on disk is used as is. Otherwise a Hub id is resolved through
``huggingface_hub.snapshot_download`` into its usual cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), fetching only safetensors weights and the
small text/JSON companions (config, tokenizer, chat template) — never pickled ``*.bin``/``*.pt``
files. ``HF_HUB_OFFLINE=1`` is honoured (read when called, not at import): the reference must
then already be in the cache.

>>> resolve_model("meta-llama/Llama-3.2-1B-Instruct@main")  # doctest: +SKIP
PosixPath('/root/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B-Instruct/snapshots/4e20de36.../')
>>> resolve_model("models/aligned")  # doctest: +SKIP
PosixPath('models/aligned')
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable

from .checkpoint import PICKLE_SUFFIXES
from ..errors import CheckpointError, SafeGeneError, UsageError

#: What a Hub snapshot may bring: safetensors weights and small companions (the model card
#: included, so that ``apply`` can keep it), never pickles.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "README.md"]
#: Mistral-style repositories ship their weights twice: an HF-layout set (``model*.safetensors``)
#: and mistral-inference's ``consolidated.safetensors``; the second is skipped when the first exists.
CONSOLIDATED_PATTERNS = ["consolidated*", "*/consolidated*"]
_HF_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
HUB_ID_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]*))?$")
_TRUE = {"1", "on", "yes", "true"}
log = logging.getLogger(__name__)


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` → ``("org/name", "rev")``; ``None`` when ``ref`` is not a Hub id.

    >>> parse_hub_id("org/model@v1.0"), parse_hub_id("org/model"), parse_hub_id("./model")
    (('org/model', 'v1.0'), ('org/model', None), None)
    """
    m = HUB_ID_RE.match(ref)
    if m is None or ".." in m.group("repo") or ref.startswith((".", "/", "~")):
        return None
    try:  # the Hub's own rules (no "--" or "..", length, edge characters) have the last word
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover
        return m.group("repo"), m.group("rev")
    try:
        validate_repo_id(m.group("repo"))
    except HFValidationError:
        return None
    return m.group("repo"), m.group("rev")


def hub_ref_of_path(path: "str | os.PathLike[str] | None") -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``path`` lies in a Hub cache snapshot
    (``…/models--org--name/snapshots/<commit>/…``), else None.

    >>> hub_ref_of_path("/cache/hub/models--org--tiny/snapshots/" + "a" * 40)
    ('org/tiny', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
    >>> hub_ref_of_path("models/aligned") is None
    True
    """
    if path is None:
        return None
    parts = Path(os.fspath(path)).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = parts[i][len("models--"):].replace("--", "/")
            if parse_hub_id(repo) is not None:
                return repo, parts[i + 2]
    return None


def weight_ignore_patterns(files: "Iterable[str]") -> list[str]:
    """The patterns to skip for a repository listing ``files``: ``consolidated.*`` when the
    repository also has an HF-layout weight set (``model.safetensors``, its index, or
    ``model-0000i-of-0000N.safetensors`` shards) at its top level, else none.

    >>> weight_ignore_patterns(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"])
    ['consolidated*', '*/consolidated*']
    >>> weight_ignore_patterns(["consolidated.safetensors", "params.json"])
    []
    """
    names = list(files)
    top = {n for n in names if "/" not in n}
    hf = any(n in ("model.safetensors", "model.safetensors.index.json") or _HF_SHARD.fullmatch(n) for n in top)
    consolidated = any(Path(n).name.startswith("consolidated") for n in names)
    return list(CONSOLIDATED_PATTERNS) if hf and consolidated else []


def _repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The repository's file listing (one metadata request), or None when it cannot be had; the
    download that follows reports any real failure."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover
        return None
    try:
        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        log.debug("listing %s failed (%s); downloading without skip patterns", repo_id, exc)
        return None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value now (or was when huggingface_hub loaded)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE) and "HF_HUB_OFFLINE" not in os.environ
    except ImportError:  # pragma: no cover
        return False


def hub_cache_dir() -> Path:
    """The Hub cache as the environment says now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default.

    Read at call time on purpose: ``huggingface_hub.constants`` are fixed when that module is
    imported, so a process (or a test) that sets ``HF_HOME`` afterwards would read a stale cache.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def resolve_model(ref: "str | os.PathLike[str]") -> Path:
    """A local directory / ``.safetensors`` file, or the cached snapshot directory of a Hub id.

    Local paths win: ``org/name`` that exists on disk is that directory. A Hub id is
    ``org/name`` or ``org/name@revision`` (branch, tag or commit hash).

    >>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct@7ae557604adf67be50417f59c2c2f167def9a775")  # doctest: +SKIP
    """
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise UsageError(f"model reference {ref!r} must be a non-empty path or Hub id")
    local = Path(ref).expanduser()
    if local.exists():
        return local
    hub = parse_hub_id(ref)
    if hub is None:
        raise CheckpointError(f"{ref}: no such file or directory (and not a Hub id of the form org/name[@revision])")
    repo_id, revision = hub
    listing = None if hub_offline() else _repo_files(repo_id, revision)
    ignore = weight_ignore_patterns(listing or [])
    if ignore:
        log.info("%s: skipping %s (the HF-layout weights are the same tensors)", repo_id, ", ".join(ignore))
    path = download_snapshot(repo_id, revision, ALLOW_PATTERNS, ignore_patterns=ignore or None)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    weights = sorted(path.rglob("*.safetensors"))
    if not weights:
        pickles = [q.name for q in path.rglob("*") if q.suffix.lower() in PICKLE_SUFFIXES]
        more = f" (only pickled files: {pickles[:3]}; safegene never loads those)" if pickles else ""
        raise CheckpointError(f"{where}: the snapshot {path} holds no .safetensors weights{more}")
    return path


def download_snapshot(
    repo_id: str,
    revision: str | None,
    allow_patterns: list[str],
    *,
    error: type[SafeGeneError] = CheckpointError,
    repo_type: str = "model",
    ignore_patterns: list[str] | None = None,
) -> Path:
    """The local snapshot directory of ``repo_id`` (a ``repo_type`` repository: model or dataset) at
    ``revision`` (default: ``main``), fetching only
    files matching ``allow_patterns`` (and none matching ``ignore_patterns``) into the Hub cache, or reading the cache alone when
    ``HF_HUB_OFFLINE`` is set; every failure becomes one ``error`` line that says what to do.

    >>> download_snapshot("org/gene", None, ["gene.json", "*.safetensors"])  # doctest: +SKIP
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover
        raise error(f"{repo_id}: not a local path, and huggingface_hub is not installed to resolve it as a Hub id") from None
    offline = hub_offline()
    cache = hub_cache_dir()
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        snap = snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, local_files_only=offline,
            cache_dir=str(cache), repo_type=repo_type,
        )
    except GatedRepoError:
        raise error(f"{where}: the Hub repository is gated; accept its licence and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise error(f"{where}: no such Hub repository (or it is private; log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise error(f"{where}: the Hub repository has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise error(
                f"{where}: not in the local Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                "download it while online or unset HF_HUB_OFFLINE"
            ) from None
        raise error(f"{where}: cannot reach the Hub and it is not in the cache {cache}") from None
    except HfHubHTTPError as exc:
        raise error(f"{where}: Hub request failed ({exc})") from None
    except ValueError as exc:  # malformed ids that passed our pattern
        raise error(f"{where}: {exc}") from None
    return Path(snap)


def resolve_target(ref: "str | os.PathLike[str]") -> tuple[Path, Path | None]:
    """``BASE+ADAPTER`` → (base, adapter); a plain reference → (model, None). Each side may be a Hub id.

    A ``+`` that is part of an existing local path is not a separator.

    >>> resolve_target("org/base@main+./task-lora")  # doctest: +SKIP
    (PosixPath('.../snapshots/abc...'), PosixPath('task-lora'))
    """
    s = os.fspath(ref)
    if "+" not in s or Path(s).expanduser().exists():
        return resolve_model(s), None
    base, _, adapter = s.rpartition("+")
    if not base or not adapter:
        raise UsageError(f"{s}: write a LoRA target as BASE+ADAPTER_DIR")
    a = resolve_model(adapter)
    if not (a / "adapter_config.json").is_file():
        raise CheckpointError(f"{a}: not a PEFT adapter directory (no adapter_config.json), in target {s}")
    return resolve_model(base), a


__all__ = ["ALLOW_PATTERNS", "CONSOLIDATED_PATTERNS", "download_snapshot", "hub_ref_of_path", "hub_cache_dir", "hub_offline", "parse_hub_id",
           "resolve_model", "resolve_target",
           "weight_ignore_patterns"]
