"""Similarities evaluated at sampled fixed voxels: a :class:`Lattice` of voxels whose offset
cycles, the deformable stage's MIND-SSC with the moving image's descriptors warped
(:class:`SampledMIND`), and the affine stage's pooled terms such as MI (:class:`SampledPooled`).

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
reach, outside which both images are background and the dense term is zero; voxels whose
descriptor reads past a grid face that cuts the object carry no weight (:func:`uncut_region`). With
``stride`` > 1 the voxels are taken on a lattice of that stride whose offset cycles through all
``stride ** ndim`` offsets from one evaluation to the next, so every voxel is used within a cycle.

The value is normalised as the dense term's: the mean over descriptor channels and over the
grid's voxels (weighted by the mask when one is given), each sampled voxel standing for the
``stride ** ndim`` voxels of its lattice cell; without a mask the background voxels count as
zeros. Warping descriptors instead of recomputing them differs from the dense term where the
field rotates or shears a patch, i.e. to first order in the field's gradient. On real scans
that costs nothing measurable (the dense term had the higher end-point error in 7 of 8
scenarios of ``docs/benchmarks.md``, "Real scans"); on strongly sheared synthetic fields and on
label-rendered inter-subject pairs it does, and :func:`regnet.optimize.register` can end the
finest level with a few dense steps (``polish_iterations``).
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
        radius, dilation, sigma: MIND-SSC patch radius, neighbour distance and image
            smoothing (voxels; :func:`regnet.losses.mind.mind_ssc`).
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
        sigma: float | Sequence[float] = 0.0,
    ) -> None:
        shape = tuple(fixed.shape[2:])
        self.shape, self.ndim = shape, len(shape)
        with torch.no_grad():
            if matrix is not None:
                points = apply_affine(matrix, identity_grid(shape, fixed.device))
                moving = sample(moving, points, padding="border")
                if moving_mask is not None:
                    moving_mask = sample(moving_mask, points, padding="zeros")
            self.moving_mask = None if moving_mask is None else moving_mask.detach()
            fixed_descriptors = mind_ssc(fixed, radius, dilation, sigma).flatten(2)[0]  # (E, N)
            moving_descriptors = mind_ssc(moving, radius, dilation, sigma)  # (1, E, *S)
            if self.ndim == 3:  # rows of channels, as regnet.spatial.gather reads them
                moving_descriptors = moving_descriptors.contiguous(
                    memory_format=torch.channels_last_3d
                )
            self.moving_descriptors = moving_descriptors
            reach = radius + 2 * dilation
            foreground = foreground_mask(fixed, 0)
            if fixed_mask is None:  # foreground_mask's own dilation (2), then the reach
                weights = dilate(foreground, [2 + reach] * self.ndim).flatten()
                self.normaliser = float(fixed.shape[2:].numel())
            else:
                weights = fixed_mask.detach().float().flatten()
                self.normaliser = None  # the sampled weights' own total
            # the descriptor's footprint and one voxel for the smoothing before it
            weights = weights * uncut_region(foreground, radius + dilation + 1).flatten()
        self.lattice = Lattice(weights, shape, stride)
        self.cell = self.lattice.cell
        # per lattice offset, the fixed descriptors at its voxels (gathered once, not per call)
        self.fixed_at = [fixed_descriptors[:, index] for index, _, _ in self.lattice.samples]

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        """The similarity for a backward displacement ``u`` followed by the construction's
        ``matrix``: fixed level voxel ``x`` -> moving point ``M (x + u(x))``.

        ``field`` ``(1, ndim, *G)`` is ``u`` on a grid ``G`` covering the level's extent, corner
        voxels aligned (the level grid itself, or e.g. an SVF's coarser velocity grid), in
        voxels of ``G``, components in tensor axis order; off the level grid it is interpolated
        linearly, as :func:`regnet.spatial.resize_ddf` would resample it.
        """
        fixed_at = self.fixed_at[self.lattice.position]
        index, coords, weights = self.lattice.next()
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
        squares = (warped - fixed_at).square().mean(0)
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


CUT_FACE_FRACTION = 0.01
"""A grid face on which at least this fraction of voxels is foreground cuts the object."""


def uncut_region(foreground: torch.Tensor, margin: int) -> torch.Tensor:
    """``(*S)`` float of a foreground mask ``(1, 1, *S)``: 0 within ``margin`` voxels of every
    grid face that cuts the object (:data:`CUT_FACE_FRACTION` of the face is foreground), else 1.

    A fixed voxel's MIND-SSC descriptor reads the patches (radius ``radius``) about its pattern's
    neighbours (``dilation`` voxels away along each axis), so at most ``radius + dilation``
    voxels along any axis; within that of a face part of what it reads is border padding. Over
    air (a head with margins) the padding is what lies beyond, but where the field of view cuts
    the object (a partial field of view, a slab, the neck) those descriptors show an edge the
    moving image does not have there, and matching them pulls the field: on the 1 mm
    partial-field-of-view scan of ``docs/benchmarks.md`` ("Real scans") the 10 mm below the cut
    scored Dice 0.812 against ANTs SyN's 0.832 while the rest scored 0.961 against 0.944.

    The smoothing before the descriptors (anti-aliasing onto the working grid, ``mind_sigma``),
    each replicating the face, widens the affected band by its kernel's reach, so
    :class:`SampledMIND` passes ``radius + dilation + 1`` (4 voxels). On the real-scan benchmark
    (``docs/benchmarks.md``, "The cut-face band"), against the previous 5 voxels: the partial
    field of view's EPE 0.377 -> 0.360 mm at 2 mm (one draw of two; the other unchanged) and
    0.525 -> 0.504 mm with 10-12 mm deformations, 0.209 -> 0.208 mm at 1 mm; the footprint
    alone (3 voxels) raised it at 1 mm (0.219 mm), where anti-aliasing and cubic resampling
    replicate the face."""
    mask = foreground[0, 0]
    keep = torch.ones_like(mask)
    for axis, n in enumerate(mask.shape):
        band = min(margin, n)
        for start in (0, n - 1):
            if float(mask.select(axis, start).mean()) >= CUT_FACE_FRACTION:
                keep.narrow(axis, 0 if start == 0 else n - band, band).zero_()
    return keep


class Lattice:
    """The voxels of a grid where a similarity has weight, on a lattice of stride ``stride``
    whose offset cycles through all ``stride ** ndim`` offsets from one call of :meth:`next` to
    the next (in :func:`_spread` order), so every weighted voxel is used once per cycle.

    Args:
        weights: ``(N,)`` flattened voxel weights of a grid of ``shape``; voxels with weight 0
            are never sampled.
        shape: the grid's shape.
        stride: lattice stride in voxels (1: every weighted voxel on every call).
    """

    def __init__(self, weights: torch.Tensor, shape: Sequence[int], stride: int) -> None:
        if stride < 1:
            raise ValueError(f"sampling stride must be >= 1, got {stride}")
        ndim = len(shape)
        self.stride = int(stride)
        self.cell = self.stride**ndim
        index = (weights > 0).nonzero().flatten()  # the weighted voxels only
        coords = _unravel(index, shape)  # (ndim, M) voxel indices
        code = torch.zeros_like(index)  # each voxel's lattice offset as one number
        for axis in range(ndim):
            code = code * self.stride + coords[axis] % self.stride
        self.samples = []  # per lattice offset: (flat indices, voxel coordinates, weights)
        for offset in _spread(list(itertools.product(range(self.stride), repeat=ndim))):
            value = 0
            for start in offset:
                value = value * self.stride + start
            chosen = (code == value).nonzero().flatten()
            on_lattice = index[chosen]
            self.samples.append((on_lattice, coords[:, chosen].float(), weights[on_lattice]))
        self.calls = 0

    @property
    def position(self) -> int:
        """Index into :attr:`samples` of the offset the next call of :meth:`next` returns."""
        return self.calls % len(self.samples)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(flat index (n,), voxel coordinates (ndim, n) in tensor axis order, weights (n,))``
        of the next offset's voxels."""
        sample = self.samples[self.position]
        self.calls += 1
        return sample


POOLED_TERMS = ("mi", "nmi", "ncc", "mse")
"""Similarity terms that pool voxel values with no neighbourhood (histograms, global
moments), so a sample of voxels estimates them: :class:`SampledPooled` may stand in for them."""


class SampledPooled:
    """A pooled similarity (:data:`POOLED_TERMS`) of an affine stage's level, evaluated at the
    fixed voxels of a :class:`Lattice` of stride 2: only those are warped, binned or summed.

    Mattes MI on a stride-2 lattice is what elastix and ANTs do with their sampling percentages;
    here the samples are the lattice's (one offset per evaluation, every voxel once per 2**ndim
    evaluations), not random, so runs repeat exactly.

    Args:
        fixed, moving: ``(1, C, *S)`` level images on one grid.
        fixed_mask: ``(1, 1, *S)`` weights (``None``: every voxel).
        loss: the stage's composite loss, all of whose terms are in :data:`POOLED_TERMS`.
        stride: lattice stride in voxels.
    """

    def __init__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        fixed_mask: torch.Tensor | None,
        loss,
        stride: int = 2,
    ) -> None:
        shape = tuple(fixed.shape[2:])
        self.ndim, self.moving, self.loss = len(shape), moving, loss
        self.fixed = fixed.detach().flatten(2)  # (1, C, N)
        if fixed_mask is None:
            weights = torch.ones(fixed[0, 0].numel(), device=fixed.device)
        else:
            weights = fixed_mask.detach().float().flatten()
        self.lattice = Lattice(weights, shape, stride)

    def __call__(self, matrix: torch.Tensor) -> torch.Tensor:
        """The loss of the level voxel matrix ``matrix`` ``(1, ndim+1, ndim+1)`` (fixed voxel
        ``x`` -> moving voxel ``A x + t``) at the next lattice offset's voxels."""
        index, coords, weights = self.lattice.next()
        count = index.numel()
        column = (1, -1, count, *([1] * (self.ndim - 1)))  # n voxels as a (1, C, n, 1[, 1]) image
        points = matrix[0, : self.ndim, : self.ndim] @ coords + matrix[0, : self.ndim, self.ndim :]
        warped = sample(self.moving, points.view(1, self.ndim, count, *([1] * (self.ndim - 1))))
        inputs = {
            "fixed": self.fixed[:, :, index].view(column),
            "warped": warped,
            "fixed_mask": weights.view(1, 1, count, *([1] * (self.ndim - 1))),
        }
        return self.loss(inputs)[0]


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(ndim, M)`` voxel indices of flat (C-order) indices ``index`` into a grid of ``shape``.

    ``torch.unravel_index`` imports sympy on its first call, 0.2 s of every command."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return torch.stack(coords[::-1])


def _spread(offsets: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Lattice offsets reordered so that consecutive ones differ on every axis where they can
    (bit-reversed order of their index), so a few evaluations already cover the cell evenly."""
    count = len(offsets)
    bits = max(1, (count - 1).bit_length())
    order = sorted(range(count), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [offsets[i] for i in order]
