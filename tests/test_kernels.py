"""The batched kernels against float64 references, and the scalar conversions bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import safegene
from safegene.engine import native as _native
from safegene.engine.native import core

TD = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-dtype tensors (sign-magnitude aware)."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    def ordered(x):
        i = x.contiguous().view(bits).to(torch.int64)
        sign_bit = 1 << (torch.finfo(x.dtype).bits - 1)
        return torch.where(i < 0, -(i + sign_bit), i)  # negative floats: flip to a monotone integer line
    return (ordered(a) - ordered(b)).abs()


# ---- scalar conversions -------------------------------------------------------------------------
def test_f16_to_f32_all_bit_patterns_match_numpy():
    bits = np.arange(65536, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.array([core().f16_to_f32(int(b)) for b in bits], dtype=np.float32)
    finite = np.isfinite(ref)
    assert np.array_equal(got[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(np.isinf(got) & (got > 0), np.isinf(ref) & (ref > 0))


def _special_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    vals = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 1e-8, -3e-8, 2**-24, 2**-25, 3 * 2**-26, 2**-14,
            6.1e-5, 3.3895314e38, 3.39e38, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11]
    rand = np.concatenate([rng.standard_normal(20000), rng.standard_normal(5000) * 1e-5, rng.standard_normal(5000) * 1e4])
    return np.concatenate([np.array(vals), rand]).astype(np.float32)


def test_f32_to_f16_is_round_to_nearest_even_like_numpy():
    x = _special_floats()
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    got = np.array([core().f32_to_f16(float(v)) for v in x], dtype=np.uint16)
    assert np.array_equal(got, ref)


def test_f32_to_bf16_is_round_to_nearest_even_like_torch():
    x = _special_floats()
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = np.array([core().f32_to_bf16(float(v)) for v in x], dtype=np.uint16)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("payload", [0x7F800001, 0x7FFFFFFF, 0xFF800001, 0x7FC00000])
def test_nan_stays_nan_never_inf(payload):
    f = np.array([payload], dtype=np.uint32).view(np.float32)[0]
    bf = core().f32_to_bf16(float(f))
    hf = core().f32_to_f16(float(f))
    assert (bf & 0x7F80) == 0x7F80 and (bf & 0x007F) != 0, hex(bf)
    assert (hf & 0x7C00) == 0x7C00 and (hf & 0x03FF) != 0, hex(hf)


# ---- scale_add ----------------------------------------------------------------------------------
SIZES = [0, 1, 7, 1023, 1024, 1025, 65537, 300001]


@pytest.mark.parametrize("dst_dt", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("src_dt", ["F32", "BF16"])
def test_scale_add_against_float64_reference(dst_dt, src_dt):
    g = torch.Generator().manual_seed(1)
    dsts = [torch.randn(n, generator=g).to(TD[dst_dt]) for n in SIZES]
    srcs = [(0.01 * torch.randn(n, generator=g)).to(TD[src_dt]) for n in SIZES]
    # The kernels take float32 coefficients; the reference uses the same (rounded) values.
    coeffs = [float(np.float32(c)) for c in (0.5, -1.25, 3.0, 0.0, 1.0, 0.37, -0.8, 2.5)]
    ref64 = [d.double() + c * s.double() for d, s, c in zip(dsts, srcs, coeffs)]
    prod = [(c * s.double()).abs() for s, c in zip(srcs, coeffs)]
    naive = [d.float() + torch.tensor(c, dtype=torch.float32) * s.float() for d, s, c in zip(dsts, srcs, coeffs)]
    _native.scale_add_(dsts, srcs, coeffs)
    for got, r64, nv, p in zip(dsts, ref64, naive, prod):
        # Same float32 operations and one rounding into the destination: identical to the
        # naive float32 computation...
        assert torch.equal(got, nv.to(got.dtype))
        if not got.numel():
            continue
        if got.dtype == torch.float32:
            # ...whose two float32 roundings (product, sum) bound the error by eps/2 (|r| + |c s|).
            assert bool(((got.double() - r64).abs() <= 2**-24 * (r64.abs() + p) * 1.001).all())
        else:
            # ...and a 16-bit result is within one ulp of the correctly rounded float64 result.
            assert int(ulp_distance(got, r64.to(got.dtype)).max()) <= 1


def test_scale_add_unaligned_views_and_nan():
    base = torch.randn(10001, dtype=torch.bfloat16)
    first = base[0].clone()
    src = torch.randn(10003, dtype=torch.float32)
    dst = base[1:]  # data_ptr 2 bytes past the allocation: unaligned for 4-byte loads
    s = src[3:]
    s[5] = float("nan")
    before = dst.clone()
    _native.scale_add_([dst], [s], [2.0])
    ref = (before.double() + 2.0 * s.double()).to(torch.bfloat16)
    assert torch.isnan(dst[5]) and not torch.isinf(dst[5])
    mask = ~torch.isnan(ref)
    assert int(ulp_distance(dst[mask], ref[mask]).max()) <= 1
    assert torch.equal(base[0], first)  # the element before the view is untouched


def test_scale_add_many_tensors_one_call_thread_independent():
    g = torch.Generator().manual_seed(2)
    dsts = [torch.randn(int(n), generator=g) for n in torch.randint(1, 5000, (500,), generator=g)]
    srcs = [torch.randn(d.numel(), generator=g) for d in dsts]
    coeffs = torch.rand(500, generator=g).tolist()
    a = [d.clone() for d in dsts]
    b = [d.clone() for d in dsts]
    old = core().num_threads()
    try:
        core().set_num_threads(1)
        _native.scale_add_(a, srcs, coeffs)
        core().set_num_threads(4)
        _native.scale_add_(b, srcs, coeffs)
    finally:
        core().set_num_threads(old)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_scale_add_rejects_bad_lists():
    with pytest.raises(safegene.SafeGeneError, match="3 elements against 4"):
        _native.scale_add_([torch.zeros(3)], [torch.zeros(4)], [1.0])
    with pytest.raises(safegene.SafeGeneError, match="2 coefficients for 1 tensors"):
        _native.scale_add_([torch.zeros(3)], [torch.zeros(3)], [1.0, 2.0])
    with pytest.raises(safegene.SafeGeneError, match="not contiguous"):
        _native.scale_add_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [1.0])
    with pytest.raises(safegene.SafeGeneError, match="unsupported tensor dtype"):
        _native.scale_add_([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)], [1.0])


# ---- dot ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", ["F32", "F16", "BF16"])
def test_dot_against_float64(dt):
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(n, generator=g).to(TD[dt]) for n in SIZES]
    b = [torch.randn(n, generator=g).to(TD[dt]) for n in SIZES]
    got = _native.dot(a, b)
    for x, y, v in zip(a, b, got):
        ref = float((x.double() * y.double()).sum())
        # float32 partial sums over blocks of 1024: error ~ sqrt(block) * eps32 * sum|x y|.
        bound = 64 * 2**-24 * float((x.double() * y.double()).abs().sum()) + 1e-30
        assert abs(v - ref) <= bound, (x.numel(), v, ref)
    assert got[0] == 0.0


def test_dot_matches_torch_mixed_dtypes():
    a = torch.randn(5000, dtype=torch.bfloat16)
    b = torch.randn(5000, dtype=torch.float32)
    (v,) = _native.dot([a], [b])
    assert v == pytest.approx(float(a.double() @ b.double()), rel=1e-5, abs=1e-4)


def dot_in_documented_order(a: np.ndarray, b: np.ndarray) -> float:
    """<a, b> in the summation order kernels.h documents for dot_cpu and dot_cuda, in numpy."""
    item, block, lanes = 65536, 1024, 16
    a, b = a.astype(np.float32), b.astype(np.float32)
    total = 0.0
    for s in range(0, a.size, item):
        x, y = a[s:s + item], b[s:s + item]
        nb = -(-x.size // block)
        pad = np.zeros(nb * block - x.size, np.float32)  # adding +0.0 to a lane changes nothing
        x = np.concatenate([x, pad]).reshape(nb, block // lanes, lanes)
        y = np.concatenate([y, pad]).reshape(nb, block // lanes, lanes)
        lane = np.zeros((nb, lanes), np.float32)
        for k in range(block // lanes):  # lane l of a block: elements l, l + 16, ... in order
            lane = lane + x[:, k, :] * y[:, k, :]
        t = lane[:, :8] + lane[:, 8:]
        for w in (4, 2, 1):
            t = t[:, :w] + t[:, w:2 * w]
        item_sum = 0.0
        for p in t[:, 0]:
            item_sum += float(p)
        total += item_sum
    return total


@pytest.mark.parametrize("dt", ["F32", "F16", "BF16"])
def test_dot_follows_the_documented_summation_order_bit_for_bit(dt):
    """The order CUDA reproduces (kernels.h) is the order the CPU uses, to the last bit."""
    g = torch.Generator().manual_seed(4)
    for n in [1, 3, 17, 1023, 1025, 4097, 65535, 65537, 200001]:
        a = torch.randn(n + 1, generator=g).to(TD[dt])[1:]
        b = (1e-3 * torch.randn(n + 2, generator=g)).to(TD[dt])[2:]
        (got,) = _native.dot([a], [b])
        assert got == dot_in_documented_order(a.float().numpy(), b.float().numpy()), n


# ---- the typed boundary ---------------------------------------------------------------------------------
def test_dtype_enum_is_the_one_definition_of_the_codes():
    from safegene.engine.native import dtype_of
    from safegene.io.checkpoint import KERNEL_DTYPES

    D = core().DType
    # Golden: the codes cross the boundary and are never renumbered.
    assert {n: int(d) for n, d in D.__members__.items()} == {"F32": 0, "F16": 1, "BF16": 2, "RAW": 3}
    assert [d.itemsize for d in (D.F32, D.F16, D.BF16, D.RAW)] == [4, 2, 2, 1]
    assert {n for n, d in D.__members__.items() if d.is_float} == set(KERNEL_DTYPES)
    assert dtype_of("BF16") == D.BF16 and dtype_of("F32") == D.F32
    assert dtype_of("I64") == D.RAW and dtype_of("F64") == D.RAW
    assert D.F32 != 0  # an enum, not an int: plain codes do not pass for dtypes


@pytest.mark.parametrize("bad", ["RAW", 7])
def test_kernels_refuse_non_float_dtypes_with_the_core_error(bad):
    c = core()
    d, msg = (c.DType.RAW, "RAW is not a float dtype") if bad == "RAW" else (c.DType(bad), "unknown dtype code 7")
    x, y = torch.ones(4), torch.full((4,), 2.0)
    full = f"tensor 0: {msg}; the kernels take F32, F16 and BF16"
    with pytest.raises(c.CoreError, match=f"dot: {full}"):
        c.dot([x.data_ptr()], [c.DType.F32], [y.data_ptr()], [d], [4])
    with pytest.raises(c.CoreError, match=f"scale_add: {full}"):
        c.scale_add([x.data_ptr()], [d], [y.data_ptr()], [c.DType.F32], [4], [1.0])
    assert torch.equal(x, torch.ones(4))  # refused before any memory was touched
    with pytest.raises(TypeError):
        c.dot([x.data_ptr()], [0], [y.data_ptr()], [0], [4])  # a plain int is not a DType


def test_stream_jobs_and_stats_are_typed(tmp_path):
    import os

    c = core()
    a = np.array([1.0, 2.0, 3.0, 3.0 + 2**-9], np.float32)
    b = np.full(4, 0.5, np.float32)
    src = tmp_path / "in.bin"
    src.write_bytes(a.tobytes() + b.tobytes())
    out = tmp_path / "out.bin"
    out.write_bytes(b"\0" * 8)
    job = c.Job(0, 0, c.DType.BF16, 4, [c.Term(0, 0, c.DType.F32), c.Term(0, 16, c.DType.F32, -2.0)])
    assert (job.out_file, job.out_offset, job.out_dtype, job.numel) == (0, 0, c.DType.BF16, 4)
    assert [(t.file, t.offset, t.dtype, t.coeff) for t in job.terms] == [(0, 0, c.DType.F32, 1.0), (0, 16, c.DType.F32, -2.0)]
    assert repr(job.terms[1]) == "Term(file=0, offset=16, dtype=DType.F32, coeff=-2.0)"
    with pytest.raises(c.CoreError, match="Job: unknown dtype code 9; use safegene._core.DType"):
        c.Job(0, 0, c.DType(9), 4, [])
    with pytest.raises(c.CoreError, match="Term: unknown dtype code -1"):
        c.Term(0, 0, c.DType(-1))

    st = os.stat(src)
    r = c.run_stream([str(src)], [st.st_size], [st.st_mtime_ns], [str(out)], [job], 1 << 20)
    (s,) = r["stats"]
    assert isinstance(s, c.Stats)
    tau = a.astype(np.float64) - 2.0 * b  # [0, 1, 2, 2 + 2^-9]; the last rounds to 2 in bf16
    assert torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.bfloat16).tolist() == [0.0, 1.0, 2.0, 2.0]
    assert s.out_sq == pytest.approx(float(tau @ tau), rel=1e-7)
    assert s.in0_sq == pytest.approx(float(a.astype(np.float64) @ a), rel=1e-7)
    assert s.in1_sq == pytest.approx(1.0, rel=1e-7)
    assert s.in01_dot == pytest.approx(float(a.astype(np.float64) @ b), rel=1e-7)
    assert s.round_sq == pytest.approx(2.0**-18, rel=1e-7)
    assert (s.nonfinite_out, s.nonfinite_in) == (0, 0)
    assert "nonfinite_out=0" in repr(s)
    with pytest.raises(AttributeError):
        s.out_sq = 0.0  # type: ignore[misc]


def test_cuda_flags_and_what_a_build_without_cuda_does():
    c = core()
    assert safegene.has_cuda() == (c.cuda_built() and c.has_cuda())
    if not torch.cuda.is_available():
        assert safegene.has_cuda() is False
    F = c.DType.F32
    if c.cuda_built():
        # The CUDA entry points validate like the CPU ones before any CUDA call.
        with pytest.raises(c.CoreError, match="dot: tensor 0: null pointer"):
            c.dot([0], [F], [0], [F], [5], True, 0)
    else:
        assert c.has_cuda() is False
        with pytest.raises(c.CoreError, match="built without CUDA; rebuild with SAFEGENE_CUDA=ON"):
            c.dot([0], [F], [0], [F], [5], True, 0)
        with pytest.raises(c.CoreError, match="built without CUDA"):
            c.scale_add([0], [F], [0], [F], [5], [1.0], True, 0)
