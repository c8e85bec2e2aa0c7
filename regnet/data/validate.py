"""Checks that loaded inputs can be registered at all, each failing with one line naming the file.

* An image must hold voxels and not be constant: an all-zero or single-value image has nothing
  to align (similarity measures are undefined on it).
* A mask must select at least one voxel (a non-zero value).
* The fixed and moving **fields of view must overlap in world space** as the headers place them
  (the alignment every registration starts from). A grid's field of view is the parallelepiped
  its voxels cover: voxel indices ``-0.5 .. n - 0.5`` along each axis, mapped to RAS mm by the
  voxel -> world affine. Two fields of view overlap when that intersection has a volume; fields
  that only touch do not overlap.

Shapes are in array axis order; affines are ``(ndim + 1, ndim + 1)`` or, for 2D images placed in
3D scanner space, ``(4, 4)`` (the slice is then one voxel thick along its third column).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from regnet.data.io import DataError


def check_image_content(path: str | Path, data: np.ndarray | torch.Tensor) -> None:
    """Raise :class:`DataError` if the image holds no voxels or every voxel has one value."""
    data = torch.as_tensor(data)
    if data.numel() == 0:
        raise DataError(f"{path}: image holds no voxels (size 0): nothing to register")
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise DataError(f"{path}: image is constant (every voxel is {low:g}): nothing to register")


def check_mask_content(path: str | Path, data: np.ndarray | torch.Tensor) -> None:
    """Raise :class:`DataError` if the mask is empty or selects no voxel (all values 0)."""
    data = torch.as_tensor(data)
    if data.numel() == 0:
        raise DataError(f"{path}: mask holds no voxels (size 0)")
    if not bool((data != 0).any()):
        raise DataError(f"{path}: mask selects no voxel (every value is 0)")


def field_of_view(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A grid's field of view as ``origin`` ``(3,)`` and ``edges`` ``(3, 3)`` (one edge per row),
    RAS mm: the parallelepiped ``origin + t @ edges`` for ``t`` in ``[0, 1]^3``."""
    affine = np.asarray(affine, np.float64)
    shape = [int(n) for n in shape]
    if affine.shape == (3, 3) and len(shape) == 2:  # a 2D grid in the plane z = 0
        affine = np.array(
            [[*affine[0, :2], 0, affine[0, 2]], [*affine[1, :2], 0, affine[1, 2]], [0, 0, 1, 0]]
            + [[0, 0, 0, 1]]
        )
    shape = (shape + [1, 1])[:3]
    columns = affine[:3, :3]
    origin = affine[:3, 3] - 0.5 * columns.sum(axis=1)
    return origin, (columns * np.asarray(shape, np.float64)).T


def _corners(origin: np.ndarray, edges: np.ndarray) -> np.ndarray:
    steps = np.array(list(itertools.product((0.0, 1.0), repeat=3)))
    return origin + steps @ edges


def fields_of_view_overlap(
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
) -> bool:
    """True when the two grids' fields of view intersect with a volume (separating axis test
    on the two parallelepipeds: their face normals and the cross products of their edges)."""
    boxes = [
        field_of_view(fixed_shape, fixed_affine),
        field_of_view(moving_shape, moving_affine),
    ]
    corners = [_corners(*box) for box in boxes]
    (_, edges_a), (_, edges_b) = boxes
    axes = [np.cross(e[i], e[j]) for e in (edges_a, edges_b) for i, j in ((0, 1), (1, 2), (2, 0))]
    axes += [np.cross(a, b) for a in edges_a for b in edges_b]
    scale = max(np.abs(c).max() for c in corners) + max(np.abs(edges_a).max(), 1.0)
    for axis in axes:
        length = np.linalg.norm(axis)
        if length < 1e-9 * scale:
            continue
        a, b = (c @ (axis / length) for c in corners)
        tolerance = 1e-6 * scale
        if a.max() <= b.min() + tolerance or b.max() <= a.min() + tolerance:
            return False
    return True


def _extent(shape: Sequence[int], affine: np.ndarray) -> str:
    corners = _corners(*field_of_view(shape, affine))
    low, high = corners.min(axis=0), corners.max(axis=0)
    return " ".join(f"{n} {a:.1f}..{b:.1f}" for n, a, b in zip("xyz", low, high, strict=True))


def check_overlap(
    fixed_path: str | Path,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_path: str | Path,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
) -> None:
    """Raise :class:`DataError` naming both files when their fields of view do not overlap in
    world space (:func:`fields_of_view_overlap`); the message gives each one's RAS mm extent."""
    if not fields_of_view_overlap(fixed_shape, fixed_affine, moving_shape, moving_affine):
        raise DataError(
            f"{moving_path}: field of view does not overlap that of the fixed image "
            f"{fixed_path} in world space as the headers place them (moving "
            f"{_extent(moving_shape, moving_affine)} mm RAS; fixed "
            f"{_extent(fixed_shape, fixed_affine)}); check the files' affines (origins)"
        )
