"""Optimisable transformation models: affine (rigid/affine) parameters and deformable fields.

Units: the affine model works in *full-resolution* voxels of the fixed grid (its matrix maps
fixed voxel to moving voxel coordinates, :mod:`regnet.spatial`); B-spline control points hold
full-resolution voxels too, so one control grid serves every pyramid level. Dense fields (DDF
and stationary velocity) live on one pyramid level and hold voxels of that level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regnet.spatial import affine_matrix, bspline_to_ddf, compose, integrate, resize_ddf
from regnet.spatial.affine import image_centre
from regnet.spatial.smooth import gaussian_smooth


class AffineParameters(nn.Module):
    """Rigid (translation + rotation) or affine (+ log-scale, shear) parameters about the image
    centre, with ``spacing`` (mm) so that rotations are rigid in world space.

    Rotation, log-scale and shear are stored multiplied by ``radius`` (half the mean image
    extent, voxels), so one unit of every parameter moves the image border by about one voxel
    and a single Adam learning rate (voxels) suits them all.
    """

    def __init__(
        self,
        shape: Sequence[int],
        kind: str,
        translation: torch.Tensor,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("rigid", "affine"):
            raise ValueError(f"affine kind must be 'rigid' or 'affine', got {kind!r}")
        ndim = len(shape)
        angles = 1 if ndim == 2 else 3
        self.ndim, self.kind = ndim, kind
        self.centre = image_centre(shape)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.radius = max(1.0, sum(n - 1 for n in shape) / (2 * ndim))
        dtype = torch.float32
        self.translation = nn.Parameter(translation.detach().to(dtype).reshape(1, ndim).clone())
        self.rotation = nn.Parameter(torch.zeros(1, angles, device=translation.device))
        if kind == "affine":
            self.log_scale = nn.Parameter(torch.zeros(1, ndim, device=translation.device))
            self.shear = nn.Parameter(torch.zeros(1, angles, device=translation.device))

    def matrix(self) -> torch.Tensor:
        """``(1, ndim+1, ndim+1)`` map from full-resolution fixed to moving voxel coordinates."""
        extra = {}
        if self.kind == "affine":
            extra = {"log_scale": self.log_scale / self.radius, "shear": self.shear / self.radius}
        return affine_matrix(
            self.translation,
            self.rotation / self.radius,
            centre=self.centre,
            spacing=self.spacing,
            **extra,
        )


class BSplineField(nn.Module):
    """Cubic B-spline control points ``(1, ndim, *G)``, displacements in full-resolution voxels,
    on a control grid covering the image (see :mod:`regnet.spatial.bspline`)."""

    def __init__(self, control_points: torch.Tensor) -> None:
        super().__init__()
        self.control_points = nn.Parameter(control_points)

    def forward(self, shape: Sequence[int], step: Sequence[float]) -> torch.Tensor:
        """Displacement ``(1, ndim, *shape)`` in voxels of a level grid ``step`` times coarser."""
        ddf = bspline_to_ddf(self.control_points, shape)
        scale = torch.tensor(step, device=ddf.device, dtype=ddf.dtype)
        return ddf / scale.view(1, -1, *([1] * len(shape)))


class DenseField(nn.Module):
    """A dense field on one pyramid level: ``base + G_sigma * p`` with ``p`` optimised.

    ``base`` ``(1, ndim, *P)`` is the field carried from the coarser level, on the parameter
    grid ``P`` (its voxels). Smoothing the free parameters by a Gaussian of ``sigma`` parameter
    voxels on every evaluation keeps each update smooth (the gradient reaching ``p`` is the
    smoothed similarity gradient).

    Without ``diffeomorphic`` the field is the displacement itself and ``P`` is the level grid.
    With it the field is a stationary velocity on a grid about ``integration_downsize`` times
    coarser than the level's (:func:`velocity_shape`), exponentiated there by scaling and
    squaring (``steps``) and upsampled to the level grid ``shape``, as the networks' SVF head
    does. Keeping the velocity's parameters on that coarse grid, instead of on the level grid
    and resampling them before integrating, leaves the transform family unchanged and makes
    the smoothing and its backward pass 8x cheaper in 3D: on the 4 demo pairs at 2 mm with
    100/60/30 iterations, 0.72x the time per pair, mean Dice 0.472 -> 0.478 and SDlogJ
    0.43 -> 0.35 (smoothing now acts on the velocity's own grid; ``docs/benchmarks.md``,
    "Engine settings").
    """

    def __init__(
        self,
        base: torch.Tensor,
        sigma: float,
        diffeomorphic: bool,
        shape: Sequence[int],
        steps: int = 7,
        exact_gradient: bool = True,
    ) -> None:
        super().__init__()
        self.register_buffer("base", base.detach())
        self.free = nn.Parameter(torch.zeros_like(base))
        self.sigma, self.diffeomorphic, self.steps = float(sigma), diffeomorphic, steps
        self.exact_gradient = exact_gradient
        self.shape = tuple(int(n) for n in shape)
        if not diffeomorphic and tuple(base.shape[2:]) != self.shape:
            raise ValueError(
                f"a displacement field's base {tuple(base.shape[2:])} must lie on the level "
                f"grid {self.shape}"
            )

    def field(self) -> torch.Tensor:
        """The optimised displacement or velocity ``(1, ndim, *P)`` (parameter-grid voxels)."""
        return self.base + gaussian_smooth(self.free, self.sigma)

    def forward(self) -> torch.Tensor:
        """Displacement ``(1, ndim, *shape)`` in level voxels."""
        return resize_ddf(self.displacement(), self.shape)

    def displacement(self) -> torch.Tensor:
        """The displacement on the parameter grid ``(1, ndim, *P)``, in its voxels: the field
        itself, or the velocity's exponential."""
        field = self.field()
        if not self.diffeomorphic:
            return field
        if self.exact_gradient:
            return integrate(field, self.steps)
        return _ExpFirstOrderGradient.apply(field, self.steps)


class _ExpFirstOrderGradient(torch.autograd.Function):
    """``integrate(v, steps)`` whose backward pass treats ``exp(v)`` as ``v``: the gradient with
    respect to the displacement is handed to the velocity unchanged (``D exp(v) ~ I``, exact
    to first order in ``v``), as demons-style SVF methods update the velocity. It skips the
    backward pass of the ``steps`` compositions, the dearest part of an SVF iteration."""

    @staticmethod
    def forward(ctx, velocity: torch.Tensor, steps: int) -> torch.Tensor:
        return integrate(velocity, steps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def velocity_shape(shape: Sequence[int], integration_downsize: int = 2) -> tuple[int, ...]:
    """Grid of a level's stationary velocity: ``ceil(n / integration_downsize)``, at least 4.

    Integrating at half resolution made an SVF registration of a 2 mm demo brain pair 2.3x
    faster (48 s -> 21 s; scaling and squaring's backward pass dominated) at equal Dice (0.429).
    """
    return tuple(max(4, -(-int(n) // integration_downsize)) for n in shape)


def after(initial: torch.Tensor | None, ddf: torch.Tensor) -> torch.Tensor:
    """``ddf`` followed by ``initial`` (point map ``x -> T_initial(x + ddf(x))``), or ``ddf``."""
    return ddf if initial is None else compose(initial, ddf)
