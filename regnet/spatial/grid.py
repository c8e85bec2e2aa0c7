"""Identity grids and the voxel <-> ``grid_sample`` coordinate conversion.

This is the only module that knows ``grid_sample``'s normalised ``[-1, 1]`` convention (with
``align_corners=True``) and its reversed axis order; everything else works in voxel coordinates
as defined in :mod:`regnet.spatial`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch


def check_spatial(tensor: torch.Tensor, name: str, ndim: int | None = None) -> int:
    """Return the number of spatial dimensions of a ``(B, C, *spatial)`` tensor (2 or 3)."""
    spatial = tensor.dim() - 2
    if spatial not in (2, 3):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) or (B, C, H, W, D), got {tuple(tensor.shape)}"
        )
    if ndim is not None and spatial != ndim:
        raise ValueError(f"{name} has {spatial} spatial dims, expected {ndim}")
    return spatial


def check_field(ddf: torch.Tensor, name: str = "ddf") -> int:
    """Check that ``ddf`` is ``(B, ndim, *spatial)`` with ``ndim`` equal to its spatial rank."""
    ndim = check_spatial(ddf, name)
    if ddf.shape[1] != ndim:
        raise ValueError(
            f"{name} must have shape (B, {ndim}, *spatial) for {ndim}D, got {tuple(ddf.shape)}"
        )
    return ndim


@functools.lru_cache(maxsize=32)
def _cached_identity(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    # A cached tensor made under torch.inference_mode() could never join autograd later.
    with torch.inference_mode(False):
        axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
        return grid.unsqueeze(0)


def identity_grid(
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Voxel coordinates of every voxel, ``(1, ndim, *shape)``; channel ``a`` holds the index
    along tensor axis ``a``. Cached per shape/device/dtype: do not modify in place."""
    return _cached_identity(tuple(int(n) for n in shape), torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _cached_axis_scale(values: tuple[float, ...], device: torch.device, dtype: torch.dtype):
    with torch.inference_mode(False):  # cached: must stay usable by autograd later
        return torch.tensor(values, device=device, dtype=dtype)


def axis_scale(
    values: Sequence[float], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-axis factors shaped ``(1, ndim, 1, ..., 1)`` to multiply a ``(B, ndim, *S)`` field.

    Cached per values/device/dtype, so hot paths (every warp) make no host-to-device copy.
    """
    values = tuple(float(v) for v in values)
    ndim = len(values)
    return _cached_axis_scale(values, torch.device(device), dtype).view(1, ndim, *([1] * ndim))


def normalized_grid(coords: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    """Convert voxel coordinates of an image of spatial size ``in_shape`` to a ``grid_sample`` grid.

    ``coords``: ``(B, ndim, *S_out)`` voxel coordinates (tensor axis order) into the image.
    Returns ``(B, *S_out, ndim)`` in ``[-1, 1]`` with the last dimension reversed, as
    ``grid_sample(..., align_corners=True)`` expects. An axis of size 1 maps to 0.
    """
    ndim = coords.shape[1]
    scale = axis_scale(
        [2.0 / (n - 1) if n > 1 else 0.0 for n in in_shape], coords.device, coords.dtype
    )
    grid = coords * scale - 1.0
    perm = (0, *range(2, ndim + 2), 1)
    return grid.permute(perm).flip(-1)
