"""MIND-SSC compared at sampled fixed voxels, with the moving image's descriptors warped.

The dense ``mind`` term (:class:`regnet.losses.mind.MIND`) recomputes the descriptors of the
warped moving image, over the whole grid, on every evaluation. Here, as in Heinrich's ConvexAdam
and deeds, the descriptors of both images are computed once per pyramid level (the moving image
first resampled through the affine stage's matrix, since MIND-SSC descriptors turn with the
image: in a development version without this, sampled on every level and with no dense
steps, a 20-30 degree pose offset on the real-scan benchmark ended at 1.05 mm EPE instead of
0.33), the moving ones are
*warped* (trilinear, border padding) and the squared descriptor difference is evaluated only at
the fixed voxels where the similarity has weight: the mask's voxels, or without a mask the fixed
foreground (:func:`regnet.optimize.initialize.foreground_mask`) dilated by the descriptor's
reach, outside which both images are background and the dense term is zero. With ``stride`` > 1
the voxels are taken on a lattice of that stride whose offset cycles through all
``stride ** ndim`` offsets from one evaluation to the next, so every voxel is used within a cycle.

The value is normalised as the dense term's: the mean over descriptor channels and over the
grid's voxels (weighted by the mask when one is given), each sampled voxel standing for the
``stride ** ndim`` voxels of its lattice cell; without a mask the background voxels count as
zeros. Warping descriptors instead of recomputing them differs from the dense term where the
field rotates or shears a patch, i.e. to first order in the field's gradient: on coarse levels
this is harmless, on the finest level of strongly deformed pairs it costs accuracy
(``docs/benchmarks.md``, "Sampled MIND"), which is why :func:`regnet.optimize.register` ends
with a few dense steps (``polish_iterations``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from regnet.losses.mind import mind_ssc
from regnet.optimize.initialize import dilate, foreground_mask
from regnet.spatial import apply_affine, identity_grid, sample
from regnet.spatial.grid import axis_scale


class SampledMIND:
    """The ``mind`` similarity of one pyramid level, evaluated at sampled fixed voxels.

    Args:
        fixed, moving: ``(1, C, *S)`` level images on one grid.
        fixed_mask: ``(1, 1, *S)`` weights of the similarity (``None``: every voxel, weight 1).
        moving_mask: ``(1, 1, *S)`` moving-side weights, warped with the moving image (or None).
        matrix: the level's voxel matrix applied before the displacement is sought (or None):
            the moving image and mask are resampled through it once, and their descriptors
            taken there, since MIND-SSC descriptors turn with the image.
        stride: lattice stride in level voxels (1: every voxel of the region). 2 by default:
            in a development comparison (``docs/benchmarks.md``, "Sampled MIND") it matched
            stride 1 within 0.003 Dice and 0.002 mm EPE in about half the time.
        radius, dilation: MIND-SSC patch radius and neighbour distance (voxels).
    """

    def __init__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_mask: torch.Tensor | None,
        moving_mask: torch.Tensor | None,
        matrix: torch.Tensor | None = None,
        stride: int = 2,
        radius: int = 1,
        dilation: int = 2,
    ) -> None:
        if stride < 1:
            raise ValueError(f"sampling stride must be >= 1, got {stride}")
        shape = tuple(fixed.shape[2:])
        self.shape, self.ndim = shape, len(shape)
        with torch.no_grad():
            if matrix is not None:
                points = apply_affine(matrix, identity_grid(shape, fixed.device))
                moving = sample(moving, points, padding="border")
                if moving_mask is not None:
                    moving_mask = sample(moving_mask, points, padding="zeros")
            self.moving_mask = None if moving_mask is None else moving_mask.detach()
            self.fixed_descriptors = mind_ssc(fixed, radius, dilation).flatten(2)[0]  # (E, N)
            self.moving_descriptors = mind_ssc(moving, radius, dilation)  # (1, E, *S)
            if fixed_mask is None:
                reach = radius + 2 * dilation
                region = dilate(foreground_mask(fixed), [reach] * self.ndim)
                weights = region.flatten()
                self.normaliser = float(fixed.shape[2:].numel())
            else:
                weights = fixed_mask.detach().float().flatten()
                self.normaliser = None  # the sampled weights' own total
        self.stride = int(stride)
        self.cell = self.stride**self.ndim
        coords = torch.stack(
            torch.meshgrid(*[torch.arange(n, device=fixed.device) for n in shape], indexing="ij")
        ).flatten(1)  # (ndim, N) voxel indices
        self.samples = []  # per lattice offset: (flat indices, voxel coordinates, weights)
        offsets = itertools.product(range(self.stride), repeat=self.ndim)
        for offset in _spread(list(offsets)):
            on_lattice = weights > 0
            for axis, start in enumerate(offset):
                on_lattice &= coords[axis] % self.stride == start
            index = on_lattice.nonzero().flatten()
            self.samples.append((index, coords[:, index].float(), weights[index]))
        self.evaluations = 0

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        """The similarity for a backward displacement ``u`` followed by the construction's
        ``matrix``: fixed level voxel ``x`` -> moving point ``M (x + u(x))``.

        ``field`` ``(1, ndim, *G)`` is ``u`` on a grid ``G`` covering the level's extent, corner
        voxels aligned (the level grid itself, or e.g. an SVF's coarser velocity grid), in
        voxels of ``G``, components in tensor axis order; off the level grid it is interpolated
        linearly, as :func:`regnet.spatial.resize_ddf` would resample it.
        """
        index, coords, weights = self.samples[self.evaluations % len(self.samples)]
        self.evaluations += 1
        count = index.numel()
        grid = tuple(field.shape[2:])
        if grid == self.shape:
            displacement = field.flatten(2)[0][:, index]
        else:
            ratio = self._ratio(grid, field.device)
            at = (coords * ratio).view(1, self.ndim, count, *([1] * (self.ndim - 1)))
            displacement = sample(field, at, padding="border").view(self.ndim, count) / ratio
        points = (coords + displacement).view(1, self.ndim, count, *([1] * (self.ndim - 1)))
        warped = sample(self.moving_descriptors, points, padding="border").flatten(2)[0]
        squares = (warped - self.fixed_descriptors[:, index]).square().mean(0)
        if self.moving_mask is not None:
            moving_weights = sample(self.moving_mask, points.detach(), padding="zeros")
            weights = weights * moving_weights.flatten()
        total = (squares * weights).sum()
        if self.normaliser is not None:
            return total * (self.cell / self.normaliser)
        return total / weights.sum().clamp_min(1e-12)

    def _ratio(self, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        """``(ndim, 1)`` voxels of ``grid`` per level voxel (corner voxels aligned; cached per
        grid and device, so no host-to-device copy per evaluation)."""
        pairs = zip(grid, self.shape, strict=True)
        ratios = [(g - 1) / (n - 1) if n > 1 else 1.0 for g, n in pairs]
        return axis_scale(ratios, device).view(self.ndim, 1)


def _spread(offsets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Lattice offsets reordered so that consecutive ones differ on every axis where they can
    (bit-reversed order of their index), so a few evaluations already cover the cell evenly."""
    count = len(offsets)
    bits = max(1, (count - 1).bit_length())
    order = sorted(range(count), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [offsets[i] for i in order]
