"""Hub ids resolved offline from a pre-populated Hugging Face cache laid out as the Hub client does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import safegene  # noqa: E402
from safegene.errors import CheckpointError  # noqa: E402
from safegene.io.hub import parse_hub_id, resolve_model, resolve_target  # noqa: E402

C1 = "a" * 40
C2 = "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, files: dict[str, bytes], refs: dict[str, str]) -> Path:
    """models--org--name/{blobs,snapshots/<commit>,refs/<ref>} with snapshot files linked to blobs."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for i, (name, data) in enumerate(files.items()):
        blob = root / "blobs" / f"{commit[:8]}{i:04d}"
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    for ref, c in refs.items():
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(c)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from safetensors.numpy import save

    import numpy as np

    home = tmp_path / "hf"
    hub = home / "hub"
    w1 = save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, metadata={"format": "pt"})
    w2 = save({"w": np.ones((2, 3), dtype=np.float32)}, metadata={"format": "pt"})
    cfg = json.dumps({"model_type": "llama"}).encode()
    _snapshot(hub, "org/tiny", C1, {"model.safetensors": w1, "config.json": cfg}, {"main": C1})
    _snapshot(hub, "org/tiny", C2, {"model.safetensors": w2, "config.json": cfg}, {"v2": C2})
    _snapshot(hub, "org/pickled", C1, {"pytorch_model.bin": b"\x80\x04not really", "config.json": cfg}, {"main": C1})
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return hub


def test_parse_hub_id():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_hub_id("Org-1/na.me_2@" + C1) == ("Org-1/na.me_2", C1)
    # the last passes the pattern and fails huggingface_hub's own validate_repo_id ("--" is reserved)
    for bad in ("name", "./org/name", "/abs/path", "a/b/c", "org/..", "org/name@", "~/x", "org/na--me"):
        assert parse_hub_id(bad) is None, bad


def test_hub_ids_resolve_offline_from_the_cache(cache):
    main = resolve_model("org/tiny")
    assert main == cache / "models--org--tiny" / "snapshots" / C1
    assert resolve_model("org/tiny@main") == main
    assert resolve_model(f"org/tiny@{C2}") == cache / "models--org--tiny" / "snapshots" / C2
    assert resolve_model("org/tiny@v2").name == C2  # a tag, through refs/v2
    # and the resolved directory is a checkpoint safegene reads
    ck = safegene.open_checkpoint(resolve_model("org/tiny@v2"))
    assert ck.tensors["w"].shape == (2, 3) and ck.model_type == "llama"


def test_hf_hub_cache_wins_over_hf_home(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache .*empty.*HF_HUB_OFFLINE"):
        resolve_model("org/tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model("org/tiny").name == C1


def test_offline_misses_and_refusals_are_named(cache):
    with pytest.raises(CheckpointError, match=r"org/absent: not in the local Hugging Face cache"):
        resolve_model("org/absent")
    with pytest.raises(CheckpointError, match=r"org/tiny@nope: not in the local Hugging Face cache"):
        resolve_model("org/tiny@nope")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights .*pytorch_model\.bin.*never loads"):
        resolve_model("org/pickled")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_model("./not-here")


def test_local_paths_win_over_hub_ids(cache, tmp_path):
    d = tmp_path / "org" / "tiny"
    d.mkdir(parents=True)
    assert resolve_model("org/tiny") == Path("org/tiny")
    assert resolve_model(d) == d


def test_base_plus_adapter_targets(cache, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    base, adapter = resolve_target(f"org/tiny@v2+{ad}")
    assert base.name == C2 and adapter == ad
    assert resolve_target("org/tiny") == (resolve_model("org/tiny"), None)
    (tmp_path / "notad").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        resolve_target("org/tiny+notad")
