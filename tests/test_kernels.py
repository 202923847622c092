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


def test_import_without_gpu_reports_flags():
    assert isinstance(core().cuda_built(), bool)
    if not torch.cuda.is_available():
        assert safegene.has_cuda() is False
