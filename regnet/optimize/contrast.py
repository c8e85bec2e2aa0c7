"""``loss="auto"``: the deformable similarity chosen from how the two images relate once the
affine stage has aligned them.

Local correlation (``lncc``) compares intensities, MIND-SSC (``mind``) local self-similarity
patterns. On the real-scan benchmark, where one real brain meets itself (deformed by a known
field, another contrast, preprocessing or pose; ``docs/benchmarks.md``, "Real scans"),
``mind+grad`` had the lower end-point error in every scenario in half the time, and it is the one
that survives a change of contrast. Between different people's brains of one contrast
``lncc+grad`` aligned the tissues far better (``docs/benchmarks.md``, "Real inter-subject
pairs": tissue Dice 0.774 against 0.646 over 30 pairs of six people's slices, ANTs SyN 0.711).

The two cases differ in the local correlation of the aligned images (:func:`local_correlation`):
locally a bias field is a constant factor and a monotone intensity change nearly linear, so one
brain in one contrast scores high, another person's brain (folds in other places) lower, and
another contrast near or below 0. Measured after the affine stage (``register.py``'s defaults):
one brain, one contrast 0.82-0.97 (bias field and noise 0.82; with 10-12 mm deformations
0.75-0.91); two people, one contrast 0.42-0.73 (the six slices' pairs, Colin27 against the ICBM
2009a template) and 0.14-0.45 on the label-rendered demo pairs; T2-like against T1 -0.31 to
-0.94.
"""

from __future__ import annotations

import torch

from regnet.spatial import apply_affine, identity_grid, sample

AUTO = "auto"
"""The ``loss`` value that asks :func:`regnet.optimize.register` to choose."""

SAME_CONTRAST_LOSS = "lncc+grad"
"""One contrast, different anatomy."""
OTHER_CONTRAST_LOSS = "mind+grad"
"""Another contrast, or one anatomy."""

SAME_CONTRAST_CORRELATION = 0.1
"""Smallest local correlation taken for one contrast (below: :data:`OTHER_CONTRAST_LOSS`)."""

SAME_ANATOMY_CORRELATION = 0.8
"""Smallest local correlation taken for one anatomy in one contrast (from here up:
:data:`OTHER_CONTRAST_LOSS`, whose end-point error was the lower there)."""

BLOCK = 8
"""Edge of the cubes of :func:`local_correlation`, voxels."""

MIN_BLOCK_VOXELS = 32
"""Fewest voxels of both objects for a cube to count in :func:`local_correlation`."""


def local_correlation(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    matrix: torch.Tensor | None,
    fixed_region: torch.Tensor,
    moving_region: torch.Tensor,
    block: int = BLOCK,
) -> float:
    """Mean local Pearson correlation of ``fixed`` and ``moving`` ``(1, 1, *S)`` (one grid) over
    the voxels where both show the object: ``fixed_region`` and ``moving_region`` ``(1, 1, *S)``
    (e.g. their foreground masks), the moving image and region sampled through the voxel
    ``matrix`` (fixed voxel -> moving voxel; ``None``: the identity).

    The grid is cut into cubes of ``block`` voxels; each cube with at least
    :data:`MIN_BLOCK_VOXELS` such voxels contributes its correlation, weighted by their number.
    Within a cube a smooth bias field is nearly a constant factor and a monotone intensity change
    nearly linear, so one contrast scores near 1 while T1 against T2 scores near or below 0.
    No such cube, or no intensity variation in any, gives 0."""
    shape = tuple(fixed.shape[2:])
    with torch.no_grad():
        points = identity_grid(shape, fixed.device)
        if matrix is not None:
            points = apply_affine(matrix, points)
        aligned = sample(moving[:, :1], points, padding="zeros")
        aligned_region = sample(moving_region.float(), points, padding="zeros")
        inside = ((fixed_region > 0) & (aligned_region > 0.5)).double()
        a, b, w = (_blocks(x, block) for x in (fixed[:, :1].double(), aligned.double(), inside))
        count = w.sum(1)
        mean_a = (a * w).sum(1) / count.clamp_min(1)
        mean_b = (b * w).sum(1) / count.clamp_min(1)
        da, db = (a - mean_a[:, None]) * w, (b - mean_b[:, None]) * w
        scale = (da.square().sum(1) * db.square().sum(1)).sqrt()
        used = (count >= MIN_BLOCK_VOXELS) & (scale > 0)
        if not bool(used.any()):
            return 0.0
        correlation = (da * db).sum(1)[used] / scale[used]
        return float((correlation * count[used]).sum() / count[used].sum())


def choose_loss(correlation: float) -> str:
    """:data:`SAME_CONTRAST_LOSS` for a local correlation from :data:`SAME_CONTRAST_CORRELATION`
    up to (not including) :data:`SAME_ANATOMY_CORRELATION`, else :data:`OTHER_CONTRAST_LOSS`."""
    if SAME_CONTRAST_CORRELATION <= correlation < SAME_ANATOMY_CORRELATION:
        return SAME_CONTRAST_LOSS
    return OTHER_CONTRAST_LOSS


def _blocks(image: torch.Tensor, block: int) -> torch.Tensor:
    """``(n_blocks, block ** ndim)`` cubes of a ``(1, 1, *S)`` image, zero-padded at the end."""
    spatial = image[0, 0]
    pad = []
    for n in reversed(spatial.shape):
        pad += [0, -n % block]
    spatial = torch.nn.functional.pad(spatial, pad)
    for axis in range(spatial.dim()):
        spatial = spatial.unfold(axis, block, block)
    return spatial.reshape(-1, block ** (image.dim() - 2))
