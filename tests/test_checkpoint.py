"""Safetensors header and index validation: every malformed case gets its named error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safegene import CheckpointError, HeaderError, PickleRefusedError, layer_key, open_checkpoint, read_header
from safegene.io.checkpoint import join_by_name, plan_file
from safegene.errors import MismatchError


def raw_file(path: Path, header: object, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def good_header():
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}


def test_reads_a_real_file_byte_ranges(tmp_path):
    t = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3), "y": torch.ones(4, dtype=torch.bfloat16)}
    p = tmp_path / "m.safetensors"
    save_file(t, str(p), metadata={"format": "pt"})
    f = read_header(p)
    assert f.metadata == {"format": "pt"}
    x = f.tensors["x"]
    raw = p.read_bytes()[x.offset : x.offset + x.nbytes]
    assert raw == t["x"].numpy().tobytes()
    assert x.shape == (2, 3) and x.dtype == "F32" and x.numel == 6


@pytest.mark.parametrize(
    "header, data, match",
    [
        ([1, 2], b"", "header is a JSON list, expected an object"),
        ({"a": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype 'Q8'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "negative dimension"),
        ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "shape must be a list of integers"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"is 12 bytes but data_offsets \[0, 8\] span 8"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "run past the end of the data"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "hole of 4 bytes before tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "negative or reversed"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4, "span 4"),
    ],
)
def test_malformed_headers(tmp_path, header, data, match):
    p = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError, match=match):
        read_header(p)


def test_duplicate_names(tmp_path):
    hb = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    p = raw_file(tmp_path / "dup.safetensors", None, b"\0" * 8, header_bytes=hb)
    with pytest.raises(HeaderError, match="duplicate tensor name 'a'"):
        read_header(p)


def test_header_length_checks(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\1\2\3")
    with pytest.raises(HeaderError, match="too short"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(HeaderError, match="exceeds the 100000000-byte cap"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(HeaderError, match="runs past the end"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(HeaderError, match="not valid UTF-8"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 2) + b"{x")
    with pytest.raises(HeaderError, match="not valid JSON"):
        read_header(p)


def test_pickles_are_refused_never_loaded(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    with pytest.raises(PickleRefusedError, match="pickled checkpoints are refused.*save_pretrained"):
        open_checkpoint(d)
    with pytest.raises(PickleRefusedError):
        open_checkpoint(d / "pytorch_model.bin")


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")


def _sharded(tmp_path: Path, weight_map: dict, files: dict[str, dict]) -> Path:
    d = tmp_path / "sharded"
    d.mkdir(exist_ok=True)
    for name, tensors in files.items():
        save_file(tensors, str(d / name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_entries_outside_the_directory_are_refused(tmp_path, entry):
    d = _sharded(tmp_path, {"a": entry}, {})
    with pytest.raises(HeaderError, match="must be a plain file name inside the model directory"):
        open_checkpoint(d)


def test_index_symlink_escape_is_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    d = _sharded(tmp_path, {"a": "link.safetensors"}, {})
    (d / "link.safetensors").symlink_to(outside)
    with pytest.raises(HeaderError, match="outside"):
        open_checkpoint(d)


def test_index_consistency(tmp_path):
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}, {"s1.safetensors": {"a": torch.zeros(2)}})
    with pytest.raises(HeaderError, match="in no shard"):
        open_checkpoint(d)
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"}, {"s1.safetensors": {"a": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="download is incomplete"):
        open_checkpoint(d)


def test_join_by_name_reports_differences(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(2), "c": torch.zeros(3)}, str(tmp_path / "y.safetensors"))
    save_file({"a": torch.zeros(4), "b": torch.zeros(3)}, str(tmp_path / "z.safetensors"))
    x, y, z = (open_checkpoint(tmp_path / f"{n}.safetensors") for n in "xyz")
    with pytest.raises(MismatchError, match="1 only in the first.*'b'.*1 only in the second.*'c'"):
        join_by_name(x, y)
    with pytest.raises(MismatchError, match=r"tensor 'a' has shape \[2\]"):
        join_by_name(x, z)


def test_planned_header_matches_safetensors_bytes(tmp_path):
    from safegene.io.checkpoint import OutTensor, create_files

    t = {"w": torch.arange(5, dtype=torch.float32), "v": torch.ones(3, dtype=torch.bfloat16)}
    ref = tmp_path / "ref.safetensors"
    save_file(t, str(ref), metadata={"format": "pt"})
    f = read_header(ref)
    outs = [OutTensor(n, i.dtype, i.shape, i.nbytes) for n, i in sorted(f.tensors.items(), key=lambda kv: kv[1].offset)]
    of = plan_file(tmp_path / "mine.safetensors", outs)
    create_files([of])
    with open(of.path, "r+b") as fh:
        for o in outs:
            fh.seek(o.offset)
            fh.write(ref.read_bytes()[f.tensors[o.name].offset : f.tensors[o.name].offset + o.nbytes])
    from safetensors.torch import load_file

    back = load_file(str(of.path))
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert read_header(of.path).metadata == {"format": "pt"}
    assert (of.size - 8 - read_header(of.path).header_len) == 26
    assert read_header(of.path).header_len % 8 == 0


@pytest.mark.parametrize(
    "name, key",
    [
        ("model.layers.0.self_attn.q_proj.weight", "layer.0"),
        ("transformer.h.11.attn.c_attn.weight", "layer.11"),
        ("model.embed_tokens.weight", "embed"),
        ("transformer.wte.weight", "embed"),
        ("transformer.wpe.weight", "embed"),
        ("model.norm.weight", "final_norm"),
        ("transformer.ln_f.bias", "final_norm"),
        ("lm_head.weight", "lm_head"),
        ("score.weight", "other"),
    ],
)
def test_layer_keys(name, key):
    assert layer_key(name) == key
