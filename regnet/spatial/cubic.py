"""Cubic B-spline interpolation of an image at voxel coordinates, zero outside the image.

The image is extended by zeros and turned into cubic B-spline coefficients (Unser's prefilter,
the inverse of the sampled kernel ``(1, 4, 1) / 6``, run per axis as two first-order
recursions with the pole ``z = sqrt(3) - 2``, on a grid enlarged by a margin where the
coefficients of the zero extension have decayed below ``|z|^12 = 1.4e-7``); values are then
read with ``2 ** ndim`` linear fetches of the coefficients at shifted positions (Sigg and
Hadwiger, GPU Gems 2, ch. 20), each spread over the CPU threads
(:func:`regnet.spatial.warp.threaded_grid_sample`).

This is what ``scipy.ndimage.affine_transform(order=3, mode="grid-constant")`` computes (it
pads by the same 12 voxels before its prefilter; ``tests/spatial/test_cubic.py`` compares the
two). Resampling a rotated 2 mm brain (99x117x95) onto ``register.py``'s working grid, 2 threads:
0.23 s here against 0.38 s in scipy (single-threaded) plus 0.13 s to import scipy.ndimage.

Conventions (:mod:`regnet.spatial`): images ``(1, C, *S)``; coordinates ``(1, ndim, *S_out)``
are voxel positions in tensor axis order.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from regnet.spatial.affine import apply_affine
from regnet.spatial.grid import identity_grid
from regnet.spatial.warp import threaded_grid_sample

POLE = math.sqrt(3.0) - 2.0
"""The pole ``z`` of the cubic B-spline prefilter."""
PREFILTER_RADIUS = 12
"""Zero margin (voxels) kept around the image: the coefficients beyond it are below
``|z|^12 = 1.4e-7`` of the image's values, and sampling reads zero there."""


def bspline_coefficients(image: torch.Tensor, radius: int = PREFILTER_RADIUS) -> torch.Tensor:
    """Cubic B-spline coefficients of ``image`` ``(1, C, *S)`` extended by zeros, on the grid
    enlarged by ``radius`` voxels on every side ``(1, C, *(S + 2 radius))``: interpolating them
    gives back the image at its voxel centres and zero far outside it.

    Per axis, the prefilter ``-6 z / ((1 - z q^-1)(1 - z q))`` runs as a causal then an
    anti-causal first-order recursion; both start exactly for a signal that is zero beyond the
    enlarged grid (the causal one from zero, the anti-causal one from the sum of its tail)."""
    ndim = image.dim() - 2
    coefficients = F.pad(image, [radius, radius] * ndim)
    for axis in range(2, ndim + 2):
        moved = coefficients.movedim(axis, 0).contiguous()  # recursion along the first axis
        for k in range(1, moved.shape[0]):
            moved[k].add_(moved[k - 1], alpha=POLE)
        moved[-1].mul_(1.0 / (1.0 - POLE**2))
        for k in range(moved.shape[0] - 2, -1, -1):
            moved[k].add_(moved[k + 1], alpha=POLE)
        coefficients = moved.mul_(-6.0 * POLE).movedim(0, axis)
    return coefficients.contiguous()


def sample_cubic(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, C, *S)`` interpolated with cubic B-splines at voxel coordinates
    ``coords`` ``(1, ndim, *S_out)``, zero outside (up to the spline's reach); returns
    ``(1, C, *S_out)`` in the image's dtype."""
    ndim = image.dim() - 2
    coefficients = bspline_coefficients(image)
    out_shape = tuple(coords.shape[2:])
    # per axis: two linear fetches with weights g0, g1 at base - 1 + w1 / g0 and base + 1 + w3 / g1,
    # kept as grid_sample's normalised coordinates of the enlarged grid
    weights, positions = [], []
    for axis in range(ndim):
        position = coords[0, axis].to(image.dtype) + PREFILTER_RADIUS
        base = position.floor()
        w0, w1, _, w3 = _bspline_weights(position - base)
        g0 = w0 + w1
        scale = 2.0 / (coefficients.shape[2 + axis] - 1)
        weights.append((g0, 1 - g0))
        positions.append(((base - 1 + w1 / g0) * scale - 1, (base + 1 + w3 / (1 - g0)) * scale - 1))
    grid = torch.empty(1, *out_shape, ndim, dtype=image.dtype, device=image.device)
    out = None
    for choice in itertools.product((0, 1), repeat=ndim):
        weight = None
        for axis, side in enumerate(choice):
            grid[0, ..., ndim - 1 - axis] = positions[axis][side]  # grid lists (x, y, z)
            g = weights[axis][side]
            weight = g if weight is None else weight * g
        value = threaded_grid_sample(coefficients, grid, "bilinear", "zeros") * weight
        out = value if out is None else out.add_(value)
    return out


def resample_cubic(
    image: torch.Tensor, matrix: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """``image`` ``(1, C, *S)`` interpolated with cubic B-splines (zero outside) at the voxel
    positions ``matrix @ (i, 1)`` of every voxel ``i`` of a grid of ``shape``; ``matrix``
    ``(ndim+1, ndim+1)`` maps output voxels to image voxels. Returns ``(1, C, *shape)``.

    Where each output axis runs along one image axis (a scaled, signed permutation: resampling
    onto a grid of the same orientation, such as ``register.py``'s working grid over the fixed
    image) the interpolation is separable and runs one axis at a time (4 taps per output
    sample and axis: a 1 mm brain onto a 1.5 mm grid took 0.15 s after its prefilter, against
    0.9 s for the ``2 ** ndim`` fetches of :func:`sample_cubic`); otherwise
    :func:`sample_cubic` at every point."""
    ndim = image.dim() - 2
    linear = matrix[:ndim, :ndim]
    nonzero = linear.abs() > 1e-9 * linear.abs().max()
    if not (nonzero.sum(0) == 1).all() or not (nonzero.sum(1) == 1).all():
        grid = identity_grid(tuple(shape), image.device, torch.float64)
        return sample_cubic(image, apply_affine(matrix.double()[None], grid))
    sources = [int(nonzero[:, a].nonzero()) for a in range(ndim)]  # image axis of output axis a
    out = bspline_coefficients(image)
    for out_axis, source in enumerate(sources):
        index = torch.arange(shape[out_axis], dtype=torch.float64, device=image.device)
        position = linear[source, out_axis].double() * index + matrix[source, ndim]
        out = _interpolate_axis(out, position + PREFILTER_RADIUS, source + 2)
    return out.permute(0, 1, *[source + 2 for source in sources]).contiguous()


def _interpolate_axis(coefficients: torch.Tensor, position: torch.Tensor, dim: int) -> torch.Tensor:
    """Cubic B-spline values along tensor dimension ``dim`` of ``coefficients`` at the float64
    ``position`` s (coefficient indices); zero where a tap falls outside the coefficients."""
    base = position.floor()
    weights = _bspline_weights((position - base).to(coefficients.dtype))
    size = coefficients.shape[dim]
    view = [1] * coefficients.dim()
    view[dim] = -1
    out = None
    for offset, weight in zip(range(-1, 3), weights, strict=True):
        index = base.long() + offset
        inside = (index >= 0) & (index < size)
        taken = coefficients.index_select(dim, index.clamp(0, size - 1))
        term = taken * (weight * inside).view(view)
        out = term if out is None else out.add_(term)
    return out


def _bspline_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cubic B-spline weights of the coefficients at ``base - 1 .. base + 2`` for a position
    ``base + t``, ``0 <= t < 1``; they sum to 1."""
    w0, w1, w3 = (1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, t**3 / 6
    return w0, w1, 1 - w0 - w1 - w3, w3
