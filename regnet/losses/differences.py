"""Finite-difference stencils on interior voxels of ``(B, C, *S)`` tensors, in voxel units.

Every function returns the derivative on the interior grid ``S - 2`` (each spatial axis cropped
by one voxel on both sides), so results along different axes can be combined voxel by voxel.
The stencils are MONAI's (``monai.losses.deform``), written with tuple indexing: MONAI's
list-of-slices indexing warns on every call with torch >= 2.9 and is slated to change meaning.
"""

from __future__ import annotations

import torch


def _interior(x: torch.Tensor, shifts: dict[int, int]) -> torch.Tensor:
    """Interior view of ``x`` shifted by ``shifts[axis]`` (-1, 0 or +1) voxels along ``axis``."""
    index = [slice(None), slice(None)]
    for axis in range(2, x.dim()):
        shift = shifts.get(axis, 0)
        index.append(slice(1 + shift, x.shape[axis] - 1 + shift))
    return x[tuple(index)]


def central_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(x[i+1] - x[i-1]) / 2`` along tensor dimension ``axis`` (``>= 2``)."""
    return (_interior(x, {axis: 1}) - _interior(x, {axis: -1})) / 2.0


def second_difference(x: torch.Tensor, axis_a: int, axis_b: int) -> torch.Tensor:
    """Second derivative along tensor dimensions ``axis_a`` and ``axis_b`` (``>= 2``).

    ``x[i+1] - 2 x[i] + x[i-1]`` when equal; else the 4-point mixed stencil
    ``(x[+1,+1] - x[+1,-1] - x[-1,+1] + x[-1,-1]) / 4``.
    """
    if axis_a == axis_b:
        return _interior(x, {axis_a: 1}) - 2.0 * _interior(x, {}) + _interior(x, {axis_a: -1})
    return (
        _interior(x, {axis_a: 1, axis_b: 1})
        - _interior(x, {axis_a: 1, axis_b: -1})
        - _interior(x, {axis_a: -1, axis_b: 1})
        + _interior(x, {axis_a: -1, axis_b: -1})
    ) / 4.0
