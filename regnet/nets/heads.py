"""Output heads: network features -> transformation (dense, stationary velocity, B-spline, affine).

Every head returns a dict whose ``"ddf"`` is ``(B, ndim, *shape)`` on the fixed grid of the
input images, in voxels of that grid (conventions of :mod:`regnet.spatial`), float32.

Dense heads read features from a :class:`~regnet.nets.unet.UNet`, whose output covers the
*padded* grid ``padded_shape`` (the image grid ``shape`` extended at the end of each axis),
possibly at reduced resolution (``field_downsize``). A field on that feature grid is taken to
span the padded grid corner to corner (the :func:`regnet.spatial.resize_ddf` convention), is
resized to ``padded_shape`` and cropped to ``shape``.

The output layers and the geometry (integration, resizing, B-spline evaluation, affine matrices)
run in float32 with autocast disabled, so the heads work inside a bf16/fp16 autocast region and
the fields keep sub-voxel precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regnet.nets.unet import conv_layer
from regnet.spatial import (
    affine_matrix,
    affine_to_ddf,
    bspline_to_ddf,
    control_grid_shape,
    identity_grid,
    integrate,
    resize_ddf,
    sample,
)
from regnet.spatial.grid import axis_scale

TRANSFORMS = ("rigid", "affine")


def float32_geometry(device: torch.device) -> torch.autocast:
    """Context that disables autocast on ``device`` so geometry runs in full precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def to_image_grid(
    field: torch.Tensor, padded_shape: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Field ``(B, ndim, *F)`` spanning the padded grid -> ``(B, ndim, *shape)`` in voxels.

    Resized (magnitudes rescaled) to ``padded_shape`` when ``F`` differs, then cropped to the
    first ``shape`` voxels of each axis.
    """
    field = resize_ddf(field, padded_shape)
    if tuple(field.shape[2:]) == tuple(shape):
        return field
    return field[(slice(None), slice(None), *(slice(0, n) for n in shape))].contiguous()


class FieldConv(nn.Module):
    """3x3(x3) convolution to ``ndim`` channels initialised near zero (weights N(0, 1e-5), zero
    bias, as VoxelMorph), so an untrained network predicts an almost identity transform.

    Runs in float32 even under autocast: its output is the field, and bf16's 8-bit significand
    would round a 20-voxel displacement to steps of 0.125 voxels.
    """

    def __init__(self, ndim: int, in_channels: int) -> None:
        super().__init__()
        self.conv = conv_layer(ndim, in_channels, ndim)
        nn.init.normal_(self.conv.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with float32_geometry(features.device):
            return self.conv(features.float())


class DDFHead(nn.Module):
    """Dense displacement field predicted directly: returns ``{"ddf"}``."""

    def __init__(self, ndim: int, in_channels: int) -> None:
        super().__init__()
        self.field = FieldConv(ndim, in_channels)

    def forward(
        self, features: torch.Tensor, shape: Sequence[int], padded_shape: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        field = self.field(features)
        with float32_geometry(field.device):
            return {"ddf": to_image_grid(field, padded_shape, shape)}


class SVFHead(nn.Module):
    """Stationary velocity field integrated by scaling and squaring (diffeomorphic).

    The velocity is integrated with ``int_steps`` squarings on a grid ``int_downsize`` times
    coarser than the padded image grid (or on the feature grid if that is coarser already),
    then resized to the image grid. Returns ``{"ddf", "velocity"}``, both ``(B, ndim, *shape)``
    in voxels of the image grid (``velocity`` in voxels per unit time).
    """

    def __init__(
        self, ndim: int, in_channels: int, int_steps: int = 7, int_downsize: int = 2
    ) -> None:
        super().__init__()
        if int_steps < 1:
            raise ValueError(f"int_steps must be >= 1 for a diffeomorphic field, got {int_steps}")
        if int(int_downsize) != int_downsize or int_downsize < 1:
            raise ValueError(f"int_downsize must be a positive integer, got {int_downsize}")
        self.field = FieldConv(ndim, in_channels)
        self.int_steps = int(int_steps)
        self.int_downsize = int(int_downsize)

    def forward(
        self, features: torch.Tensor, shape: Sequence[int], padded_shape: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        field = self.field(features)
        with float32_geometry(field.device):
            velocity = field
            integration_shape = tuple(
                min(f, -(-p // self.int_downsize))
                for f, p in zip(velocity.shape[2:], padded_shape, strict=True)
            )
            phi = integrate(resize_ddf(velocity, integration_shape), steps=self.int_steps)
            return {
                "ddf": to_image_grid(phi, padded_shape, shape),
                "velocity": to_image_grid(velocity, padded_shape, shape),
            }


class BSplineHead(nn.Module):
    """Cubic B-spline FFD whose control points are read from dense features.

    A near-zero-initialised convolution predicts a displacement per feature voxel; it is
    box-averaged over one control spacing (separably) and sampled (linearly) at the control
    points' positions, giving ``control_points`` ``(B, ndim, *G)`` with
    ``G = control_grid_shape(shape, control_spacing)`` laid out as in
    :mod:`regnet.spatial.bspline`. Returns ``{"ddf", "control_points"}``.

    Args:
        control_spacing: largest control-point spacing in voxels, one value or one per axis.
    """

    def __init__(
        self, ndim: int, in_channels: int, control_spacing: float | Sequence[float] = 5.0
    ) -> None:
        super().__init__()
        spacing = _per_axis(control_spacing, ndim, "control_spacing")
        if any(s <= 0 for s in spacing):
            raise ValueError(f"control_spacing must be positive, got {control_spacing}")
        self.ndim = ndim
        self.control_spacing = spacing
        self.field = FieldConv(ndim, in_channels)

    def forward(
        self, features: torch.Tensor, shape: Sequence[int], padded_shape: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        field = self.field(features)
        with float32_geometry(field.device):
            grid_shape = control_grid_shape(shape, self.control_spacing)
            # feature-grid voxels per image voxel (corner-aligned with the padded grid)
            ratio = [(f - 1) / (p - 1) for f, p in zip(field.shape[2:], padded_shape, strict=True)]
            field = _box_average(
                field, [s * r for s, r in zip(self.control_spacing, ratio, strict=True)]
            )
            coords = self._control_coords(shape, grid_shape, ratio, field.device)
            # control-point values are displacements in image voxels; the field is in
            # feature-grid voxels, hence the division by ``ratio``
            scale = axis_scale([1.0 / r if r > 0 else 0.0 for r in ratio], field.device)
            points = sample(field, coords) * scale
            return {"ddf": bspline_to_ddf(points, shape), "control_points": points}

    @staticmethod
    def _control_coords(
        shape: Sequence[int],
        grid_shape: Sequence[int],
        ratio: Sequence[float],
        device: torch.device,
    ) -> torch.Tensor:
        """Feature-grid coordinates ``(1, ndim, *G)`` of the control points."""
        ndim = len(shape)
        # control point k sits at image voxel (k - 1) * (n - 1) / (G - 3)
        step = [(n - 1) / (g - 3) * r for n, g, r in zip(shape, grid_shape, ratio, strict=True)]
        step_t = torch.tensor(step, device=device).view(1, ndim, *([1] * ndim))
        return (identity_grid(grid_shape, device) - 1.0) * step_t


class AffineHead(nn.Module):
    """Global average pooling -> linear layer -> rigid or affine matrix about the image centre.

    Parameters (all zero at initialisation, giving exactly the identity): translation in units
    of the image half-extent ``(n - 1) / 2`` per axis, rotation angles in radians, and for
    ``"affine"`` also log-scales and shears (see :func:`regnet.spatial.affine_matrix`). Returns
    ``{"ddf", "matrix"}`` with ``matrix`` ``(B, ndim+1, ndim+1)`` mapping fixed to moving voxel
    coordinates.

    Args:
        transform: ``"rigid"`` (3 DoF in 2D, 6 in 3D) or ``"affine"`` (6 / 12 DoF).
        spacing: voxel size (mm) per axis, so that rotations are rigid in world space on
            anisotropic grids; ``None`` treats voxels as isotropic.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        transform: str = "affine",
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if spacing is not None:
            spacing = _per_axis(spacing, ndim, "spacing")
            if any(s <= 0 for s in spacing):
                raise ValueError(f"spacing must be positive, got {spacing}")
        n_angles = 1 if ndim == 2 else 3
        self.ndim = ndim
        self.transform = transform
        self.spacing = spacing
        self.sizes = {"translation": ndim, "rotation": n_angles}
        if transform == "affine":
            self.sizes.update(log_scale=ndim, shear=n_angles)
        self.linear = nn.Linear(in_channels, sum(self.sizes.values()))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor, shape: Sequence[int]) -> dict[str, torch.Tensor]:
        with float32_geometry(features.device):
            params = self.linear(features.float().flatten(2).mean(dim=-1))
            parts = dict(zip(self.sizes, params.split(list(self.sizes.values()), -1), strict=True))
            half_extent = axis_scale([max(n - 1, 1) / 2.0 for n in shape], params.device)
            parts["translation"] = parts["translation"] * half_extent.flatten(1)
            matrix = affine_matrix(
                **parts,
                ndim=self.ndim,
                centre=[(n - 1) / 2.0 for n in shape],
                spacing=self.spacing,
            )
            return {"ddf": affine_to_ddf(matrix, shape), "matrix": matrix}


def _box_average(field: torch.Tensor, widths: Sequence[float]) -> torch.Tensor:
    """Separable box average with an odd window close to ``widths`` voxels per axis; windows
    are clipped at the border (the mean over the voxels inside)."""
    ndim = field.dim() - 2
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    for axis, width in enumerate(widths):
        size = 2 * math.floor(width / 2) + 1
        if size == 1:
            continue
        kernel = [1] * ndim
        kernel[axis] = size
        padding = [k // 2 for k in kernel]
        field = pool(field, kernel, stride=1, padding=padding, count_include_pad=False)
    return field


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    values = [float(value)] * ndim if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != ndim:
        raise ValueError(f"{name} must be one number or {ndim} numbers, got {value}")
    return tuple(values)
