"""The one bridge between torch tensors and the torch-free C++ core.

Everything that hands memory to ``safegene._core`` goes through here: this module checks
devices, dtypes and contiguity, turns tensors into raw pointers plus element counts and a
``safegene._core.DType``, and keeps the tensors referenced for the duration of the call (the core never
owns Python objects). torch is imported lazily so that ``import safegene`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import SafeGeneError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .._core import DType


def core():
    """Return the compiled ``safegene._core`` module, with a clear error when it is missing."""
    try:
        from .. import _core  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise SafeGeneError(
            f"the compiled core safegene._core cannot be imported ({exc}); "
            "reinstall with `pip install .` from the source tree"
        ) from exc
    return _core


def dtype_of(name: str) -> "DType":
    """The core's dtype for a safetensors dtype name: F32/F16/BF16, else RAW (copied bytes).

    >>> dtype_of("BF16")  # doctest: +SKIP
    <DType.BF16: 2>
    """
    members = core().DType.__members__
    d = members.get(name)
    return d if d is not None and d.is_float else members["RAW"]


def _torch_dtype(t: "torch.Tensor") -> "DType":
    import torch

    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    try:
        return core().DType.__members__[names[t.dtype]]
    except KeyError:
        raise SafeGeneError(
            f"unsupported tensor dtype {t.dtype}; safegene kernels take float32, float16 and bfloat16"
        ) from None


def _check_pairs(a: Sequence["torch.Tensor"], b: Sequence["torch.Tensor"], what: str) -> None:
    if len(a) != len(b):
        raise SafeGeneError(f"{what}: {len(a)} tensors against {len(b)}; the lists must pair up one to one")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise SafeGeneError(f"{what}: tensor {i} has {x.numel()} elements against {y.numel()}")
        if not (x.is_contiguous() and y.is_contiguous()):
            raise SafeGeneError(f"{what}: tensor {i} is not contiguous; call .contiguous() first")


#: Set to 1 to run :func:`scale_add_` and :func:`dot` through the torch twins on every device
#: (the tests compare the twins with the kernels this way).
TORCH_ENV = "SAFEGENE_TORCH_KERNELS"
BACKENDS = ("auto", "core", "torch")


def _backend(dev: "torch.device", backend: str | None) -> str:
    """``"core"`` (the compiled kernels) or ``"torch"`` (the twins below) for one device."""
    import os

    b = backend or ("torch" if os.environ.get(TORCH_ENV, "") not in ("", "0") else "auto")
    if b not in BACKENDS:
        raise SafeGeneError(f"unknown kernel backend {b!r}; use one of {', '.join(BACKENDS)}")
    if dev.type == "meta":
        raise SafeGeneError("tensors on the meta device hold no data (an offloaded weight?); load them onto a device first")
    if b == "auto":
        return "core" if dev.type == "cpu" or (dev.type == "cuda" and core().cuda_built()) else "torch"
    if b == "core":
        if dev.type == "cuda" and not core().cuda_built():
            raise SafeGeneError("CUDA tensors were given but safegene was built without CUDA; rebuild with "
                                "SAFEGENE_CUDA=ON, or use backend='torch'")
        if dev.type not in ("cpu", "cuda"):
            raise SafeGeneError(f"unsupported device {dev} for the compiled kernels (cpu, cuda); use backend='torch'")
    return b


def _stream_of(dev: "torch.device") -> int:
    import torch

    return int(torch.cuda.current_stream(dev).cuda_stream) if dev.type == "cuda" else 0


def group_by_device(a: Sequence["torch.Tensor"], b: Sequence["torch.Tensor"], what: str) -> dict["torch.device", list[int]]:
    """Indices of the pairs per device, in first-appearance order; both tensors of a pair must
    share a device (one kernel call reads and writes one device's memory).

    >>> group_by_device([w0, w1], [t0, t1], "scale_add_")  # doctest: +SKIP
    {device(type='cuda', index=0): [0], device(type='cuda', index=1): [1]}
    """
    groups: dict["torch.device", list[int]] = {}
    for i, (x, y) in enumerate(zip(a, b)):
        if x.device != y.device:
            raise SafeGeneError(f"{what}: pair {i} has its tensors on {x.device} and {y.device}; "
                                "place each τ on its weight's device")
        groups.setdefault(x.device, []).append(i)
    return groups


def scale_add_(dsts: Sequence["torch.Tensor"], srcs: Sequence["torch.Tensor"], coeffs: Sequence[float],
               backend: str | None = None) -> None:
    """In place, for every i: ``dsts[i] += coeffs[i] * srcs[i]``, one batched kernel call per device.

    Arithmetic is float32 with one round-to-nearest-even store into each destination's dtype
    (NaN stays NaN); source and destination dtypes may differ. Pairs may live on different
    devices (a dispatched model), the two tensors of a pair on one. ``backend``: ``auto`` (the
    compiled kernels on cpu, and on cuda when built with CUDA; the torch twin elsewhere),
    ``core`` or ``torch``; ``SAFEGENE_TORCH_KERNELS=1`` turns ``auto`` into ``torch``.

    >>> scale_add_([w], [tau], [0.5])  # doctest: +SKIP
    """
    _check_pairs(dsts, srcs, "scale_add_")
    if len(coeffs) != len(dsts):
        raise SafeGeneError(f"scale_add_: {len(coeffs)} coefficients for {len(dsts)} tensors")
    if not dsts:
        return
    kinds = [(_torch_dtype(d), _torch_dtype(s)) for d, s in zip(dsts, srcs)]
    for dev, idx in group_by_device(dsts, srcs, "scale_add_").items():
        if _backend(dev, backend) == "torch":
            _scale_add_torch([dsts[i] for i in idx], [srcs[i] for i in idx], [float(coeffs[i]) for i in idx])
            continue
        core().scale_add(
            [dsts[i].data_ptr() for i in idx],
            [kinds[i][0] for i in idx],
            [srcs[i].data_ptr() for i in idx],
            [kinds[i][1] for i in idx],
            [dsts[i].numel() for i in idx],
            [float(coeffs[i]) for i in idx],
            dev.type == "cuda",
            _stream_of(dev),
        )


def dot(a: Sequence["torch.Tensor"], b: Sequence["torch.Tensor"], backend: str | None = None) -> list[float]:
    """Per-pair inner products ``<a[i], b[i]>`` (float32 partial sums, float64 total), one batched
    kernel call per device (``backend`` as in :func:`scale_add_`).

    Used for calibration gradients: ``dL/dlambda_l = sum_t <dL/dW_t, tau_t>``.

    >>> dot([grad], [tau])  # doctest: +SKIP
    [0.0123]
    """
    _check_pairs(a, b, "dot")
    if not a:
        return []
    kinds = [(_torch_dtype(x), _torch_dtype(y)) for x, y in zip(a, b)]
    out = [0.0] * len(a)
    for dev, idx in group_by_device(a, b, "dot").items():
        if _backend(dev, backend) == "torch":
            vals = [_dot_torch(a[i], b[i]) for i in idx]
        else:
            vals = list(core().dot(
                [a[i].data_ptr() for i in idx],
                [kinds[i][0] for i in idx],
                [b[i].data_ptr() for i in idx],
                [kinds[i][1] for i in idx],
                [a[i].numel() for i in idx],
                dev.type == "cuda",
                _stream_of(dev),
            ))
        for i, v in zip(idx, vals):
            out[i] = float(v)
    return out


# ---- torch twins -----------------------------------------------------------------------------
# The kernels' arithmetic (csrc/cpu/kernels.cpp) in torch ops, for devices the core cannot run
# on (a CUDA device without a CUDA build, mps, xpu). Every float32 product and sum is its own
# torch op, so there is no fused multiply-add: on non-NaN values they agree with the kernels bit
# for bit. A NaN stays NaN, but its sign may differ (torch stores every bf16 NaN as +0x7FC0).

#: Elements per torch op in the twins: bounds their float32 temporaries (a few x 16 MiB); a whole
#: number of dot items (kDotItem = 65536), so a piece never splits an item.
_PIECE = 1 << 22


def _pieces(ts: Sequence["torch.Tensor"]):
    """Flat views of at most ``_PIECE`` elements covering every tensor, with the tensor index."""
    for i, t in enumerate(ts):
        flat = t.view(-1)
        for s in range(0, flat.numel(), _PIECE):
            yield i, flat[s: s + _PIECE]


def _scale_add_torch(dsts: Sequence["torch.Tensor"], srcs: Sequence["torch.Tensor"], coeffs: Sequence[float]) -> None:
    import torch

    # per-tensor scalars as float32, as the core receives them (one RNE from the double)
    c32 = [float(torch.tensor(c, dtype=torch.float32)) for c in coeffs]
    batch: list[tuple["torch.Tensor", "torch.Tensor", float]] = []

    def flush() -> None:
        if not batch:
            return
        acc = [d if d.dtype == torch.float32 else d.float() for d, _, _ in batch]
        prods = torch._foreach_mul([s.float() for _, s, _ in batch], [c for _, _, c in batch])
        torch._foreach_add_(acc, prods)  # a rounded product, then a rounded add: no FMA
        for (d, _, _), x in zip(batch, acc):
            if x is not d:
                d.copy_(x)  # the one RNE store into the destination's dtype
        batch.clear()

    size = 0
    for (i, d), (_, s) in zip(_pieces(dsts), _pieces(srcs)):
        batch.append((d, s, c32[i]))
        size += d.numel()
        if size >= _PIECE:
            flush()
            size = 0
    flush()


def _dot_torch(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """``<a, b>`` in the order kernels.h fixes for dot: 1024-element blocks from the tensor's
    start, 16 float32 lane sums per block (element j to lane j % 16 in increasing j, a rounded
    product then a rounded add), the lanes folded 8/4/2/1, the block partials summed in double
    per 65536-element item in order, the items summed in order."""
    import torch

    block, lanes, item = 1024, 16, 65536
    fa, fb = a.view(-1), b.view(-1)
    total = 0.0
    for s in range(0, fa.numel(), _PIECE):
        x = fa[s: s + _PIECE].float() * fb[s: s + _PIECE].float()
        n = x.numel()
        nb = -(-n // block)
        # zero padding leaves a lane sum unchanged: it starts at +0.0, so adding +0.0 is exact
        x = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block // lanes, lanes)
        acc = torch.zeros(nb, lanes, dtype=torch.float32, device=x.device)
        for k in range(block // lanes):
            acc = acc + x[:, k, :]
        w = lanes // 2
        t = acc[:, :w] + acc[:, w:]
        while w > 1:
            w //= 2
            t = t[:, :w] + t[:, w: 2 * w]
        per_item = item // block
        ni = -(-nb // per_item)
        parts = torch.nn.functional.pad(t[:, 0].double(), (0, ni * per_item - nb)).view(ni, per_item)
        sums = torch.zeros(ni, dtype=torch.float64, device=x.device)
        for k in range(per_item):
            sums = sums + parts[:, k]
        for v in sums.tolist():
            total += v
    return total


def has_cuda() -> bool:
    """True only when the CUDA kernels were compiled in *and* a CUDA device answers."""
    return bool(core().has_cuda())
