"""Trilinear sampling of one 3D CPU image by gathering its voxels' channel rows.

PyTorch's CPU ``grid_sample`` in 3D reads each channel of each of a point's 8 neighbours
separately (``C`` planes apart in memory) in a scalar loop. Here the image is read as a table
of channel rows, ``(voxels, C)`` (free when the image is stored channels-last, as
:class:`regnet.optimize.sampled.SampledMIND` keeps its descriptors), the two neighbours along the
last axis of each of a point's 4 neighbour pairs come in one row of ``2 C`` values
(overlapping rows of the same table), and the interpolation runs as whole-tensor arithmetic.
Warping an image that needs no gradient, forward and backward (gradient to the field) on a
2 mm brain's grid, 2 threads (``python scripts/benchmarks/ops.py --shape 99,117,95 --threads 2
--table monai``; ``docs/benchmarks.md``, "Operations"): one channel 61 ms against 179 ms through
``grid_sample`` (MONAI's ``Warp``), 12 channels stored channels-last 535 against 699 ms.

Conventions are those of :mod:`regnet.spatial`: voxel coordinates in tensor axis order, linear
interpolation, border padding (outside the grid, the nearest face's value; no gradient to a
coordinate beyond the face, as ``grid_sample`` gives none).
"""

from __future__ import annotations

import torch

CHUNK_POINTS = 1 << 18
"""Most points interpolated at once (for one channel; see :data:`CHUNK_VALUES`)."""

CHUNK_VALUES = 1 << 19
"""Most point-channel values interpolated at once: the gathered neighbours (8 per value) stay
small enough to be reused from cache. A 2 mm brain read at every voxel, forward and backward on
2 threads: 12 channels in chunks of 43690 points 476 ms, 21845 points 556 ms, 87381 points 686
ms; one channel in 262144 points 75 ms, 524288 points 109 ms."""


def gather_sample(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, C, I, J, K)`` (every size at least 2) read at voxel coordinates
    ``coords`` ``(3, N)``: ``(1, C, N)``, trilinear with border padding, differentiable with
    respect to both."""
    return _GatherTrilinear.apply(image, coords)


class _GatherTrilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        shape = image.shape[2:]
        channels = image.shape[1]
        # rows of channels: a view of a channels-last image, else one copy
        table = image[0].permute(1, 2, 3, 0).reshape(-1, channels).contiguous()
        upper = torch.tensor([n - 1 for n in shape], dtype=coords.dtype).view(3, 1)
        inside = (coords >= 0) & (coords <= upper)
        clamped = torch.minimum(coords.clamp_min(0), upper)
        lower = torch.minimum(clamped.floor(), upper - 1)
        fraction = clamped - lower
        corner = _corner_rows(lower.long(), shape)
        need_image, need_coords = ctx.needs_input_grad[:2]
        out, slopes = _interpolate(table, corner, fraction, need_coords)
        ctx.shape, ctx.channels = tuple(shape), channels
        ctx.save_for_backward(
            slopes if need_coords else None,
            inside if need_coords else None,
            corner if need_image else None,
            fraction if need_image else None,
        )
        return out.t().unsqueeze(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        slopes, inside, corner, fraction = ctx.saved_tensors
        grad = grad_out[0].t()  # (N, C)
        grad_image = grad_coords = None
        if slopes is not None:
            grad_coords = (slopes * grad).sum(-1) * inside
        if corner is not None:
            grad_image = _scatter(grad, corner, fraction, ctx.shape, ctx.channels)
        return grad_image, grad_coords


def _corner_rows(lower: torch.Tensor, shape) -> torch.Tensor:
    """``(4, N)`` table rows of each point's neighbours ``(i + a, j + b, k)`` for ``a, b`` in
    ``0, 1`` (``a`` slower); the neighbour at ``k + 1`` is the next row."""
    stride_i, stride_j = shape[1] * shape[2], shape[2]
    base = lower[0] * stride_i + lower[1] * stride_j + lower[2]
    offsets = torch.tensor([0, stride_j, stride_i, stride_i + stride_j]).view(4, 1)
    return base + offsets


def _interpolate(table, corner, fraction, need_slopes):
    """Interpolated rows ``(N, C)`` and, if asked, their derivatives along each axis
    ``(3, N, C)``, from the neighbour rows of ``corner``, in chunks of points."""
    count, channels = corner.shape[1], table.shape[1]
    pairs = table.as_strided((table.shape[0] - 1, 2 * channels), (channels, 1))
    out = table.new_empty(count, channels)
    slopes = table.new_empty(3, count, channels) if need_slopes else None
    chunk = max(1, min(CHUNK_POINTS, CHUNK_VALUES // channels))
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        rows = pairs.index_select(0, corner[:, start:stop].reshape(-1))
        values = rows.view(2, 2, stop - start, 2, channels)  # (a, b, point, c, channel)
        f = fraction[:, start:stop].unsqueeze(-1)  # (3, n, 1)
        along_k = values[..., 1, :] - values[..., 0, :]
        by_k = torch.addcmul(values[..., 0, :], f[2], along_k)  # (a, b, n, C)
        along_j = by_k[:, 1] - by_k[:, 0]
        by_j = torch.addcmul(by_k[:, 0], f[1], along_j)  # (a, n, C)
        along_i = by_j[1] - by_j[0]
        torch.addcmul(by_j[0], f[0], along_i, out=out[start:stop])
        if need_slopes:
            slopes[0, start:stop] = along_i
            k_then_i = torch.lerp(along_k[:, 0], along_k[:, 1], f[1])
            torch.lerp(k_then_i[0], k_then_i[1], f[0], out=slopes[2, start:stop])
            torch.lerp(along_j[0], along_j[1], f[0], out=slopes[1, start:stop])
    return out, slopes


def _scatter(grad, corner, fraction, shape, channels):
    """The image's gradient: each point's output gradient added to its 8 neighbours with their
    trilinear weights; ``(1, C, *shape)``."""
    weights_i = torch.stack([1 - fraction[0], fraction[0]])
    weights_j = torch.stack([1 - fraction[1], fraction[1]])
    weights_k = torch.stack([1 - fraction[2], fraction[2]])
    table = grad.new_zeros(shape[0] * shape[1] * shape[2], channels)
    for a in range(2):
        for b in range(2):
            row = corner[2 * a + b]
            for c in range(2):
                weight = (weights_i[a] * weights_j[b] * weights_k[c]).unsqueeze(-1)
                table.index_add_(0, row + c, grad * weight)
    return table.view(*shape, channels).permute(3, 0, 1, 2).unsqueeze(0)
