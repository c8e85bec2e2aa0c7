"""Initial alignment: where the optimisation starts.

Two starts for images on one grid (conventions of :mod:`regnet.spatial`: voxel coordinates,
backward mapping fixed -> moving):

* :func:`centre_of_mass_translation`: the translation superimposing intensity centroids. Cheap,
  but intensity centroids are pulled by whatever one image has and the other lacks (skull, scalp,
  neck, a partial field of view).
* :func:`search_start` (on a pyramid level: :func:`search_level`): a coarse multi-start rigid
  search, as ANTs' ``antsAI`` does. Candidates are rotations on a grid about the *foreground*
  centroid of the fixed image (Otsu mask, :func:`foreground_mask`), moved onto the moving image's
  foreground centroid, plus the unmoved start (the scanner header on a working grid); each is
  scored by the caller's similarity at a coarse level, the best few are polished by a short rigid
  optimisation, and the best polished one wins. Rotations up to about 45 degrees from a grid angle
  are recovered.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from regnet.optimize.levels import Level, LevelHistory, run_adam
from regnet.optimize.transforms import AffineParameters
from regnet.spatial import identity_grid
from regnet.spatial.smooth import gaussian_smooth

SEARCH_ANGLES_DEGREES = (-30.0, 0.0, 30.0)
"""Rotation grid of :func:`search_start`, per rotation axis (3 axes in 3D, 1 in 2D)."""


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


def otsu_threshold(
    values: torch.Tensor, bins: int = 128, low: float | None = None, high: float | None = None
) -> float:
    """Otsu's threshold of a set of intensities: maximises the between-class variance of a
    ``bins``-bin histogram over ``[low, high]`` (default: their minimum and maximum; values
    outside the range are left out)."""
    values = values.detach().flatten().double()
    low = float(values.min()) if low is None else float(low)
    high = float(values.max()) if high is None else float(high)
    if high <= low:
        return low
    counts = torch.histc(values, bins=bins, min=low, max=high)
    centres = low + (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) * (
        (high - low) / bins
    )
    weight = counts.cumsum(0)
    mass = (counts * centres).cumsum(0)
    total_weight, total_mass = weight[-1], mass[-1]
    below, above = weight, total_weight - weight
    mean_below = mass / below.clamp_min(1e-12)
    mean_above = (total_mass - mass) / above.clamp_min(1e-12)
    between = below * above * (mean_below - mean_above) ** 2
    return float(low + (int(between.argmax()) + 1) * (high - low) / bins)


def foreground_mask(image: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """Binary head/object mask of ``image (1, C, *S)``: voxels of the lightly smoothed image above
    half of Otsu's threshold (computed over voxels > 0, so a zero-filled field of view does not
    count), then dilated by ``dilation`` voxels (a cube). Returns ``(1, 1, *S)`` float.

    Half of Otsu's threshold keeps dark tissue inside the head (CSF, skull) in the mask; the
    dilation closes thin dark shells and lets similarity terms see the object's outline."""
    smooth = gaussian_smooth(image.detach().sum(1, keepdim=True).float(), 1.0)
    high = float(smooth.max())
    if high <= 0:
        return torch.zeros_like(smooth)
    # Otsu over the voxels > 0 as a histogram from their minimum up, which leaves the others
    # out without selecting them (selection: 41 of 91 ms on a 1.5 mm brain grid)
    low = float(torch.where(smooth > 0, smooth, high).min())
    mask = (smooth > 0.5 * otsu_threshold(smooth, low=low, high=high)).float()
    return dilate(mask, [dilation] * (image.dim() - 2))


def dilate(mask: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Binary dilation of ``mask (1, 1, *S)`` (float, 0/1) by a box of ``radius`` voxels per axis,
    one axis at a time: a voxel is set where the window ``[i - r, i + r]`` holds a set voxel,
    counted by a running sum (its cost does not grow with ``r``; a 99x117x95 mask on 2 threads:
    8 ms for every radius, against 43 ms at radius 2 and 81 ms at radius 7 for max pooling)."""
    ndim = mask.dim() - 2
    for axis, r in enumerate(radius):
        if r <= 0:
            continue
        dim, size = 2 + axis, mask.shape[2 + axis]
        padding = [0] * (2 * ndim)  # F.pad lists the last axis first: (before, after) pairs
        padding[2 * (ndim - 1 - axis)] = r + 1
        padding[2 * (ndim - 1 - axis) + 1] = r
        running = F.pad((mask > 0.5).float(), padding).cumsum(dim)
        window = running.narrow(dim, 2 * r + 1, size) - running.narrow(dim, 0, size)
        mask = (window > 0.5).float()
    return mask


def rotation_candidates(
    ndim: int, angles_degrees: Sequence[float] = SEARCH_ANGLES_DEGREES
) -> torch.Tensor:
    """Every combination of ``angles_degrees`` about each rotation axis, ``(K, 1 | 3)`` radians
    in the parameterisation of :func:`regnet.spatial.affine_matrix`; the zero rotation first."""
    axes = 1 if ndim == 2 else 3
    radians = [math.radians(a) for a in angles_degrees]
    grid = sorted(itertools.product(radians, repeat=axes), key=lambda r: sum(abs(a) for a in r))
    return torch.tensor(grid, dtype=torch.float32)


def search_start(
    shape: Sequence[int],
    spacing: Sequence[float] | None,
    fixed_centroid: torch.Tensor,
    moving_centroid: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    polish: Callable[[AffineParameters], float],
    *,
    angles_degrees: Sequence[float] = SEARCH_ANGLES_DEGREES,
    keep: int = 3,
) -> AffineParameters:
    """Best rigid start among rotated candidates (module docstring).

    Args:
        shape: full-resolution grid shape; ``spacing`` its voxel size (mm), so rotations are
            rigid in world space.
        fixed_centroid, moving_centroid: ``(ndim,)`` foreground centroids (voxels); a candidate
            with rotation ``R`` maps ``x -> c_m + R (x - c_f)``.
        score: loss (lower is better) of a full-resolution fixed -> moving voxel matrix
            ``(1, ndim+1, ndim+1)``, evaluated without gradient.
        polish: optimises a rigid :class:`AffineParameters` in place, returns its final loss.
        angles_degrees: rotation grid per axis (:func:`rotation_candidates`).
        keep: candidates polished.

    Returns:
        The winning rigid parameters (translation and rotation about the grid centre).
    """
    device = fixed_centroid.device
    ndim = len(shape)
    candidates = []
    for angles in [None, *rotation_candidates(ndim, angles_degrees).to(device)]:
        rigid = AffineParameters(shape, "rigid", torch.zeros(ndim, device=device), spacing)
        if angles is not None:  # rotate about c_f, then carry c_f onto c_m
            with torch.no_grad():
                rigid.rotation.copy_(angles.view(1, -1) * rigid.radius)
                centre_image = rigid.matrix()[0, :ndim, :ndim] @ fixed_centroid.float()
                centre_image = centre_image + rigid.matrix()[0, :ndim, ndim]
                rigid.translation.copy_((moving_centroid.float() - centre_image).view(1, ndim))
        with torch.no_grad():
            candidates.append((float(score(rigid.matrix())), rigid))
    candidates.sort(key=lambda item: item[0])
    polished = [(polish(rigid), rigid) for _, rigid in candidates[:keep]]
    return min(polished, key=lambda item: item[0])[1]


def search_level(
    level: Level,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    spacing: Sequence[float] | None,
    objective: Callable[[Level, torch.Tensor, None], torch.Tensor],
    iterations: int,
    lr: float,
) -> tuple[AffineParameters, LevelHistory]:
    """:func:`search_start` on ``level`` (the coarsest) of full-resolution images ``fixed`` and
    ``moving``: candidates scored and polished (rigid Adam, ``iterations`` steps at ``lr`` voxels
    of the level's grid step) with ``objective(level, matrix, None)``, the affine stage's loss
    of a full-resolution fixed -> moving voxel matrix. Foreground centroids come from ``masks``
    (``fixed_mask``/``moving_mask``) or :func:`foreground_mask`. Returns the winning rigid
    parameters and a record of the polishing steps of all kept candidates."""
    shape = tuple(fixed.shape[2:])
    centroids = [
        centre_of_mass(masks[name] if name in masks else foreground_mask(image)).float()
        for name, image in (("fixed_mask", fixed), ("moving_mask", moving))
    ]
    record = LevelHistory("search", level.index, level.shape)

    def polish(rigid: AffineParameters) -> float:
        steps = LevelHistory("search", level.index, level.shape)
        run_adam(
            list(rigid.parameters()),
            lambda: objective(level, rigid.matrix(), None),
            iterations,
            lr * sum(level.step) / len(level.step),
            steps,
        )
        record.losses.extend(steps.losses)
        record.seconds += steps.seconds
        with torch.no_grad():
            return float(objective(level, rigid.matrix(), None))

    rigid = search_start(
        shape, spacing, *centroids, lambda matrix: objective(level, matrix, None), polish
    )
    return rigid, record
