"""Safetensors checkpoints: header parsing and validation, sharded indexes, name joins, writers.

Nothing here loads tensor data: a :class:`Checkpoint` is a validated map from tensor name to
the byte range that holds it, which the streaming core then reads in bounded chunks.

Validation follows the safetensors format strictly and names each failure: header length
beyond the cap or the file, non-UTF-8 or non-object JSON, duplicate names, unknown dtypes,
negative or non-integer dimensions, ``shape x dtype`` that disagrees with the byte span,
offsets that overlap, leave holes, or run past the end of the file.

>>> ckpt = open_checkpoint("path/to/model")  # doctest: +SKIP
>>> ckpt.tensors["model.embed_tokens.weight"].shape  # doctest: +SKIP
(32000, 4096)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from ..errors import CheckpointError, HeaderError, MismatchError, OutputError, PickleRefusedError

#: Header size cap, as in the safetensors reference implementation.
MAX_HEADER_BYTES = 100_000_000
#: The safetensors names of the dtypes the kernels compute on: the float members of the core's
#: enum ``safegene._core.DType`` (a test holds the two equal). Only names live here; the codes
#: are the enum's, turned from names by ``safegene.engine``.
KERNEL_DTYPES = frozenset({"F32", "F16", "BF16"})
#: Every dtype the safetensors format defines, with its size in bits.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class TensorInfo(NamedTuple):
    """Where one tensor lives: ``nbytes`` bytes at absolute ``offset`` of ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        """True when the kernels can do arithmetic on it (F32, F16, BF16)."""
        return self.dtype in KERNEL_DTYPES


@dataclass
class SafetensorsFile:
    """A parsed and validated safetensors file (header only)."""

    path: Path
    header_len: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    size: int
    mtime_ns: int
    header_sha256: str


@dataclass
class Checkpoint:
    """A model as a set of safetensors files: one file, or shards joined by an index."""

    root: Path
    files: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None = None
    index_path: Path | None = None
    extra_files: list[Path] = field(default_factory=list)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def is_dir(self) -> bool:
        return self.root.is_dir()

    def provenance(self) -> dict[str, Any]:
        """Paths, header hashes and config: what a gene records about each source."""
        return {
            "path": str(self.root.resolve()),
            "files": [{"name": f.path.name, "size": f.size, "header_sha256": f.header_sha256} for f in self.files],
            "config": self.config,
        }


def layer_key(name: str) -> str:
    """The coefficient key of a tensor: ``layer.<i>`` for decoder block ``i``, else one of
    ``embed``, ``lm_head``, ``final_norm``, ``other``.

    >>> layer_key("model.layers.11.mlp.down_proj.weight")
    'layer.11'
    >>> layer_key("model.embed_tokens.weight"), layer_key("lm_head.weight"), layer_key("model.norm.weight")
    ('embed', 'lm_head', 'final_norm')
    """
    m = _LAYER_RE.search(name)
    if m:
        return f"layer.{int(m.group(1))}"
    low = name.lower()
    if "lm_head" in low:
        return "lm_head"
    if "embed" in low or re.search(r"(?:^|\.)(wte|wpe)\.", low):
        return "embed"
    if "norm" in low or re.search(r"(?:^|\.)ln_f\.", low):
        return "final_norm"
    return "other"


class _Obj(list):
    """A JSON object as its list of (key, value) pairs: keeps duplicates visible and, being a
    C-level list subclass, parses 10^5-tensor headers without a Python call per object."""

    __slots__ = ()


def _as_dict(pairs: _Obj, where: str) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise HeaderError(f"{where}: duplicate key {dup!r}; the file is corrupt")
    return d


def read_header(path: str | os.PathLike[str], max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsFile:
    """Parse and validate one safetensors file's header.

    >>> f = read_header("model.safetensors")  # doctest: +SKIP
    >>> sorted(f.tensors)[:2]  # doctest: +SKIP
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(p)
    try:
        st = p.stat()
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise HeaderError(f"{p}: file is {len(head)} bytes, too short for a safetensors header length; the file is truncated or not safetensors")
            (n,) = struct.unpack("<Q", head)
            if n > max_header_bytes:
                raise HeaderError(f"{p}: header length {n} exceeds the {max_header_bytes}-byte cap; the file is corrupt or not safetensors")
            if 8 + n > st.st_size:
                raise HeaderError(f"{p}: header length {n} runs past the end of the {st.st_size}-byte file; the file is truncated")
            raw = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{p}: is a directory, expected a .safetensors file") from None
    except PermissionError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror}); check the file permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"{p}: header is not valid UTF-8 (byte {exc.start}); the file is corrupt or not safetensors") from None
    try:
        parsed = json.loads(text, object_pairs_hook=_Obj)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise HeaderError(f"{p}: header is not valid JSON ({exc}); the file is corrupt or not safetensors") from None
    if not isinstance(parsed, _Obj):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(parsed), "null")
        raise HeaderError(f"{p}: header is a JSON {kind}, expected an object")
    names = [k for k, _ in parsed]
    obj = dict(parsed)
    if len(obj) != len(parsed):
        seen: set[str] = set()
        dup = next(k for k in names if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise HeaderError(f"{p}: duplicate tensor name {dup!r} in the header; the file is corrupt")
    metadata = obj.pop("__metadata__", None) or _Obj()
    if not isinstance(metadata, _Obj) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata):
        raise HeaderError(f"{p}: __metadata__ must map strings to strings")
    metadata = dict(metadata)
    data_start = 8 + n
    data_len = st.st_size - data_start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, ent in obj.items():
        if not isinstance(ent, _Obj):
            raise HeaderError(f"{p}: tensor {name!r}: entry must be an object")
        ent = _as_dict(ent, f"{p}: tensor {name!r}")
        dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        where = f"{p}: tensor {name!r}"
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise HeaderError(f"{where}: unknown dtype {dtype!r}; safetensors defines {', '.join(sorted(SAFETENSORS_DTYPE_BITS))}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise HeaderError(f"{where}: shape must be a list of integers, got {shape!r}")
        if any(d < 0 for d in shape):
            raise HeaderError(f"{where}: negative dimension in shape {shape}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise HeaderError(f"{where}: data_offsets must be two integers, got {offs!r}")
        begin, end = offs
        if begin < 0 or end < begin:
            raise HeaderError(f"{where}: data_offsets {offs} are negative or reversed")
        if end > data_len:
            raise HeaderError(f"{where}: data_offsets {offs} run past the end of the data ({data_len} bytes); the file is truncated")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * SAFETENSORS_DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise HeaderError(
                f"{where}: shape {shape} x {dtype} is {bits / 8:g} bytes but data_offsets {offs} span {end - begin}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), p, data_start + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise HeaderError(f"{p}: tensor {name!r} overlaps the tensor before it (data_offsets start {begin} < {pos})")
        if begin > pos:
            raise HeaderError(f"{p}: hole of {begin - pos} bytes before tensor {name!r}; data must be contiguous")
        pos = end
    if pos != data_len:
        raise HeaderError(
            f"{p}: tensor data covers {pos} bytes but the file holds {data_len} after the header; the file is truncated or has trailing bytes"
        )
    return SafetensorsFile(
        path=p,
        header_len=n,
        metadata=metadata,
        tensors=tensors,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        header_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _pickle_error(p: Path) -> PickleRefusedError:
    return PickleRefusedError(
        f"{p}: pickled checkpoints are refused (loading them can run arbitrary code); convert once with "
        "`transformers.AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)` "
        "in an environment you trust, then use NEW_DIR"
    )


def _contained(root: Path, name: str, index: Path) -> Path:
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise HeaderError(f"{index}: weight_map entry {name!r} must be a plain file name inside the model directory")
    target = (root / name).resolve()
    if target.parent != root.resolve() and root.resolve() not in target.parents:
        raise HeaderError(f"{index}: weight_map entry {name!r} resolves to {target}, outside {root}")
    return root / name


def read_json(path: Path, what: str = "", error: type[Exception] = CheckpointError, hint: str = "") -> Any:
    """Parse a JSON file; malformed content raises ``error`` naming the file (and ``what`` it is)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        subject = f"{what} is not" if what else "not"
        raise error(f"{path}: {subject} valid JSON ({exc})" + (f"; {hint}" if hint else "")) from None


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Hugging Face model directory or a lone ``.safetensors`` file (headers only).

    >>> ckpt = open_checkpoint("models/llama-tiny")  # doctest: +SKIP
    >>> len(ckpt.tensors), ckpt.model_type  # doctest: +SKIP
    (39, 'llama')
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_file():
        if root.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_error(root)
        if root.suffix != ".safetensors":
            raise CheckpointError(f"{root}: not a .safetensors file or a model directory")
        f = read_header(root)
        cfg_path = root.parent / "config.json"
        return Checkpoint(root, [f], dict(f.tensors), read_json(cfg_path, "config") if cfg_path.is_file() else None)
    config = read_json(root / "config.json", "config") if (root / "config.json").is_file() else None
    index_path = root / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path, "shard index")
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise HeaderError(f"{index_path}: missing or empty weight_map")
        shard_names = list(dict.fromkeys(wm.values()))
        files: list[SafetensorsFile] = []
        tensors: dict[str, TensorInfo] = {}
        for sn in shard_names:
            sp = _contained(root, sn, index_path)
            if sp.suffix.lower() in PICKLE_SUFFIXES:
                raise _pickle_error(sp)
            if not sp.is_file():
                raise CheckpointError(f"{index_path}: shard {sn!r} is listed but {sp} does not exist; the download is incomplete")
            f = read_header(sp)
            files.append(f)
            for name, info in f.tensors.items():
                if name in tensors:
                    raise HeaderError(f"{sp}: tensor {name!r} also appears in {tensors[name].file.name}")
                if wm.get(name) != sn:
                    raise HeaderError(f"{index_path}: tensor {name!r} is in {sn} but the weight_map says {wm.get(name)!r}")
                tensors[name] = info
        missing = [n for n in wm if n not in tensors]
        if missing:
            raise HeaderError(f"{index_path}: {len(missing)} tensors in the weight_map are in no shard, e.g. {missing[0]!r}")
        return Checkpoint(root, files, tensors, config, index_path)
    single = root / SINGLE_NAME
    candidates = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
    if len(candidates) == 1:
        f = read_header(candidates[0])
        return Checkpoint(root, [f], dict(f.tensors), config)
    pickles = sorted(q for q in root.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
    if not candidates and pickles:
        raise _pickle_error(pickles[0])
    if not candidates:
        raise CheckpointError(f"{root}: no model.safetensors or {INDEX_NAME} in this directory")
    raise CheckpointError(f"{root}: several .safetensors files but no {INDEX_NAME}; point at one file or add the index")


def join_by_name(a: Checkpoint, b: Checkpoint, what: tuple[str, str] = ("first", "second")) -> list[tuple[TensorInfo, TensorInfo]]:
    """Pair tensors of two checkpoints by name (shard layouts may differ); names and shapes must match."""
    only_a = [n for n in a.tensors if n not in b.tensors]
    only_b = [n for n in b.tensors if n not in a.tensors]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in the {what[0]} ({a.root}), e.g. {only_a[0]!r}")
        if only_b:
            parts.append(f"{len(only_b)} only in the {what[1]} ({b.root}), e.g. {only_b[0]!r}")
        raise MismatchError("the checkpoints hold different tensors: " + "; ".join(parts) + "; they must be the same architecture")
    pairs = []
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        if ta.shape != tb.shape:
            raise MismatchError(
                f"tensor {name!r} has shape {list(ta.shape)} in {a.root} but {list(tb.shape)} in {b.root}; the checkpoints are different architectures"
            )
        pairs.append((ta, tb))
    return pairs


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute offset in its file, filled by plan_file


@dataclass
class OutFile:
    path: Path
    tensors: list[OutTensor]
    header: bytes = b""
    size: int = 0


def plan_file(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> OutFile:
    """Lay out one safetensors file: header (padded to 8 bytes, as safetensors writes it), then data."""
    hdr: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for t in tensors:
        hdr[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    off = start
    for t in tensors:
        t.offset = off
        off += t.nbytes
    return OutFile(path, tensors, struct.pack("<Q", len(raw)) + raw, off)


def create_files(files: Iterable[OutFile]) -> None:
    """Create each file at its final size with its header written; the core fills the data."""
    for f in files:
        with open(f.path, "wb") as fh:
            fh.write(f.header)
            fh.truncate(f.size)


def shard_names(n: int) -> list[str]:
    """Hugging Face shard file names for ``n`` shards."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(out_dir: Path, files: Sequence[OutFile]) -> None:
    total = sum(t.nbytes for f in files for t in f.tensors)
    wm = {t.name: f.path.name for f in files for t in f.tensors}
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2) + "\n")


#: Files copied from a model directory into an output directory (config, tokenizer, ...).
def companion_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    out = []
    for q in sorted(root.iterdir()):
        if not q.is_file() or q.suffix == ".safetensors" or q.name == INDEX_NAME or q.suffix.lower() in PICKLE_SUFFIXES:
            continue
        out.append(q)
    return out


def copy_companions(src_root: Path, out_dir: Path) -> None:
    for q in companion_files(src_root):
        shutil.copy2(q, out_dir / q.name)


def check_output_location(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is an input, lies inside one, or contains one."""
    o = out.resolve()
    for i in inputs:
        r = i.resolve()
        inside = r.is_dir() and r in o.parents
        if o == r or inside or o in r.parents:
            raise OutputError(f"output {out} would overwrite, contain or land inside the input {i}; choose a separate directory")
