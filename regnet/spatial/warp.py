"""Resampling: sampling at voxel coordinates, backward warping, field composition and resizing.

Conventions (DDF layout, units, backward mapping) are those of :mod:`regnet.spatial`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regnet.spatial.gather import gather_sample
from regnet.spatial.grid import (
    axis_scale,
    check_field,
    check_spatial,
    identity_grid,
    normalized_grid,
)

_MODES = {"linear": "bilinear", "nearest": "nearest"}
_PADDINGS = ("border", "zeros", "reflection")


def sample(
    image: torch.Tensor,
    coords: torch.Tensor,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """Sample ``image`` at absolute voxel coordinates.

    Args:
        image: ``(B, C, *S_in)``.
        coords: ``(B, ndim, *S_out)`` voxel coordinates into ``image`` (tensor axis order);
            ``B`` may be 1 to broadcast over the image batch.
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding: value outside the image: ``"border"`` (nearest edge value), ``"zeros"`` or
            ``"reflection"``.

    Returns:
        ``(B, C, *S_out)`` in the dtype of ``image``; the coordinates are used in float32 or
        float64 (never reduced precision), since sub-voxel positions need them.
    """
    ndim = check_spatial(image, "image")
    if coords.dim() != ndim + 2 or coords.shape[1] != ndim:
        raise ValueError(
            f"coords must have shape (B, {ndim}, *spatial) for a {ndim}D image, "
            f"got {tuple(coords.shape)}"
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {list(_PADDINGS)}, got {padding!r}")
    compute_dtype = torch.promote_types(coords.dtype, torch.float32)
    source = image if image.dtype == compute_dtype else image.to(compute_dtype)
    if _gathers(source, coords, mode, padding):
        points = coords.to(compute_dtype).reshape(ndim, -1)
        out = gather_sample(source, points).view(1, source.shape[1], *coords.shape[2:])
        return out if out.dtype == image.dtype else out.to(image.dtype)
    grid = normalized_grid(coords.to(compute_dtype), image.shape[2:])
    if grid.shape[0] != source.shape[0]:
        grid = grid.expand(source.shape[0], *grid.shape[1:])
    out = threaded_grid_sample(source, grid, _MODES[mode], padding)
    return out if out.dtype == image.dtype or not image.is_floating_point() else out.to(image.dtype)


def _gathers(source: torch.Tensor, coords: torch.Tensor, mode: str, padding: str) -> bool:
    """Whether :func:`sample` reads ``source`` with :func:`regnet.spatial.gather.gather_sample`:
    one 3D CPU image (every axis at least 2 voxels), linear with border padding, that needs no
    gradient, at coordinates that do, or with no gradient at all, of one channel. There it beat
    ``grid_sample`` on 2 threads (``python scripts/benchmarks/ops.py``, a 2 mm brain read at
    every voxel, one channel: forward and backward 47 against 191 ms, forward alone 29 against
    60 ms). Where the image needs a gradient too, ``grid_sample`` was
    the faster (3 channels on a half-resolution grid: 24-28 against 31-41 ms, a development
    timing of an earlier version that scattered the image's gradient), and without any
    gradient so were 3 channels (a velocity grid's composition: 8 against 32 ms)."""
    if not (
        source.device.type == "cpu"
        and source.dim() == 5
        and source.shape[0] == 1
        and coords.shape[0] == 1
        and min(source.shape[2:]) >= 2
        and mode == "linear"
        and padding == "border"
    ):
        return False
    grad = torch.is_grad_enabled()
    if grad and coords.requires_grad:
        return not source.requires_grad
    return source.shape[1] == 1 and not (grad and source.requires_grad)


def threaded_grid_sample(
    source: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding: str = "border"
) -> torch.Tensor:
    """``F.grid_sample(source, grid, mode, padding, align_corners=True)``, a 3D CPU sampling of
    one image spread over the threads (:func:`_cpu_chunks`); ``grid`` is ``grid_sample``'s
    normalised grid (:func:`regnet.spatial.grid.normalized_grid`)."""
    chunks = _cpu_chunks(source, grid)
    if chunks > 1:
        return _grid_sample_chunked(source, grid, mode, padding, chunks)
    return F.grid_sample(source, grid, mode=mode, padding_mode=padding, align_corners=True)


MIN_POINTS_PER_THREAD = 4096
"""Fewest sampled points per thread for :func:`sample` to split a 3D CPU sampling."""


def _cpu_chunks(source: torch.Tensor, grid: torch.Tensor) -> int:
    """How many pieces to cut a 3D CPU ``grid_sample`` of one image into (1: none).

    PyTorch's CPU kernel for 3D sampling runs its batch items in parallel but each item on one
    thread, so one image uses one core whatever ``torch.get_num_threads()`` says. Sampling the
    same image (expanded, not copied) at ``k`` slices of the points as a batch of ``k`` uses
    ``k`` threads: a 2 mm brain's MIND descriptors at 137k points took 10.0 ms instead of
    18.7 ms on 2 threads. An image that needs a gradient gets ``k`` full-size gradient copies,
    summed, so it is split only when it holds at most :data:`MAX_GRADIENT_ELEMENTS_PER_POINT`
    elements per sampled point (an SVF's velocity-grid displacement read at a 2 mm brain's
    62k lattice voxels: 5.2 instead of 9.3 ms forward and backward on 2 threads)."""
    if source.device.type != "cpu" or source.dim() != 5 or source.shape[0] != 1:
        return 1
    points = grid[0, ..., 0].numel()
    if source.requires_grad and source.numel() > MAX_GRADIENT_ELEMENTS_PER_POINT * points:
        return 1
    return max(1, min(torch.get_num_threads(), points // MIN_POINTS_PER_THREAD))


MAX_GRADIENT_ELEMENTS_PER_POINT = 16
"""Largest ``source.numel() / points`` for which :func:`_cpu_chunks` splits a sampling whose
image needs a gradient (the gradient copies then cost little next to the sampling)."""


def _grid_sample_chunked(
    source: torch.Tensor, grid: torch.Tensor, mode: str, padding: str, chunks: int
) -> torch.Tensor:
    """``F.grid_sample(source, grid)`` for one 3D image, its points cut into ``chunks`` batch
    items (zero-padded at the end) so that each is sampled on its own thread."""
    out_shape = grid.shape[1:-1]
    points = grid.reshape(-1, 3)
    count = points.shape[0]
    per_chunk = -(-count // chunks)
    if per_chunk * chunks != count:
        points = F.pad(points, (0, 0, 0, per_chunk * chunks - count))
    batch = points.view(chunks, per_chunk, 1, 1, 3)
    images = source.expand(chunks, *source.shape[1:])
    out = F.grid_sample(images, batch, mode=mode, padding_mode=padding, align_corners=True)
    channels = source.shape[1]
    out = out.view(chunks, channels, per_chunk).permute(1, 0, 2).reshape(channels, -1)
    return out[:, :count].reshape(1, channels, *out_shape)


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    mode: str = "linear",
    padding: str = "border",
) -> torch.Tensor:
    """Backward-warp ``image`` with ``ddf``: ``out(x) = image(x + ddf(x))``.

    Args:
        image: ``(B, C, *S)`` moving image on the same grid as the field.
        ddf: ``(B, ndim, *S)`` displacement in voxels, tensor axis order.
        mode, padding: see :func:`sample`.

    Returns:
        ``(B, C, *S)``.
    """
    ndim = check_field(ddf)
    check_spatial(image, "image", ndim)
    if image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"image spatial shape {tuple(image.shape[2:])} differs from ddf spatial shape "
            f"{tuple(ddf.shape[2:])}; resample one of them first"
        )
    dtype = torch.promote_types(ddf.dtype, torch.float32)
    coords = identity_grid(ddf.shape[2:], ddf.device, dtype) + ddf.to(dtype)
    return sample(image, coords, mode=mode, padding=padding)


def warp_labels(
    labels: torch.Tensor,
    ddf: torch.Tensor,
    method: str = "nearest",
    num_classes: int | None = None,
) -> torch.Tensor:
    """Warp an integer label map ``(B, 1, *S)`` with ``ddf``; returns int64 ``(B, 1, *S)``.

    ``method="nearest"`` picks the nearest voxel's label; ``method="onehot"`` linearly
    interpolates one-hot channels (``num_classes`` of them, default ``max + 1``) and takes the
    argmax, which gives smoother boundaries. Outside the image the border label is used.
    """
    if labels.dim() != ddf.dim() or labels.shape[1] != 1:
        raise ValueError(f"labels must have shape (B, 1, *spatial), got {tuple(labels.shape)}")
    if method == "nearest":
        return warp(labels.float(), ddf, mode="nearest").round().long()
    if method != "onehot":
        raise ValueError(f"method must be 'nearest' or 'onehot', got {method!r}")
    k = int(num_classes if num_classes is not None else labels.max().item() + 1)
    onehot = one_hot(labels, k)
    # max().indices is the argmax; on CPU it measured 4-5x faster than argmax() over dim 1
    # (64^3 x 12 channels: 16 ms against 75 ms).
    return warp(onehot, ddf, mode="linear").max(dim=1, keepdim=True).indices


def one_hot(labels: torch.Tensor, num_classes: int, cell: int = 1) -> torch.Tensor:
    """Integer labels ``(B, 1, *S)`` -> float one-hot ``(B, num_classes, *S)``.

    With ``cell = f > 1``: the fraction of each class in cells of ``f`` voxels per axis,
    ``(B, num_classes, *(S // f))`` (cell ``i`` holds voxels ``f i .. f i + f - 1``; trailing
    voxels that fill no whole cell are left out), i.e. the one-hot map average-pooled by ``f``,
    counted directly in one pass over the voxels instead of ``num_classes`` passes.
    """
    labels = labels[:, 0].long().clamp_min(0)
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for {num_classes} classes")
    batch, shape = labels.shape[0], labels.shape[1:]
    if cell == 1:
        out = torch.zeros(batch, num_classes, *shape, device=labels.device)
        return out.scatter_(1, labels.unsqueeze(1), 1.0)
    cells = [n // cell for n in shape]
    labels = labels[(slice(None), *(slice(0, c * cell) for c in cells))]
    index = torch.zeros((), dtype=torch.long, device=labels.device)
    for axis, count in enumerate(cells):
        along = torch.arange(count * cell, device=labels.device) // cell
        index = index * count + along.view(-1, *[1] * (len(cells) - axis - 1))
    ncells = math.prod(cells)
    owner = torch.arange(batch, device=labels.device).view(-1, *[1] * len(cells))
    flat = (owner * num_classes + labels) * ncells + index
    counts = torch.bincount(flat.flatten(), minlength=batch * num_classes * ncells)
    return counts.view(batch, num_classes, *cells).float() / cell ** len(cells)


def compose(u: torch.Tensor, v: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Compose two fields on the same grid: apply ``u`` first, then ``v``.

    ``warp(warp(M, u), v) ≈ warp(M, compose(u, v))``, with
    ``compose(u, v)(x) = v(x) + u(x + v(x))``; ``u`` is resampled once (linear), outside the
    grid by its border value.
    """
    check_field(u, "u")
    check_field(v, "v")
    if u.shape != v.shape and u.shape[2:] != v.shape[2:]:
        raise ValueError(f"cannot compose fields of shapes {tuple(u.shape)} and {tuple(v.shape)}")
    return v + warp(u, v, mode="linear", padding=padding)


def resize_ddf(ddf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a field onto a grid of ``shape`` covering the same extent, rescaling magnitudes.

    Corner voxels stay aligned (``align_corners``), so a displacement of ``d`` voxels along
    axis ``a`` becomes ``d * (shape[a] - 1) / (old[a] - 1)`` voxels of the new grid.
    """
    ndim = check_field(ddf)
    shape = tuple(int(n) for n in shape)
    if len(shape) != ndim:
        raise ValueError(f"shape {shape} must have {ndim} entries for a {ndim}D field")
    old = ddf.shape[2:]
    if tuple(old) == shape:
        return ddf
    mode = "bilinear" if ndim == 2 else "trilinear"
    resized = F.interpolate(ddf, size=shape, mode=mode, align_corners=True)
    factors = [(n - 1) / (o - 1) if o > 1 else 1.0 for n, o in zip(shape, old, strict=True)]
    return resized * axis_scale(factors, ddf.device, ddf.dtype)


class SpatialTransformer(nn.Module):
    """Differentiable backward warp as a module: ``forward(image, ddf) = warp(image, ddf)``."""

    def __init__(self, mode: str = "linear", padding: str = "border") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        self.mode = mode
        self.padding = padding

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return warp(image, ddf, mode=self.mode, padding=self.padding)
