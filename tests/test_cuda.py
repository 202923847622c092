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


def _lists(dst_dt, src_dt, seed):
    g = torch.Generator().manual_seed(seed)
    dst = [torch.randn(n + 1, generator=g).to(TD[dst_dt]) for n in SIZES]
    src = [(0.01 * torch.randn(n + 3, generator=g)).to(TD[src_dt]) for n in SIZES]
    # Views that start one element in: unaligned for vector loads.
    return [d[1:] for d in dst], [s[3:] for s in src]


@pytest.mark.parametrize("dst_dt", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("src_dt", ["F32", "BF16"])
def test_scale_add_cuda_matches_cpu_bit_for_bit(dst_dt, src_dt):
    dst, src = _lists(dst_dt, src_dt, 0)
    coeffs = [0.5, -1.25, 3.0, 1.0, 0.375, -0.8125, 2.5, 1.5]
    ref = [d.double() + c * s.double() for d, s, c in zip(dst, src, coeffs)]
    cpu = [d.clone() for d in dst]
    _native.scale_add_(cpu, [s.contiguous() for s in src], coeffs)
    gdst = [d.cuda() for d in dst]
    _native.scale_add_(gdst, [s.cuda() for s in src], coeffs)
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
        assert torch.equal(c.view(torch.int32), x.cpu().view(torch.int32))


@pytest.mark.parametrize("dt", ["F32", "BF16"])
def test_dot_cuda_matches_float64(dt):
    dst, src = _lists(dt, dt, 2)
    got = _native.dot([d.cuda() for d in dst], [s.cuda() for s in src])
    cpu = _native.dot([d.contiguous() for d in dst], [s.contiguous() for s in src])
    for d, s, v, c in zip(dst, src, got, cpu):
        ref = float((d.double() * s.double()).sum())
        bound = 64 * 2**-24 * float((d.double() * s.double()).abs().sum()) + 1e-30
        assert abs(v - ref) <= bound
        assert abs(c - ref) <= bound
