"""The working grid of ``register.py``: where both images of a pair are compared.

It covers the fixed image's field of view, its axes permuted and flipped to the closest RAS
orientation, at a spacing in mm (:func:`working_grid`, :func:`working_spacing`); images are
resampled onto it in world space, anti-aliased first along axes finer than the grid
(:func:`on_grid`), and their intensities clipped and scaled to [0, 1]
(:func:`scale_intensities`). A voxel matrix found on one working grid carries over to another
over the same images (:func:`carry_matrix`). Affines are voxel -> RAS mm ``(4, 4)``; grid axes
are tensor axes, in RAS order after the reorientation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch

from regnet.pipeline import Volume
from regnet.spatial.cubic import resample_cubic
from regnet.spatial.smooth import gaussian_smooth
from regnet.spatial.world import GRID_AXES, warp_world


def working_grid(
    fixed: Volume, spacing: float | Sequence[float] | None
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine ``(4, 4)`` and shape of the working grid: the fixed image's axes permuted and
    flipped to the closest RAS orientation (as ``nibabel.as_closest_canonical``; 2D: within the
    image plane), resampled to ``spacing`` mm (one number, or one per working-grid axis in RAS
    order; ``None``: keep the fixed spacing) over the same extent, first voxel centre kept
    (corner voxel centres of the fixed image stay on or within half a voxel of the grid)."""
    orientation = _canonical_orientation(fixed)
    reorder = np.eye(4)
    axes = np.ix_(GRID_AXES[fixed.ndim], GRID_AXES[fixed.ndim])
    reorder[axes] = nib.orientations.inv_ornt_aff(orientation, fixed.shape)
    canonical = fixed.affine @ reorder
    shape = [fixed.shape[int(axis)] for axis in orientation[:, 0]]
    columns = canonical[:3, : fixed.ndim]
    old_spacing = np.linalg.norm(columns, axis=0)
    if spacing is None:
        return canonical, tuple(shape)
    new_spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), old_spacing.shape)
    new_shape = [
        max(1, round((n - 1) * s / g) + 1)
        for n, s, g in zip(shape, old_spacing, new_spacing, strict=True)
    ]
    affine = canonical.copy()
    affine[:3, : fixed.ndim] = columns / old_spacing * new_spacing
    return affine, tuple(int(n) for n in new_shape)


def _canonical_orientation(fixed: Volume) -> np.ndarray:
    """``nibabel`` orientation ``(ndim, 2)`` taking the fixed image's axes to the closest RAS
    order: row ``k`` names the image axis that becomes working-grid axis ``k``."""
    axes = np.ix_(GRID_AXES[fixed.ndim], GRID_AXES[fixed.ndim])
    return nib.orientations.io_orientation(fixed.affine[axes])


AUTO_SPACING_MM = (1.5, 2.0)
"""``spacing=auto`` in 3D: along each axis the fixed image's voxel size, clipped to this range. On
the real-scan benchmark at 1 mm (``docs/benchmarks.md``, "Real scans at 1 mm") a 1.5 mm working
grid beat ANTs SyN on Dice and end-point error in every scenario (2 mm trailed it with T2-like
contrast) in about half its time; at 2 mm the inputs' own grid is the working grid. Per axis, a
thick-slice scan's slice axis is worked at 2 mm, not at its in-plane 1.5 mm (1x1x5 mm slices:
see "Real scans at 1 mm"). 2D images keep pixels finer than the upper bound: a slice is small,
and on the real inter-subject slices (``docs/benchmarks.md``, "Real inter-subject pairs") their
own 1 mm grid raised tissue Dice in all 30 pairs (0.774 against 0.758 on 1.5 mm)."""

AUTO_LNCC_SPACING_MM = (1.25, 2.0)
"""``spacing=auto`` in 3D when the deformable similarity is ``lncc`` (two people's brains:
``loss=auto``'s choice, or given): the clip range instead of :data:`AUTO_SPACING_MM`. Between
Colin27 and the ICBM 2009a template at 1 mm (``docs/benchmarks.md``, "``lncc`` on a 1.25 mm
grid") it raised tissue Dice from 0.755 to 0.771, past Greedy's 0.766 on the scans' 1 mm grid,
in 0.39x Greedy's registration time; scans of one brain, where ``auto`` picks ``mind``, keep
1.5 mm (there 1.25 mm cost 1.5-2.3x the time and lost accuracy on thick slices)."""

LNCC_TERM = "lncc"


def working_spacing(
    setting: Any, fixed: Volume, similarity: str | None = None
) -> tuple[float, ...] | float | None:
    """The working grid's spacing (mm) for ``spacing=`` ``setting``: a number, ``None`` (the
    fixed image's own grid) or ``"auto"`` (:data:`AUTO_SPACING_MM`, or
    :data:`AUTO_LNCC_SPACING_MM` for ``similarity`` ``"lncc"``; one value per working-grid axis
    in RAS order; 2D images keep pixels finer than 2 mm)."""
    if setting is None:
        return None
    if setting == "auto":
        low, high = AUTO_LNCC_SPACING_MM if similarity == LNCC_TERM else AUTO_SPACING_MM
        if fixed.ndim == 2:
            low = 0.0
        image_spacing = [fixed.spacing[int(axis)] for axis in _canonical_orientation(fixed)[:, 0]]
        return tuple(min(max(float(s), low), high) for s in image_spacing)
    return float(setting)


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
INTERPOLATIONS = ("linear", "cubic")
"""Resampling of the images onto the working grid (``interpolation=``)."""


def on_grid(
    volume: Volume,
    affine: np.ndarray,
    shape: Sequence[int],
    mode: str = "linear",
    anti_alias: bool = False,
):
    """``volume`` resampled in world space onto a grid, ``(1, 1, *shape)`` float32, zeros
    outside its field of view; ``mode`` ``"linear"``, ``"nearest"`` (labels, masks) or
    ``"cubic"`` (cubic B-splines, which blur less than linear interpolation where the grids do
    not coincide: a rotated or shifted header, another voxel size; where every grid point falls
    on a voxel centre, linear interpolation is used, as it is exact there). With ``anti_alias``,
    image axes finer than the grid's spacing ``g`` along them are first smoothed by a Gaussian of
    FWHM ``sqrt(g^2 - s^2)`` mm (``s`` the axis spacing), so that noise and fine texture do not
    alias onto the coarser grid (:func:`grid_spacing_along`)."""
    data = volume.data.float()  # smoothed in float32, resampled at float64 positions
    if anti_alias:
        targets = grid_spacing_along(affine, volume.affine, volume.ndim)
        sigmas = [
            math.sqrt(max(g**2 - s**2, 0.0)) / FWHM_PER_SIGMA / s
            for g, s in zip(targets, volume.spacing, strict=True)
        ]
        data = gaussian_smooth(data, sigmas)
    axes = np.ix_(GRID_AXES[volume.ndim], GRID_AXES[volume.ndim])
    grid_to_volume = np.linalg.solve(volume.affine[axes], affine[axes])
    on_voxels = np.allclose(grid_to_volume, np.round(grid_to_volume), atol=1e-6)
    if mode == "cubic" and not on_voxels:
        return resample_cubic(data, torch.from_numpy(grid_to_volume), tuple(shape))
    zero = torch.zeros(1, volume.ndim, *shape, dtype=torch.float64)
    mode = "linear" if mode == "cubic" else mode
    return warp_world(data.double(), volume.affine, zero, affine, mode=mode).float()


def grid_spacing_along(grid: np.ndarray, image: np.ndarray, ndim: int) -> list[float]:
    """Spacing (mm) of the grid with voxel -> RAS affine ``grid`` along each axis of the image
    with affine ``image``, in the image's stored axis order: ``sqrt(sum_k cos^2(a_k) g_k^2)``
    over the grid's axes ``k`` (spacing ``g_k``, angle ``a_k`` to the image axis), i.e. ``g_k``
    for an image axis along grid axis ``k``."""
    columns = grid[:3, :ndim]
    spacing = np.linalg.norm(columns, axis=0)
    axes = image[:3, :ndim] / np.linalg.norm(image[:3, :ndim], axis=0)
    cosines = (columns / spacing).T @ axes  # (grid axis, image axis)
    return [float(v) for v in np.sqrt((cosines**2 * spacing[:, None] ** 2).sum(0))]


def scale_intensities(image: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Clip ``image`` to its ``percentiles`` (computed over voxels inside the field of view,
    i.e. non-zero after resampling), the lower one taken no higher than zero, and scale to
    [0, 1].

    Zero is the floor of a magnitude image, and a skull-stripped image's background: clipping
    at the dimmest percent of its brain (CSF, about a quarter of the range on the ICBM
    template) would merge CSF with the background. Before this bound, the rounding of linear
    resampling decided it by accident: it leaves values of 1e-13 around the brain, which pulled
    the lower percentile to zero, while an exact copy of coinciding grids' voxels clipped the
    dimmest percent of the brain."""
    values = image[image != 0]
    if values.numel() == 0:
        return image
    low, high = np.percentile(values.numpy(), [float(p) for p in percentiles])
    low = min(float(low), 0.0)
    if high <= low:
        return (image != 0).float()
    return ((image - low) / (high - low)).clamp(0, 1)


def carry_matrix(matrix: torch.Tensor, source: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """A voxel matrix ``(1, n + 1, n + 1)`` of one working grid (voxel -> RAS affine ``source``)
    expressed on another over the same images (``target``): ``T^-1 S M S^-1 T``."""
    ndim = matrix.shape[-1] - 1
    axes = np.ix_(GRID_AXES[ndim], GRID_AXES[ndim])
    source_grid, target_grid = source[axes], target[axes]
    world = source_grid @ matrix[0].double().cpu().numpy() @ np.linalg.inv(source_grid)
    carried = np.linalg.inv(target_grid) @ world @ target_grid
    return torch.from_numpy(carried).to(matrix)[None]
