"""CUDA kernels against the CPU kernels and a float64 reference (skipped without a device).

Gated on a real device answering, not on the CUDA module having been built: CI compiles the
kernels but has no GPU.
"""

from __future__ import annotations

import pytest
import torch

from safegene.engine import native as _native

from conftest import has_cuda_device

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not has_cuda_device(), reason="needs a CUDA device and a CUDA build")]

TD = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SIZES = [1, 3, 1023, 4097, 65535, 65537, 1 << 20, 3_000_001]


def _pairs(dst_dt, src_dt, seed, aligned, sizes=SIZES):
    """Matching (cpu, cuda) views of the same values. Unaligned views are sliced ON the device
    (one and three elements into a device allocation): ``view.cuda()`` would make a fresh,
    aligned copy and the kernels' unaligned path would never run."""
    g = torch.Generator().manual_seed(seed)
    off_d, off_s = (0, 0) if aligned else (1, 3)
    dst = [torch.randn(n + off_d, generator=g).to(TD[dst_dt]) for n in sizes]
    src = [(0.01 * torch.randn(n + off_s, generator=g)).to(TD[src_dt]) for n in sizes]
    cpu = ([d[off_d:] for d in dst], [s[off_s:] for s in src])
    gpu = ([d.cuda()[off_d:] for d in dst], [s.cuda()[off_s:] for s in src])
    for views in gpu:
        for v in views:
            assert (v.data_ptr() % 16 == 0) == aligned or v.numel() == 0
    return cpu, gpu


ALIGN = pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])


@ALIGN
@pytest.mark.parametrize("dst_dt", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("src_dt", ["F32", "BF16"])
def test_scale_add_cuda_matches_cpu_bit_for_bit(dst_dt, src_dt, aligned):
    (dst, src), (gdst, gsrc) = _pairs(dst_dt, src_dt, 0, aligned)
    coeffs = [0.5, -1.25, 3.0, 1.0, 0.375, -0.8125, 2.5, 1.5]
    ref = [d.double() + c * s.double() for d, s, c in zip(dst, src, coeffs)]
    cpu = [d.clone() for d in dst]
    _native.scale_add_(cpu, src, coeffs)
    _native.scale_add_(gdst, gsrc, coeffs)
    torch.cuda.synchronize()
    for c, g, r in zip(cpu, gdst, ref):
        assert torch.equal(c, g.cpu())
        assert torch.allclose(g.cpu().double(), r, rtol=2**-7, atol=1e-6)


def test_scale_add_cuda_many_small_tensors_and_nan():
    g = torch.Generator().manual_seed(1)
    dst = [torch.randn(int(n), generator=g, dtype=torch.float32) for n in torch.randint(1, 3000, (1000,), generator=g)]
    src = [torch.randn(d.numel(), generator=g) for d in dst]
    src[10][0] = float("nan")
    coeffs = torch.rand(1000, generator=g).tolist()
    cpu = [d.clone() for d in dst]
    _native.scale_add_(cpu, src, coeffs)
    gd = [d.cuda() for d in dst]
    _native.scale_add_(gd, [s.cuda() for s in src], coeffs)
    for c, x in zip(cpu, gd):
        x = x.cpu()
        # NaN stays NaN in the same places; its payload is the device's (canonical on the GPU,
        # the input's on x86), so only the other elements are compared bit for bit.
        nan = torch.isnan(c)
        assert torch.equal(nan, torch.isnan(x))
        assert torch.equal(c[~nan].view(torch.int32), x[~nan].view(torch.int32))


DOT_SIZES = [0, 1, 3, 17, 1023, 1025, 4097, 65535, 65537, 131073, 1_000_003]
DOT_DTYPES = [("F32", "F32"), ("F16", "F16"), ("BF16", "BF16"), ("F32", "BF16"), ("F16", "F32")]


@ALIGN
@pytest.mark.parametrize("a_dt, b_dt", DOT_DTYPES, ids=[f"{a}x{b}" for a, b in DOT_DTYPES])
def test_dot_cuda_equals_cpu_bit_for_bit(a_dt, b_dt, aligned):
    """The README promises CPU and CUDA agree bit for bit: same order, same roundings."""
    (a, b), (ga, gb) = _pairs(a_dt, b_dt, 2, aligned, DOT_SIZES)
    cpu = _native.dot(a, b)
    got = _native.dot(ga, gb)
    assert got == cpu
    assert _native.dot(ga, gb) == got  # deterministic run to run
    for x, y, v in zip(a, b, got):
        ref = float((x.double() * y.double()).sum())
        assert abs(v - ref) <= 64 * 2**-24 * float((x.double() * y.double()).abs().sum()) + 1e-30


def test_dot_cuda_equals_cpu_across_many_launches():
    """More tensors and chunks than one metadata pack holds (36 tensors, 320 blocks): tensors
    continue from one launch into the next and still sum in the CPU's order."""
    g = torch.Generator().manual_seed(5)
    sizes = [int(n) * 2 + 1 for n in torch.randint(1, 150_000, (90,), generator=g)]
    (a, b), (ga, gb) = _pairs("BF16", "F32", 6, False, sizes)
    assert _native.dot(ga, gb) == _native.dot(a, b)
