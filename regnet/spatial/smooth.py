"""Separable Gaussian smoothing of images and fields (MONAI's separable filtering)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from monai.networks.layers import gaussian_1d, separable_filtering


@functools.lru_cache(maxsize=32)
def _kernel(sigma: float) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        sigma_t = torch.tensor(max(sigma, 1e-3))
        return gaussian_1d(sigma_t, truncated=3.0, approx="erf", normalize=True)


def gaussian_smooth(x: torch.Tensor, sigma: Sequence[float] | float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``x (B, C, *S)`` with ``sigma`` voxels (per axis or one);
    edges replicate the border value, so constant fields stay constant. Differentiable."""
    ndim = x.dim() - 2
    sigmas = [float(sigma)] * ndim if isinstance(sigma, int | float) else list(sigma)
    if all(s <= 0 for s in sigmas):
        return x
    kernels = [_kernel(s).to(device=x.device, dtype=x.dtype) for s in sigmas]
    return separable_filtering(x, kernels, mode="replicate")
