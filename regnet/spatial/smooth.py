"""Separable Gaussian smoothing of images and fields.

The kernels and the filtering reproduce MONAI's ``gaussian_1d(sigma, truncated=3.0, approx="erf",
normalize=True)`` and ``separable_filtering(x, kernels, mode="replicate")`` (equal to float
rounding, checked in ``tests/spatial/test_smooth.py``; bitwise equal on the CPU), but are
regnet's own: importing anything from MONAI runs ``monai/__init__`` (networks, torchvision
models, ``torch._dynamo``), 6.5 of the 10.2 s that ``import regnet.cli.register`` took
(``python -X importtime``, 2 shared CPU cores; 15 of 27 s under load). Every classical
registration smooths, so ``register.py`` paid that on each call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_TRUNCATE = 3.0
"""Kernels reach ``round(3 sigma)`` samples either side of the centre (at least one)."""


@functools.lru_cache(maxsize=64)
def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian kernel of standard deviation ``sigma`` samples, float32 on the CPU.

    Each tap is the Gaussian's integral over its sample (``erf`` differences), ``2 t + 1`` taps
    with ``t = int(max(3 sigma, 0.5) + 0.5)``, divided by their sum; ``sigma`` below ``1e-3`` is
    taken as ``1e-3`` (the kernel is then ``[0, 1, 0]``). Cached; do not modify the result.
    """
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        sigma = max(float(sigma), 1e-3)
        tail = int(max(sigma * _TRUNCATE, 0.5) + 0.5)
        x = torch.arange(-tail, tail + 1, dtype=torch.float32)
        t = 0.70710678 / torch.tensor(sigma, dtype=torch.float32)  # 1 / (sigma sqrt 2)
        kernel = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
        return kernel / kernel.sum()


@functools.lru_cache(maxsize=64)
def _taps(sigma: float) -> tuple[float, ...]:
    """:func:`gaussian_kernel` as Python floats (cached)."""
    return tuple(float(v) for v in gaussian_kernel(sigma))


def gaussian_smooth(x: torch.Tensor, sigma: Sequence[float] | float) -> torch.Tensor:
    """Separable Gaussian smoothing (kernels of :func:`gaussian_kernel`). Differentiable.

    Args:
        x: ``(B, C, *S)`` with 1 to 3 spatial axes, any floating dtype and device.
        sigma: standard deviation in voxels, one for all axes or one per spatial axis; an axis
            with ``sigma <= 0`` is left unsmoothed.

    Returns:
        ``(B, C, *S)``; edges replicate the border value, so constant fields stay constant.
    """
    ndim = x.dim() - 2
    if ndim not in (1, 2, 3):
        raise ValueError(
            f"gaussian_smooth: x must be (B, C, *S) with 1-3 spatial axes, got shape "
            f"{tuple(x.shape)}"
        )
    sigmas = [float(sigma)] * ndim if isinstance(sigma, int | float) else [float(s) for s in sigma]
    if len(sigmas) != ndim:
        raise ValueError(
            f"gaussian_smooth: {len(sigmas)} sigmas for {ndim} spatial axes of x {tuple(x.shape)}"
        )
    out = x
    # One axis at a time, padding only that axis: the same products and sums as MONAI's
    # separable_filtering (which pads every axis first), on smaller tensors.
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        out = _SmoothAxis.apply(out, _taps(s), axis)
    return out


def _pad_axis(x: torch.Tensor, axis: int, width: int, mode: str) -> torch.Tensor:
    """``x`` padded by ``width`` on both ends of spatial ``axis`` (``F.pad`` lists the last
    axis first)."""
    ndim = x.dim() - 2
    pad = [0] * (2 * ndim)
    pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = width
    return F.pad(x, pad, mode=mode)


def _correlate_axis(x: torch.Tensor, taps: tuple[float, ...], axis: int) -> torch.Tensor:
    """Valid correlation of ``x`` with ``taps`` along spatial ``axis`` (``n - len(taps) + 1``
    samples), as a sum of shifted, weighted copies: the same products as a depthwise
    convolution, summed in the same order (equal to the last bit in tests), and on the CPU 2-8x
    faster than ``conv3d`` with a ``(k, 1, 1)`` kernel (2 threads: 82 against 659 ms for a 1 mm
    brain, 3 taps; 2.9 against 6.1 ms for a 3-component SVF velocity, 7 taps)."""
    dim = axis + 2
    n = x.shape[dim] - len(taps) + 1
    out = x.narrow(dim, 0, n) * taps[0]
    for shift, tap in enumerate(taps[1:], start=1):
        out.add_(x.narrow(dim, shift, n), alpha=tap)
    return out


class _SmoothAxis(torch.autograd.Function):
    """Replicate-padded correlation along one spatial axis with a symmetric kernel.

    The backward pass is a forward correlation too: the adjoint of a valid correlation with a
    symmetric kernel is the correlation of the zero-padded gradient, and the adjoint of
    replicate padding adds each pad's gradient onto its border voxel. On the CPU the
    convolution's own backward was the dearest part of smoothing an SVF: forward + backward of
    a 3-component 66x78x63 field, sigma 1, 2 threads, 15.7 ms against 34.3 ms for MONAI's
    ``separable_filtering`` with autograd (``scripts/benchmarks/ops.py --shape 132,156,126
    --table monai``; gradients equal within 1.8e-7), before the correlation became shifted
    sums (:func:`_correlate_axis`).
    """

    @staticmethod
    def forward(ctx, x, taps, axis):
        ctx.taps, ctx.axis = taps, axis
        tail = (len(taps) - 1) // 2
        return _correlate_axis(_pad_axis(x, axis, tail, "replicate"), taps, axis)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        taps, axis = ctx.taps, ctx.axis
        dim = axis + 2
        tail = (len(taps) - 1) // 2
        padded = _correlate_axis(_pad_axis(grad, axis, 2 * tail, "constant"), taps, axis)
        n = grad.shape[dim]
        grad_x = padded.narrow(dim, tail, n).clone()
        grad_x.narrow(dim, 0, 1).add_(padded.narrow(dim, 0, tail).sum(dim, keepdim=True))
        end = padded.narrow(dim, tail + n, tail).sum(dim, keepdim=True)
        grad_x.narrow(dim, n - 1, 1).add_(end)
        return grad_x, None, None
