"""Jacobian determinant of the transform ``x -> x + u(x)`` of a DDF."""

from __future__ import annotations

import torch

from regnet.spatial.grid import check_field


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Finite-difference gradient ``(B, C, ndim, *S)``: ``out[:, c, a] = d field_c / d x_a``.

    Central differences inside, one-sided at the borders (``torch.gradient``), in voxels.
    """
    ndim = field.dim() - 2
    dims = tuple(range(2, 2 + ndim))
    grads = torch.gradient(field, dim=dims)
    return torch.stack(grads, dim=2)


def jacobian_matrix(ddf: torch.Tensor) -> torch.Tensor:
    """``I + ∇u`` per voxel, ``(B, *S, ndim, ndim)`` with ``[..., c, a] = d(x+u)_c / d x_a``."""
    ndim = check_field(ddf)
    grad = spatial_gradient(ddf.to(torch.promote_types(ddf.dtype, torch.float32)))
    jac = grad.movedim(1, -1).movedim(1, -1)  # (B, *S, c, a)
    return jac + torch.eye(ndim, device=ddf.device, dtype=jac.dtype)


SLAB_PLANES = 16
"""Planes of the first spatial axis per piece when :func:`jacobian_determinant` works through a
large 3D field piece by piece."""
SLAB_MIN_VOXELS = 2**21
"""Fields with more voxels than this (per batch item) go piece by piece."""


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """``det(I + ∇u)`` per voxel, ``(B, *S)``; ``<= 0`` marks folding. Unitless.

    A 3D field larger than a few slabs is taken :data:`SLAB_PLANES` planes at a time (with one
    neighbouring plane either side for the central differences), which gives the same values:
    the nine derivative volumes of a whole 1 mm brain field in float64 (630 MB) took 1.40 s on 2
    threads, slab by slab 0.65 s."""
    if (
        ddf.dim() == 5
        and ddf.shape[2] > 2 * SLAB_PLANES
        and ddf.shape[2:].numel() > SLAB_MIN_VOXELS
    ):
        n, pieces = ddf.shape[2], []
        for start in range(0, n, SLAB_PLANES):
            stop = min(n, start + SLAB_PLANES)
            low, high = max(0, start - 1), min(n, stop + 1)
            det = _determinant(ddf[:, :, low:high])
            pieces.append(det[:, start - low : start - low + stop - start])
        return torch.cat(pieces, 1)
    return _determinant(ddf)


def _determinant(ddf: torch.Tensor) -> torch.Tensor:
    jac = jacobian_matrix(ddf)
    if jac.shape[-1] == 2:
        return jac[..., 0, 0] * jac[..., 1, 1] - jac[..., 0, 1] * jac[..., 1, 0]
    a, b, c = jac[..., 0, 0], jac[..., 0, 1], jac[..., 0, 2]
    d, e, f = jac[..., 1, 0], jac[..., 1, 1], jac[..., 1, 2]
    g, h, i = jac[..., 2, 0], jac[..., 2, 1], jac[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
