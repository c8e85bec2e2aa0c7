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

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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


@functools.lru_cache(maxsize=256)
def _conv_weight(
    sigma: float, ndim: int, axis: int, channels: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`gaussian_kernel` as a depthwise ``ndim``-D convolution weight along ``axis``,
    ``(channels, 1, ...)`` on ``device`` in ``dtype`` (cached: a GPU run copies it once)."""
    with torch.inference_mode(False):
        shape = [1] * (ndim + 2)
        shape[axis + 2] = -1
        kernel = gaussian_kernel(sigma).to(device=device, dtype=dtype).reshape(shape)
        return kernel.repeat(channels, *[1] * (ndim + 1))


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
    if ndim not in _CONV:
        raise ValueError(
            f"gaussian_smooth: x must be (B, C, *S) with 1-3 spatial axes, got shape "
            f"{tuple(x.shape)}"
        )
    sigmas = [float(sigma)] * ndim if isinstance(sigma, int | float) else [float(s) for s in sigma]
    if len(sigmas) != ndim:
        raise ValueError(
            f"gaussian_smooth: {len(sigmas)} sigmas for {ndim} spatial axes of x {tuple(x.shape)}"
        )
    channels = x.shape[1]
    out = x
    # One axis at a time, padding only that axis: the same products and sums as MONAI's
    # separable_filtering (which pads every axis first), on smaller tensors. A depthwise
    # (grouped) convolution is several times faster on the CPU than folding C into the batch.
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        weight = _conv_weight(s, ndim, axis, channels, x.device, x.dtype)
        out = _SmoothAxis.apply(out, weight, axis)
    return out


def _pad_axis(x: torch.Tensor, axis: int, width: int, mode: str) -> torch.Tensor:
    """``x`` padded by ``width`` on both ends of spatial ``axis`` (``F.pad`` lists the last
    axis first)."""
    ndim = x.dim() - 2
    pad = [0] * (2 * ndim)
    pad[2 * (ndim - 1 - axis)] = pad[2 * (ndim - 1 - axis) + 1] = width
    return F.pad(x, pad, mode=mode)


class _SmoothAxis(torch.autograd.Function):
    """Replicate-padded depthwise convolution along one spatial axis with a symmetric kernel.

    The backward pass is a forward convolution too: the adjoint of a valid correlation with a
    symmetric kernel is the correlation of the zero-padded gradient, and the adjoint of
    replicate padding adds each pad's gradient onto its border voxel. On the CPU the
    convolution's own backward was the dearest part of smoothing an SVF: forward + backward of
    a 3-component 66x78x63 field, sigma 1, 2 threads, 15.7 ms against 34.3 ms for MONAI's
    ``separable_filtering`` with autograd (``scripts/benchmarks/ops.py --shape 132,156,126
    --table monai``; gradients equal within 1.8e-7).
    """

    @staticmethod
    def forward(ctx, x, weight, axis):
        ctx.save_for_backward(weight)
        ctx.axis = axis
        tail = (weight.shape[axis + 2] - 1) // 2
        conv = _CONV[x.dim() - 2]
        return conv(_pad_axis(x, axis, tail, "replicate"), weight, groups=x.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        axis = ctx.axis
        dim = axis + 2
        tail = (weight.shape[dim] - 1) // 2
        conv = _CONV[grad.dim() - 2]
        padded = conv(_pad_axis(grad, axis, 2 * tail, "constant"), weight, groups=grad.shape[1])
        n = grad.shape[dim]
        grad_x = padded.narrow(dim, tail, n).clone()
        grad_x.narrow(dim, 0, 1).add_(padded.narrow(dim, 0, tail).sum(dim, keepdim=True))
        end = padded.narrow(dim, tail + n, tail).sum(dim, keepdim=True)
        grad_x.narrow(dim, n - 1, 1).add_(end)
        return grad_x, None, None
