"""Regularisers of the predicted field ``ddf`` ``(B, ndim, *S)``, voxel units; lower is smoother.

Derivatives are finite differences in voxels, so the values depend on the grid resolution.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regnet.losses.differences import second_difference
from regnet.losses.term import LossTerm, displacement
from regnet.spatial import jacobian_determinant


class Diffusion(LossTerm):
    """First-difference ("diffusion", registry name ``grad``) penalty, as VoxelMorph's ``Grad``.

    ``(1/ndim) sum_a mean |u(x + e_a) - u(x)|^p`` over components and voxels, ``p = 2``
    (``penalty="l2"``) or ``1`` (``"l1"``). For an affine field ``u(x) = A x`` with ``l2`` it is
    ``sum(A^2) / ndim^2``.

    Own implementation rather than MONAI's ``DiffusionLoss``: that uses central differences,
    which are blind to a voxel-wise checkerboard ``u = (-1)^i`` (its value is 0 there, while
    the squared forward differences are 4), and has no L1 option.
    """

    requires = ("ddf",)

    def __init__(self, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"grad penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ddf = displacement(inputs)
        ndim = ddf.shape[1]
        total = ddf.new_zeros(())
        for axis in range(2, 2 + ndim):
            diff = torch.diff(ddf, dim=axis)
            total = total + (diff.abs().mean() if self.penalty == "l1" else (diff * diff).mean())
        return total / ndim


class BendingEnergy(LossTerm):
    """Bending energy ``mean_c [sum_a (d2u_c/dx_a^2)^2 + 2 sum_{a<b} (d2u_c/dx_a dx_b)^2]``.

    The definition and stencils of MONAI's ``BendingEnergyLoss`` (compact 3-point stencils,
    interior voxels, mean over batch, components and voxels; equal values, tested), without its
    deprecated indexing (see :mod:`regnet.losses.differences`). Zero for any affine field; needs
    more than 2 voxels per axis.
    """

    requires = ("ddf",)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ddf = displacement(inputs)
        if min(ddf.shape[2:]) < 3:
            raise ValueError(
                f"bending needs at least 3 voxels per axis, got {tuple(ddf.shape[2:])}"
            )
        axes = range(2, ddf.dim())
        energy = ddf.new_zeros(())
        for a in axes:
            energy = energy + second_difference(ddf, a, a).pow(2).mean()
            for b in axes:
                if b > a:
                    energy = energy + 2.0 * second_difference(ddf, a, b).pow(2).mean()
        return energy


class JacobianFolding(LossTerm):
    """Folding penalty ``mean relu(eps - det J)`` with ``J = I + grad u``.

    ``det J`` from :func:`regnet.spatial.jacobian_determinant` (central differences, one-sided at
    the border). Zero for fields whose determinant stays above ``eps`` (e.g. the identity),
    positive where the transform folds (``det J <= 0``); piecewise linear, so differentiable
    almost everywhere.
    """

    requires = ("ddf",)

    def __init__(self, eps: float = 0.01) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        det = jacobian_determinant(displacement(inputs))
        return torch.relu(self.eps - det).mean()
