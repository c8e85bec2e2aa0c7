"""The similarity region of a pair whose images hold different content (skull, scalp or neck
on one side only): the fixed foreground near the moving foreground as the start places it.

Conventions (:mod:`regnet.spatial`): images ``(1, C, *S)`` on one grid, matrices map fixed
voxels to moving voxels (backward).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from regnet.optimize.initialize import dilate, foreground_mask
from regnet.spatial import apply_affine, identity_grid, sample

OVERLAP_VOLUME_RATIO = 1.3
"""Foreground volume ratio beyond which ``overlap_margin`` restricts the similarity. Measured on
the working grids of the real-scan benchmark at 2 mm (``docs/benchmarks.md``): 0.94-1.01 for
same-preprocessing pairs, 1.63 for an unstripped fixed and a stripped moving brain, 0.59 the
other way round; 0.91-1.11 on the 4 demo pairs, where restricting the similarity cost 0.03 Dice
(it drops dim tissue outside the Otsu foreground that the pairs share)."""


def overlap_region(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    matrix: torch.Tensor,
    margin: float,
    spacing: Sequence[float] | None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``overlap_margin`` region of :func:`register`: ``(1, 1, *S)`` fixed foreground within
    ``margin`` of the moving foreground placed by ``matrix``, and that moving foreground (on the
    moving image's grid); ``None`` when the foregrounds' volumes agree within
    :data:`OVERLAP_VOLUME_RATIO` (both images hold the same kind of content).

    ``matrix`` ``(1, ndim+1, ndim+1)`` maps fixed voxels to moving voxels (backward, as every
    transform here); ``margin`` is in mm along each axis with ``spacing`` (voxel size in mm per
    tensor axis), in voxels without it, rounded to whole voxels (a box, not a ball)."""

    def foreground(name: str, image: torch.Tensor) -> torch.Tensor:
        return (masks[name] > 0.5).float() if name in masks else foreground_mask(image, 0)

    fixed_fg = foreground("fixed_mask", fixed)
    moving_fg = foreground("moving_mask", moving)
    ratio = float(fixed_fg.sum()) / max(float(moving_fg.sum()), 1.0)
    if 1 / OVERLAP_VOLUME_RATIO <= ratio <= OVERLAP_VOLUME_RATIO:
        return None
    ndim = fixed_fg.dim() - 2
    if "fixed_mask" not in masks:  # the automatic foreground with its outline
        fixed_fg = dilate(fixed_fg, [2] * ndim)
    grid = identity_grid(tuple(fixed.shape[2:]), fixed.device, torch.float32)
    placed = (sample(moving_fg, apply_affine(matrix, grid), padding="zeros") > 0.5).float()
    radius = [max(0, round(margin / step)) for step in (spacing or [1.0] * ndim)]
    return fixed_fg * dilate(placed, radius), moving_fg
