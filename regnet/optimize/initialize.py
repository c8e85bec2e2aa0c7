"""Initial alignment: translation that superimposes the intensity centres of mass."""

from __future__ import annotations

import torch

from regnet.spatial import identity_grid


def centre_of_mass(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Intensity-weighted centroid of ``image (1, C, *S)`` in voxel coordinates, ``(ndim,)``.

    Weights are the channel-summed intensities minus their minimum (so they are >= 0), times
    ``mask (1, 1, *S)`` when given; a weightless image gives the grid centre.
    """
    weights = image.detach().sum(1, keepdim=True).double()
    weights = weights - weights.min()
    if mask is not None:
        weights = weights * mask.detach().double()
    grid = identity_grid(image.shape[2:], image.device, torch.float64)
    total = weights.sum()
    if total <= 0:
        return grid.flatten(2).mean(-1)[0]
    return (grid * weights).flatten(2).sum(-1)[0] / total


def centre_of_mass_translation(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Translation ``(ndim,)`` in voxels mapping the fixed centroid onto the moving centroid.

    Images ``(1, C, *S)`` share one grid; with the backward convention of :mod:`regnet.spatial`
    the transform ``x -> x + t`` then carries the fixed centroid to the moving one.
    """
    return centre_of_mass(moving, moving_mask) - centre_of_mass(fixed, fixed_mask)
