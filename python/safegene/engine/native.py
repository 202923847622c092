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


def _device_of(tensors: Sequence["torch.Tensor"]) -> tuple[str, int]:
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise SafeGeneError(f"all tensors of one kernel call must live on one device, got {sorted(map(str, devs))}")
    dev = devs.pop()
    if dev.type == "cpu":
        return "cpu", 0
    if dev.type == "cuda":
        import torch

        if not core().cuda_built():
            raise SafeGeneError("CUDA tensors were given but safegene was built without CUDA; rebuild with SAFEGENE_CUDA=ON")
        return "cuda", int(torch.cuda.current_stream(dev).cuda_stream)
    raise SafeGeneError(f"unsupported device {dev}; safegene kernels run on cpu and cuda")


def _check_pairs(a: Sequence["torch.Tensor"], b: Sequence["torch.Tensor"], what: str) -> None:
    if len(a) != len(b):
        raise SafeGeneError(f"{what}: {len(a)} tensors against {len(b)}; the lists must pair up one to one")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel() != y.numel():
            raise SafeGeneError(f"{what}: tensor {i} has {x.numel()} elements against {y.numel()}")
        if not (x.is_contiguous() and y.is_contiguous()):
            raise SafeGeneError(f"{what}: tensor {i} is not contiguous; call .contiguous() first")


def scale_add_(dsts: Sequence["torch.Tensor"], srcs: Sequence["torch.Tensor"], coeffs: Sequence[float]) -> None:
    """In place, for every i: ``dsts[i] += coeffs[i] * srcs[i]`` in one batched kernel call.

    Arithmetic is float32 with one round-to-nearest-even store into each destination's dtype
    (NaN stays NaN); source and destination dtypes may differ.

    >>> scale_add_([w], [tau], [0.5])  # doctest: +SKIP
    """
    _check_pairs(dsts, srcs, "scale_add_")
    if len(coeffs) != len(dsts):
        raise SafeGeneError(f"scale_add_: {len(coeffs)} coefficients for {len(dsts)} tensors")
    if not dsts:
        return
    device, stream = _device_of(list(dsts) + list(srcs))
    core().scale_add(
        [t.data_ptr() for t in dsts],
        [_torch_dtype(t) for t in dsts],
        [t.data_ptr() for t in srcs],
        [_torch_dtype(t) for t in srcs],
        [t.numel() for t in dsts],
        [float(c) for c in coeffs],
        device == "cuda",
        stream,
    )


def dot(a: Sequence["torch.Tensor"], b: Sequence["torch.Tensor"]) -> list[float]:
    """Per-pair inner products ``<a[i], b[i]>`` (float32 partial sums, float64 total).

    Used for calibration gradients: ``dL/dlambda_l = sum_t <dL/dW_t, tau_t>``.

    >>> dot([grad], [tau])  # doctest: +SKIP
    [0.0123]
    """
    _check_pairs(a, b, "dot")
    if not a:
        return []
    device, stream = _device_of(list(a) + list(b))
    return list(
        core().dot(
            [t.data_ptr() for t in a],
            [_torch_dtype(t) for t in a],
            [t.data_ptr() for t in b],
            [_torch_dtype(t) for t in b],
            [t.numel() for t in a],
            device == "cuda",
            stream,
        )
    )


def has_cuda() -> bool:
    """True only when the CUDA kernels were compiled in *and* a CUDA device answers."""
    return bool(core().has_cuda())
