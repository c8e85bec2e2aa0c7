"""Image pyramids for coarse-to-fine registration: level grids, smoothing and downsampling.

A level grid covers the same extent as the full-resolution grid with its corner voxels aligned
(the ``align_corners`` convention of :mod:`regnet.spatial`), so level voxel ``x_l`` sits at
full-resolution voxel ``x = step * x_l`` with ``step[a] = (n[a] - 1) / (m[a] - 1)`` per axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from regnet.spatial.smooth import gaussian_smooth

MIN_LEVEL_SIZE = 8
"""Axes are not shrunk below this many voxels (or their full size, if smaller)."""


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Grid sizes of a ``levels``-level pyramid, coarse to fine; the last is ``shape``.

    Level ``l`` (``0`` coarsest) is downsampled by ``2 ** (levels - 1 - l)`` per axis:
    ``m = round((n - 1) / factor) + 1``, but not below ``MIN_LEVEL_SIZE`` voxels.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    shapes = []
    for level in range(levels):
        factor = 2 ** (levels - 1 - level)
        shapes.append(
            tuple(max(min(n, MIN_LEVEL_SIZE), round((n - 1) / factor) + 1) for n in map(int, shape))
        )
    return shapes


def level_step(full: Sequence[int], level: Sequence[int]) -> tuple[float, ...]:
    """Full-resolution voxels per level voxel along each axis, ``(n - 1) / (m - 1)``."""
    return tuple((n - 1) / (m - 1) if m > 1 else 1.0 for n, m in zip(full, level, strict=True))


def downsample(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Smooth ``image (B, C, *S)`` with ``sigma = step / 2`` voxels and resample it (linearly,
    corners aligned) onto a level grid of ``shape``; unchanged if ``shape`` is its own."""
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    steps = level_step(image.shape[2:], shape)
    smooth = gaussian_smooth(image, [s / 2 if s > 1 else 0.0 for s in steps])
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(smooth, size=shape, mode=mode, align_corners=True)
