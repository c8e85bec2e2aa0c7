"""Trilinear sampling of one 3D CPU image by gathering its voxels' channel rows.

PyTorch's CPU ``grid_sample`` in 3D reads each channel of each of a point's 8 neighbours
separately (``C`` planes apart in memory) in a scalar loop. Here the image is read as a table
of channel rows, ``(voxels, C)`` (free when the image is stored channels-last, as
:class:`regnet.optimize.sampled.SampledMIND` keeps its descriptors), the two neighbours along the
last axis of each of a point's 4 neighbour pairs come in one row of ``2 C`` values
(overlapping rows of the same table), and the interpolation runs as whole-tensor arithmetic on
chunks of points small enough to stay in cache. Warping an image that needs no gradient,
forward and backward (gradient to the field) on a 2 mm brain's grid, 2 threads (``python
scripts/benchmarks/ops.py --shape 99,117,95 --threads 2 --table monai``; ``docs/benchmarks.md``,
"Operations"): one channel 47 ms against 191 ms through ``grid_sample`` (MONAI's ``Warp``), 12
channels stored channels-last 542 against 787 ms.

Conventions are those of :mod:`regnet.spatial`: voxel coordinates in tensor axis order, linear
interpolation, border padding (outside the grid, the nearest face's value; no gradient to a
coordinate on or beyond a face, as ``grid_sample`` gives none). The image is a constant: the
gradient goes to the coordinates only (where the image needs one too, ``grid_sample``'s
backward pass was the faster; :func:`regnet.spatial.warp._gathers`).
"""

from __future__ import annotations

import torch

CHUNK_POINTS = 1 << 18
"""Most points interpolated at once (for one channel; see :data:`CHUNK_VALUES`)."""

CHUNK_VALUES = 1 << 19
"""Most point-channel values interpolated at once, so that a chunk's indices, fractions and
gathered neighbours (8 per value) stay small. The chunk size matters little: on a 121x145x121
grid, forward and backward on 2 threads, one channel at every voxel took 72-94 ms in chunks of
2**15 to 2**18 points, 12 channels at 265k points 117-128 ms in chunks of 2**12 to 2**15."""


def gather_sample(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, C, I, J, K)`` (every size at least 2; no gradient) read at voxel
    coordinates ``coords`` ``(3, N)``: ``(1, C, N)``, trilinear with border padding,
    differentiable with respect to ``coords``."""
    if image.requires_grad and torch.is_grad_enabled():
        raise ValueError("gather_sample reads a constant image: it passes no gradient to it")
    return _GatherTrilinear.apply(image, coords)


class _GatherTrilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        shape = tuple(image.shape[2:])
        channels = image.shape[1]
        # rows of channels: a view of a channels-last image, else one copy
        table = image[0].permute(1, 2, 3, 0).reshape(-1, channels).contiguous()
        # the neighbours at k and k + 1 of a row: one row of 2 C values (overlapping rows)
        pairs = table.as_strided((table.shape[0] - 1, 2 * channels), (channels, 1))
        need_slopes = ctx.needs_input_grad[1]
        count = coords.shape[1]
        out = table.new_empty(count, channels)
        slopes = table.new_empty(3, count, channels) if need_slopes else None
        rows = _RowIndex(shape, coords.dtype)
        chunk = max(1, min(CHUNK_POINTS, CHUNK_VALUES // channels))
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            points = coords[:, start:stop]
            corner, fraction = rows(points)
            values = pairs.index_select(0, corner.flatten())
            values = values.view(2, 2, stop - start, 2, channels)  # (a, b, point, c, channel)
            _interpolate(
                values,
                fraction.unsqueeze(-1),
                out[start:stop],
                None if slopes is None else slopes[:, start:stop],
            )
            if slopes is not None:  # grid_sample: no gradient to a coordinate on or past a face
                inside = (points > 0) & (points < rows.upper)
                slopes[:, start:stop].mul_(inside.unsqueeze(-1))
        ctx.save_for_backward(slopes)
        return out.t().unsqueeze(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (slopes,) = ctx.saved_tensors
        return None, (slopes * grad_out[0].t()).sum(-1)


class _RowIndex:
    """Table rows of the neighbours of points on a grid of ``shape``: for coordinates ``(3, n)``,
    the rows ``(4, n)`` of the neighbours ``(i + a, j + b, k)`` (``a, b`` in 0, 1; ``a`` slower;
    the neighbour at ``k + 1`` is the next row) and the fractions ``(3, n)`` past ``(i, j, k)``
    of the coordinates clamped to the grid (border padding). Index arithmetic runs in the
    coordinates' float type where it is exact (fewer than 2**24 voxels in float32), as int32
    indices: half the memory traffic of int64."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        voxels = shape[0] * shape[1] * shape[2]
        exact = 2 / torch.finfo(dtype).eps  # every integer up to this is exact
        self.dtype = dtype if voxels <= exact else torch.float64
        self.index_dtype = torch.int32 if voxels < 2**31 else torch.int64
        self.upper = torch.tensor([n - 1 for n in shape], dtype=dtype).view(3, 1)
        stride_i, stride_j = shape[1] * shape[2], shape[2]
        self.strides = torch.tensor([stride_i, stride_j, 1], dtype=self.dtype).view(3, 1)
        self.offsets = torch.tensor(
            [0, stride_j, stride_i, stride_i + stride_j], dtype=self.index_dtype
        ).view(4, 1)

    def __call__(self, coords: torch.Tensor):
        clamped = torch.minimum(coords.clamp_min(0), self.upper)
        lower = torch.minimum(clamped.floor(), self.upper - 1)
        fraction = clamped - lower
        base = (lower.to(self.dtype) * self.strides).sum(0).to(self.index_dtype)
        return base + self.offsets, fraction


def _interpolate(values, fraction, out, slopes) -> None:
    """Trilinear interpolation of the neighbour rows ``values`` ``(2, 2, n, 2, C)`` at
    ``fraction`` ``(3, n, 1)`` into ``out`` ``(n, C)`` and, unless ``None``, the derivatives
    along each axis into ``slopes`` ``(3, n, C)``."""
    along_k = values[..., 1, :] - values[..., 0, :]
    by_k = torch.addcmul(values[..., 0, :], fraction[2], along_k)  # (a, b, n, C)
    along_j = by_k[:, 1] - by_k[:, 0]
    by_j = torch.addcmul(by_k[:, 0], fraction[1], along_j)  # (a, n, C)
    along_i = by_j[1] - by_j[0]
    torch.addcmul(by_j[0], fraction[0], along_i, out=out)
    if slopes is not None:
        slopes[0] = along_i
        torch.lerp(along_j[0], along_j[1], fraction[0], out=slopes[1])
        k_then_i = torch.lerp(along_k[:, 0], along_k[:, 1], fraction[1])
        torch.lerp(k_then_i[0], k_then_i[1], fraction[0], out=slopes[2])
