"""Cubic B-spline free-form deformation (FFD) on a regular control-point grid.

Control-grid convention: ``G`` control points along an axis of ``N`` voxels are spaced
``delta = (N - 1) / (G - 3)`` voxels apart, control point ``k`` sitting at voxel ``(k - 1) *
delta``; points ``1`` and ``G - 2`` lie on the first and last voxel, and one extra point on each
side supports the cubic basis. Control-point values are displacements in voxels of the image
grid (DDF layout of :mod:`regnet.spatial`).

Evaluation is separable: per axis a dense ``(N, G)`` basis-weight matrix (4 non-zeros a row) is
contracted with the control grid. This is exact for any (non-integer) spacing and its cost,
``O(N·G)`` per axis, is far below that of the networks that predict the control points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from regnet.spatial.grid import check_field


def cubic_bspline_basis(s: torch.Tensor) -> torch.Tensor:
    """The four cubic B-spline weights ``(..., 4)`` at fractional offsets ``s`` in ``[0, 1]``."""
    s2, s3 = s * s, s * s * s
    return torch.stack(
        [
            (1 - s) ** 3 / 6,
            (3 * s3 - 6 * s2 + 4) / 6,
            (-3 * s3 + 3 * s2 + 3 * s + 1) / 6,
            s3 / 6,
        ],
        dim=-1,
    )


@functools.lru_cache(maxsize=64)
def _axis_weights(n: int, g: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``(n, g)`` matrix of basis weights of control points for every voxel on an axis."""
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        return _basis_matrix(n, g).to(device=device, dtype=dtype)


def _basis_matrix(n: int, g: int) -> torch.Tensor:
    delta = (n - 1) / (g - 3) if n > 1 else 1.0
    x = torch.arange(n, dtype=torch.float64)
    s = x / delta + 1.0
    idx = torch.floor(s).clamp(1, g - 3)
    frac = s - idx
    weights = torch.zeros(n, g, dtype=torch.float64)
    basis = cubic_bspline_basis(frac)
    for offset in range(4):
        weights[torch.arange(n), (idx - 1 + offset).long()] = basis[:, offset]
    return weights


def control_grid_shape(shape: Sequence[int], spacing: float | Sequence[float]) -> tuple[int, ...]:
    """Control-grid size for control points at most ``spacing`` voxels apart (>= 4 per axis)."""
    spacings = [float(spacing)] * len(shape) if isinstance(spacing, int | float) else spacing
    if len(spacings) != len(shape) or any(s <= 0 for s in spacings):
        raise ValueError(f"spacing {spacing} must be positive, one per axis of {tuple(shape)}")
    return tuple(max(4, math.ceil((n - 1) / s) + 3) for n, s in zip(shape, spacings, strict=True))


def bspline_to_ddf(control_points: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Evaluate a cubic B-spline FFD on a grid of ``shape``.

    Args:
        control_points: ``(B, ndim, *G)`` control-point displacements in voxels, ``G >= 4`` per
            axis, covering the image as described in the module docstring.
        shape: spatial shape of the image grid.

    Returns:
        DDF ``(B, ndim, *shape)``.
    """
    ndim = check_field(control_points, "control_points")
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} must have {ndim} entries")
    if min(control_points.shape[2:]) < 4:
        raise ValueError(
            f"control grid needs at least 4 points per axis, got {tuple(control_points.shape[2:])}"
        )
    dtype = torch.promote_types(control_points.dtype, torch.float32)
    field = control_points.to(dtype)
    for axis, n in enumerate(shape):
        weights = _axis_weights(n, field.shape[2 + axis], field.device, dtype)
        field = torch.movedim(torch.movedim(field, 2 + axis, -1) @ weights.T, -1, 2 + axis)
    return field
