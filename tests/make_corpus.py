"""Writes tests/corpus/: crafted safetensors files, one per failure mode, and EXPECTED.json.

Run it to regenerate the committed corpus: ``python tests/make_corpus.py``. Each entry maps a
file name to the message fragment its SafeGeneError must contain (``null``: the file is valid).
Files named ``sparse-*`` hold only a header; the test extends them to their declared size
with a sparse ``truncate`` so that element counts past 2^31 and 2^32 cost no disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).parent / "corpus"


def blob(header, data: bytes = b"", raw: bytes | None = None, length: int | None = None) -> bytes:
    hb = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    n = len(hb) if length is None else length
    return struct.pack("<Q", n) + hb + data


def valid() -> bytes:
    hdr = {"__metadata__": {"format": "pt"},
           "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
           "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}
    return blob(hdr, bytes(range(24)))


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for old in HERE.glob("*.safetensors"):
        old.unlink()
    good = valid()
    hlen = struct.unpack("<Q", good[:8])[0]
    cases: dict[str, tuple[bytes, str | None]] = {"valid.safetensors": (good, None)}
    # Truncated at every region: inside the length, right after it, inside the header, at its
    # end, inside the first tensor, between tensors, inside the last one.
    cuts = {"len-0": 0, "len-4": 4, "after-len": 8, "mid-header": 8 + hlen // 2, "end-header": 8 + hlen,
            "mid-a": 8 + hlen + 7, "between": 8 + hlen + 16, "mid-b": 8 + hlen + 20, "last-byte": len(good) - 1}
    for name, cut in cuts.items():
        msg = "too short" if cut < 8 else ("runs past the end" if cut < 8 + hlen else "truncated")
        cases[f"truncated-{name}.safetensors"] = (good[:cut], msg)
    cases["trailing-bytes.safetensors"] = (good + b"\0\0\0\0", "trailing bytes")
    cases["header-len-past-file.safetensors"] = (blob(None, raw=b"{}", length=4096), "runs past the end")
    cases["header-len-over-cap.safetensors"] = (blob(None, raw=b"{}", length=200_000_000), "exceeds the 100000000-byte cap")
    cases["non-utf8.safetensors"] = (blob(None, raw=b'{"\xff\xfe":1}'), "not valid UTF-8")
    cases["not-json.safetensors"] = (blob(None, raw=b"{this is not json"), "not valid JSON")
    for kind, raw in {"list": b"[1,2]", "string": b'"x"', "number": b"42", "null": b"null"}.items():
        cases[f"json-{kind}.safetensors"] = (blob(None, raw=raw), "expected an object")
    t = lambda dt, shape, a, b: {"dtype": dt, "shape": shape, "data_offsets": [a, b]}  # noqa: E731
    cases["overlap.safetensors"] = (blob({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, b"\0" * 12), "overlaps")
    cases["reversed-offsets.safetensors"] = (blob({"a": t("F32", [0], 8, 4)}, b"\0" * 8), "negative or reversed")
    cases["hole.safetensors"] = (blob({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, b"\0" * 12), "hole of 4 bytes")
    cases["beyond-end.safetensors"] = (blob({"a": t("F32", [4], 0, 16)}, b"\0" * 8), "run past the end of the data")
    cases["listed-out-of-order.safetensors"] = (blob({"b": t("F32", [1], 4, 8), "a": t("F32", [1], 0, 4)}, b"\0" * 8), None)
    cases["span-mismatch.safetensors"] = (blob({"a": t("F32", [3], 0, 8)}, b"\0" * 8), "span 8")
    cases["negative-dim.safetensors"] = (blob({"a": t("F32", [-2, -2], 0, 16)}, b"\0" * 16), "negative dimension")
    cases["huge-dims.safetensors"] = (blob({"a": t("F32", [2**40, 2**40, 2**40], 0, 4)}, b"\0" * 4), "span 4")
    cases["float-dim.safetensors"] = (blob({"a": t("F32", [2.0], 0, 8)}, b"\0" * 8), "shape must be a list of integers")
    cases["bool-dim.safetensors"] = (blob({"a": t("F32", [True], 0, 4)}, b"\0" * 4), "shape must be a list of integers")
    cases["shape-not-list.safetensors"] = (blob({"a": t("F32", "4", 0, 16)}, b"\0" * 16), "shape must be a list of integers")
    cases["offsets-three.safetensors"] = (blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8), "data_offsets must be two integers")
    cases["unknown-dtype.safetensors"] = (blob({"a": t("F33", [1], 0, 4)}, b"\0" * 4), "unknown dtype 'F33'")
    cases["dtype-not-string.safetensors"] = (blob({"a": t(7, [1], 0, 4)}, b"\0" * 4), "unknown dtype 7")
    cases["entry-not-object.safetensors"] = (blob({"a": [1, 2, 3]}), "entry must be an object")
    cases["duplicate-names.safetensors"] = (
        blob(None, b"\0" * 8, raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'),
        "duplicate tensor name 'a'")
    cases["metadata-non-string.safetensors"] = (blob({"__metadata__": {"format": 1}}), "__metadata__ must map strings to strings")
    cases["metadata-not-object.safetensors"] = (blob({"__metadata__": ["pt"]}), "__metadata__ must map strings to strings")
    cases["deep-nesting.safetensors"] = (blob(None, raw=b"[" * 100000 + b"]" * 100000), "not valid JSON|expected an object")
    # Header-only files that the test extends sparsely to their declared size.
    n31, n32 = 2**31 + 3, 2**32 + 5
    cases["sparse-u8-past-2p31.safetensors"] = (blob({"a": t("U8", [n31], 0, n31)}), None)
    cases["sparse-u8-past-2p32.safetensors"] = (blob({"a": t("U8", [n32], 0, n32)}), None)
    cases["sparse-bf16-past-2p32.safetensors"] = (blob({"a": t("BF16", [n32], 0, 2 * n32)}), None)
    cases["sparse-bf16-wrapped-count.safetensors"] = (blob({"a": t("BF16", [2**63 + 1], 0, 2)}), "span 2")
    expected = {}
    for name, (data, msg) in sorted(cases.items()):
        (HERE / name).write_bytes(data)
        expected[name] = msg
    (HERE / "EXPECTED.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {len(cases)} files to {HERE}")


if __name__ == "__main__":
    main()
