"""The gene and COEFFS as Hub artifacts, offline: save_pretrained -> a Hub cache layout ->
from_pretrained under HF_HUB_OFFLINE=1 gives the identical bytes; push_to_hub against a recorded
fake of huggingface_hub's HfApi (the HTTP boundary), never against a mocked gene."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

import safegene  # noqa: E402
from safegene.cli import main as cli_main  # noqa: E402
from safegene.coeffs import Coeffs, load_coeffs  # noqa: E402
from safegene.errors import GeneError, UsageError  # noqa: E402
from safegene.gene import Gene  # noqa: E402

REV = "c" * 40
REV2 = "d" * 40


def hub_cache_put(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``folder`` out in a Hub cache as huggingface_hub does: blobs named by content hash,
    ``snapshots/<commit>/<file>`` symlinks to them, ``refs/<ref>`` holding the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snap


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


@pytest.fixture
def gene(family, tmp_path) -> Gene:
    dirs = family("llama")
    return safegene.extract(dirs["aligned"], dirs["degraded"], tmp_path / "gene", progress=False)


class FakeHub:
    """HfApi.create_repo / create_branch / upload_folder recorded: what would have gone over HTTP."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.calls: list[tuple[str, dict]] = []
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        hub = self

        def create_repo(self, repo_id, **kw):
            hub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            hub.repos.setdefault(repo_id, {})

        def create_branch(self, repo_id, *, branch, **kw):
            hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, **kw}))

        def upload_folder(self, *, repo_id, folder_path, revision=None, **kw):
            from huggingface_hub import CommitInfo

            assert repo_id in hub.repos, "upload before create_repo"
            files = tree_bytes(Path(folder_path))
            hub.calls.append(("upload_folder", {"repo_id": repo_id, "revision": revision, "files": sorted(files), **kw}))
            hub.repos[repo_id][revision or "main"] = files
            oid = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
            url = f"https://huggingface.co/{repo_id}/commit/{oid}"
            return CommitInfo(commit_url=url, commit_message=kw.get("commit_message") or "", commit_description="", oid=oid)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


# ---- gene ------------------------------------------------------------------------------------
def test_gene_round_trip_through_an_offline_hub_cache(gene, tmp_path, offline_cache):
    saved = gene.save_pretrained(tmp_path / "share")
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "gene.json", "vectors.safetensors"]
    assert (saved / "vectors.safetensors").read_bytes() == (gene.path / "vectors.safetensors").read_bytes()
    man = json.loads((saved / "gene.json").read_text())
    # provenance holds content hashes, never this machine's paths
    assert not any(str(tmp_path) in s or s.startswith("/") for s in strings(man))
    for role in ("aligned", "degraded"):
        src = man["sources"][role]
        assert src["name"].endswith(role) and len(src["sha256"]) == 64 and "path" not in src
        assert all(len(f["sha256"]) == 64 for f in src["files"])
    # the original gene is untouched (extract's gene.json keeps its local paths)
    assert gene.manifest["sources"]["aligned"]["path"].startswith("/")

    snap = hub_cache_put(offline_cache, "org/llama-safety-gene", saved, REV)
    for ref, rev in (("org/llama-safety-gene", None), (f"org/llama-safety-gene@{REV}", None), ("org/llama-safety-gene", "main")):
        got = Gene.from_pretrained(ref, revision=rev)
        assert got.path.resolve() == snap.resolve()
        assert tree_bytes(got.path) == tree_bytes(saved)
        assert got.manifest == man and got.tensor_names == gene.tensor_names
    # the loaded gene patches a model exactly as the original does
    a = safegene.apply(gene, gene.manifest["sources"]["aligned"]["path"], tmp_path / "out-local", scale=0.5, progress=False)
    b = safegene.apply(Gene.from_pretrained("org/llama-safety-gene"), gene.manifest["sources"]["aligned"]["path"],
                       tmp_path / "out-hub", scale=0.5, progress=False)
    assert (a.out / "model.safetensors").read_bytes() == (b.out / "model.safetensors").read_bytes()


def test_gene_from_pretrained_errors_are_one_line(gene, tmp_path, offline_cache):
    with pytest.raises(GeneError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE"):
        Gene.from_pretrained("org/absent-gene")
    with pytest.raises(GeneError, match="no such gene directory"):
        Gene.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="revision"):
        Gene.from_pretrained(gene.path, revision="main")
    with pytest.raises(UsageError, match="give one"):
        Gene.from_pretrained("org/g@v1", revision="v2")
    hub_cache_put(offline_cache, "org/not-a-gene", (gene.path / "vectors.safetensors").parent, REV2)
    (offline_cache / "models--org--not-a-gene" / "snapshots" / REV2 / "gene.json").unlink()
    with pytest.raises(GeneError, match="holds no gene.json"):
        Gene.from_pretrained("org/not-a-gene")
    with pytest.raises(Exception, match="save_pretrained needs a new directory"):
        gene.save_pretrained(gene.path / "inside")


def test_sources_from_the_hub_cache_are_recorded_as_hub_ids(family, tmp_path, offline_cache):
    dirs = family("llama")
    snap_a = hub_cache_put(offline_cache, "org/aligned", dirs["aligned"], REV)
    g = safegene.extract("org/aligned", dirs["degraded"], tmp_path / "g", progress=False)
    assert Path(g.manifest["sources"]["aligned"]["path"]).resolve() == snap_a.resolve()
    man = json.loads((g.save_pretrained(tmp_path / "share") / "gene.json").read_text())
    assert man["sources"]["aligned"]["hub"] == {"repo_id": "org/aligned", "revision": REV}
    assert "sha256" not in man["sources"]["aligned"] and len(man["sources"]["degraded"]["sha256"]) == 64
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "share" / "README.md")
    assert card.data.base_model == ["org/aligned"] and card.data.library_name == "safegene"
    assert card.data.safegene["model_type"] == "llama" and "Limitations" in card.text


def test_push_gene_uploads_the_portable_copy(gene, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    url = gene.push_to_hub("me/llama-safety-gene", private=True)
    assert url.startswith("https://huggingface.co/me/llama-safety-gene/commit/")
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "upload_folder"]
    create, upload = hub.calls[0][1], hub.calls[1][1]
    assert create["private"] is True and create["exist_ok"] is True and create["repo_type"] == "model"
    assert upload["delete_patterns"] == ["*.safetensors", "*.json"]
    pushed = hub.repos["me/llama-safety-gene"]["main"]
    local = tree_bytes(gene.save_pretrained(tmp_path / "share"))
    assert sorted(pushed) == sorted(local) and all(pushed[k] == local[k] for k in local if k != "README.md")
    assert b"Gene.from_pretrained(\"me/llama-safety-gene\")" in pushed["README.md"]  # the card names its repo
    assert str(tmp_path).encode() not in pushed["gene.json"] and str(tmp_path).encode() not in pushed["README.md"]

    # the CLI, to a branch: the branch is created first
    rc = cli_main(["push", str(gene.path), "me/llama-safety-gene", "--revision", "v2", "--json"])
    assert rc == 0
    assert [c[0] for c in hub.calls[2:]] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.repos["me/llama-safety-gene"]["v2"] == pushed


def test_push_refuses_a_bad_repo_id(gene, monkeypatch, capsys):
    FakeHub(monkeypatch)
    with pytest.raises(UsageError, match="not a Hub repository id"):
        gene.push_to_hub("no-slash")
    assert cli_main(["push", str(gene.path), "a/b@main"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_push_failure_is_one_line(gene, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from safegene.errors import OutputError

    def denied(self, repo_id, **kw):
        try:  # the HTTP client huggingface_hub uses: httpx2 (hub 2.x) or httpx (1.x)
            import httpx2 as httpx
        except ImportError:
            httpx = pytest.importorskip("httpx")

        resp = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError("401 Client Error: Unauthorized\nmore detail", response=resp)

    monkeypatch.setattr(HfApi, "create_repo", denied)
    with pytest.raises(OutputError, match=r"push to the Hub failed \(401 Client Error: Unauthorized\); .*hf auth login"):
        gene.push_to_hub("me/x")


# ---- coeffs ----------------------------------------------------------------------------------
def test_coeffs_round_trip_and_push(tmp_path, offline_cache, monkeypatch):
    c = Coeffs({"layer.2": 0.75, "layer.3": 1.25}, {"method": "safegene-calibrate", "gene": str(tmp_path / "gene"),
                                                   "target": "task"})
    saved = c.save_pretrained(tmp_path / "share")
    doc = json.loads((saved / "COEFFS.json").read_text())
    assert doc["gene"] == "gene" and doc["coeffs"] == c.coeffs
    hub_cache_put(offline_cache, "org/coeffs", saved, REV)
    got = Coeffs.from_pretrained("org/coeffs")
    assert got.coeffs == c.coeffs and got.meta["gene"] == "gene"
    assert load_coeffs("org/coeffs") == c.coeffs and load_coeffs(saved) == c.coeffs
    assert Coeffs.from_pretrained(saved / "COEFFS.json").coeffs == c.coeffs
    with pytest.raises(UsageError, match="no such coefficients file"):
        load_coeffs(str(tmp_path / "missing" / "COEFFS.json"))

    from huggingface_hub import ModelCard

    card = ModelCard.load(saved / "README.md")
    assert card.data.safegene["coeffs"] == c.coeffs

    hub = FakeHub(monkeypatch)
    c.push_to_hub("me/coeffs")
    assert hub.repos["me/coeffs"]["main"]["COEFFS.json"] == tree_bytes(saved)["COEFFS.json"]
    assert cli_main(["push", str(saved / "COEFFS.json"), "me/coeffs2"]) == 0
    assert hub.repos["me/coeffs2"]["main"]["COEFFS.json"] == (saved / "COEFFS.json").read_bytes()


def test_log_level_shows_what_push_did(gene, monkeypatch, capsys):
    FakeHub(monkeypatch)
    assert cli_main(["--log-level", "info", "push", str(gene.path), "me/g", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "INFO safegene.io.artifacts: pushed " in err and "me/g" in err
    assert cli_main(["push", str(gene.path), "me/g", "--quiet"]) == 0  # default: warnings only
    assert "INFO" not in capsys.readouterr().err


def test_run_config_names_a_hub_gene(gene, tmp_path, offline_cache, capsys):
    """``safegene run`` with ``gene: org/name[@rev]`` and no models to extract from: the shared gene
    is read through the (offline) Hub cache and applied; a missing local path that is no Hub id is
    still a one-line config error naming the key."""
    import yaml

    from safegene import cli
    from safegene.cli.runconfig import load_config
    from safegene.errors import SafeGeneError

    hub_cache_put(offline_cache, "org/llama-safety-gene", gene.save_pretrained(tmp_path / "share"), REV)
    target = gene.manifest["sources"]["aligned"]["path"]
    cfg = {"gene": f"org/llama-safety-gene@{REV}", "apply": {"scale": 0.5},
           "targets": [{"model": target, "output": "out/safe"}]}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    (tmp_path / "out").mkdir()
    assert load_config(p)["gene"] == f"org/llama-safety-gene@{REV}"
    assert cli.main(["run", str(p), "--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [c[0] for c in res["commands"]] == ["apply"] and res["commands"][0][1] == f"org/llama-safety-gene@{REV}"
    local = safegene.apply(gene, target, tmp_path / "local", scale=0.5, progress=False)
    assert (tmp_path / "out" / "safe" / "model.safetensors").read_bytes() == (local.out / "model.safetensors").read_bytes()
    p.write_text(yaml.safe_dump({**cfg, "gene": "./no-such-gene"}))
    with pytest.raises(SafeGeneError, match=r"gene: .*no-such-gene is not a gene directory \(nor a Hub id"):
        load_config(p)
