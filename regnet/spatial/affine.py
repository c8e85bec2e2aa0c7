"""Affine transforms in voxel coordinates: parameterisation, application, conversion to a DDF.

A ``matrix`` is homogeneous ``(B, ndim+1, ndim+1)`` (or its top ``(B, ndim, ndim+1)`` rows) and
maps *fixed* voxel coordinates to *moving* voxel coordinates (backward, see
:mod:`regnet.spatial`): ``y = A x + t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from regnet.spatial.grid import identity_grid


def homogeneous(matrix: torch.Tensor) -> torch.Tensor:
    """Return ``matrix`` as ``(B, ndim+1, ndim+1)``, appending the ``[0 .. 0 1]`` row if needed."""
    if matrix.dim() != 3 or matrix.shape[-1] not in (3, 4):
        raise ValueError(
            f"matrix must have shape (B, ndim+1, ndim+1) or (B, ndim, ndim+1) with ndim 2 or 3, "
            f"got {tuple(matrix.shape)}"
        )
    ndim = matrix.shape[-1] - 1
    if matrix.shape[1] == ndim + 1:
        return matrix
    if matrix.shape[1] != ndim:
        raise ValueError(
            f"matrix of shape {tuple(matrix.shape)} is neither (B,n,n+1) nor (B,n+1,n+1)"
        )
    last = torch.zeros(matrix.shape[0], 1, ndim + 1, device=matrix.device, dtype=matrix.dtype)
    last[..., -1] = 1
    return torch.cat([matrix, last], dim=1)


def apply_affine(matrix: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Apply ``y = A x + t`` to voxel coordinates ``coords`` ``(B, ndim, *S)`` (B may be 1)."""
    matrix = homogeneous(matrix)
    ndim = matrix.shape[-1] - 1
    if coords.shape[1] != ndim:
        raise ValueError(f"coords {tuple(coords.shape)} do not fit a {ndim}D matrix")
    linear = matrix[:, :ndim, :ndim].to(coords.dtype)
    shift = matrix[:, :ndim, ndim].to(coords.dtype)
    flat = coords.flatten(2)
    out = torch.matmul(linear, flat) + shift.unsqueeze(-1)
    return out.view(out.shape[0], ndim, *coords.shape[2:])


def affine_to_ddf(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """DDF ``(B, ndim, *shape)`` of an affine matrix: ``u(x) = A x + t - x`` (voxels)."""
    matrix = homogeneous(matrix)
    ndim = matrix.shape[-1] - 1
    if len(shape) != ndim:
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims, matrix is {ndim}D")
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    grid = identity_grid(shape, matrix.device, dtype)
    return apply_affine(matrix.to(dtype), grid) - grid


def _rotation(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rotation matrices ``(B, ndim, ndim)`` from angles in radians.

    2D: one angle, rotating axis 0 towards axis 1. 3D: three angles ``(a0, a1, a2)`` about tensor
    axes 0, 1, 2, applied in that order: ``R = R2 @ R1 @ R0``.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    batch = angles.shape[0]
    if ndim == 2:
        c, s = cos[:, 0], sin[:, 0]
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    one = torch.ones(batch, device=angles.device, dtype=angles.dtype)
    zero = torch.zeros_like(one)

    def plane(c: torch.Tensor, s: torch.Tensor, a: int, b: int) -> torch.Tensor:
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[a][a], rows[a][b], rows[b][a], rows[b][b] = c, -s, s, c
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    r0 = plane(cos[:, 0], sin[:, 0], 1, 2)
    r1 = plane(cos[:, 1], sin[:, 1], 2, 0)
    r2 = plane(cos[:, 2], sin[:, 2], 0, 1)
    return r2 @ r1 @ r0


def _shear(shear: torch.Tensor, ndim: int) -> torch.Tensor:
    """Upper-triangular shear ``(B, ndim, ndim)``: 2D ``(s01,)``, 3D ``(s01, s02, s12)``."""
    batch = shear.shape[0]
    out = torch.eye(ndim, device=shear.device, dtype=shear.dtype).repeat(batch, 1, 1)
    rows, cols = torch.triu_indices(ndim, ndim, offset=1)
    out[:, rows, cols] = shear
    return out


def affine_matrix(
    translation: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    log_scale: torch.Tensor | None = None,
    shear: torch.Tensor | None = None,
    *,
    ndim: int | None = None,
    centre: Sequence[float] | torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """Build ``(B, ndim+1, ndim+1)`` voxel matrices from parameters, about ``centre``.

    ``x -> c + t + D⁻¹ R Sh S D (x - c)`` with ``translation`` t ``(B, ndim)`` in voxels,
    ``rotation`` ``(B, 1)`` in 2D or ``(B, 3)`` in 3D in radians (see :func:`_rotation`),
    ``log_scale`` ``(B, ndim)`` (scale ``exp``), ``shear`` ``(B, 1)`` in 2D or ``(B, 3)`` in 3D,
    ``centre`` in voxel coordinates (default the origin; pass ``(n - 1) / 2`` per axis for the
    image centre), and ``spacing`` the voxel size (mm) so that rotations are rigid in world
    space on anisotropic grids (``D = diag(spacing)``). Omitted parameters are identity.
    With only ``translation`` and ``rotation`` this is the rigid (6 DoF in 3D) model; all four
    give the 12 DoF affine model. Differentiable in every parameter.
    """
    given = [p for p in (translation, rotation, log_scale, shear) if p is not None]
    if ndim is None:
        if translation is not None or log_scale is not None:
            ndim = (translation if translation is not None else log_scale).shape[-1]
        elif given:
            ndim = 2 if given[0].shape[-1] == 1 else 3
        else:
            raise ValueError("affine_matrix needs ndim when no parameter is given")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    n_angles = 1 if ndim == 2 else 3
    ref = given[0] if given else torch.zeros(1, ndim)
    batch, device = ref.shape[0], ref.device
    dtype = torch.promote_types(ref.dtype, torch.float32)

    def param(value: torch.Tensor | None, size: int, name: str) -> torch.Tensor:
        if value is None:
            return torch.zeros(batch, size, device=device, dtype=dtype)
        if value.dim() != 2 or value.shape != (batch, size):
            raise ValueError(f"{name} must have shape ({batch}, {size}), got {tuple(value.shape)}")
        return value.to(dtype)

    t = param(translation, ndim, "translation")
    linear = _rotation(param(rotation, n_angles, "rotation"), ndim)
    linear = linear @ _shear(param(shear, n_angles, "shear"), ndim)
    linear = linear @ torch.diag_embed(torch.exp(param(log_scale, ndim, "log_scale")))
    if spacing is not None:
        d = torch.as_tensor(spacing, device=device, dtype=dtype)
        linear = (1.0 / d).view(1, ndim, 1) * linear * d.view(1, 1, ndim)
    c = torch.zeros(ndim, device=device, dtype=dtype)
    if centre is not None:
        c = torch.as_tensor(centre, device=device, dtype=dtype).reshape(ndim)
    shift = c + t - torch.matmul(linear, c)
    top = torch.cat([linear, shift.unsqueeze(-1)], dim=-1)
    return homogeneous(top)


def image_centre(shape: Sequence[int]) -> list[float]:
    """Voxel coordinates of the centre of a grid of ``shape``: ``(n - 1) / 2`` per axis."""
    return [(n - 1) / 2.0 for n in shape]


def matrix_from_ddf(ddf: torch.Tensor) -> torch.Tensor:
    """Least-squares affine matrix ``(B, ndim+1, ndim+1)`` best explaining ``x -> x + u(x)``."""
    dtype = torch.float64
    grid = identity_grid(ddf.shape[2:], ddf.device, dtype).flatten(2)[0].T  # (N, ndim)
    design = torch.cat([grid, torch.ones(grid.shape[0], 1, device=ddf.device, dtype=dtype)], 1)
    target = (grid.T.unsqueeze(0) + ddf.to(dtype).flatten(2)).transpose(1, 2)  # (B, N, ndim)
    solution = torch.linalg.lstsq(design.expand(ddf.shape[0], -1, -1), target).solution
    return homogeneous(solution.transpose(1, 2)).to(ddf.dtype)


def rotation_angle_degrees(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation angle (degrees) of the orthogonal part of each matrix's linear block, ``(B,)``."""
    ndim = matrix.shape[-1] - 1
    u, _, vh = torch.linalg.svd(matrix[:, :ndim, :ndim].double())
    rot = u @ vh
    trace = rot.diagonal(dim1=-2, dim2=-1).sum(-1)
    cos = (trace - 1) / 2 if ndim == 3 else trace / 2
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1))).to(matrix.dtype)
