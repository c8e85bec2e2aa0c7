"""Local normalised cross-correlation (LNCC) with a hand-written backward pass.

Definition (identical to MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular
kernel, ``smooth_nr=0``): with window sums ``S`` over a cubic window of ``w`` voxels per axis
(zero padding, ``N = w**ndim``),

    cross = S[IJ] - S[I] S[J] / N,   var_I = S[II] - S[I]^2 / N,   var_J likewise,
    r = cross^2 / (max(var_I, eps) * max(var_J, eps)),

and the loss is ``-mean(r)``: the negative mean *squared* local correlation, in ``[-1, 0]``,
``-1`` for perfectly (anti-)correlated windows.

Flat windows. In float32 the rounding error of ``S[II] - S[I]^2 / N`` is about
``1e-7 * S[II]``, which exceeds MONAI's ``eps = 1e-5`` already for a constant intensity of 0.5 at
window 9, so on flat regions MONAI returns noise divided by ``eps^2`` (measured: -1.09 for
two constant images 0.7 and 0.3 at 16^3, i.e. ``r > 1``). Here a window is *flat* when either
variance is ``<= max(eps, rtol * S[I]^2 / N)`` with ``rtol = 100 * machine epsilon`` of the dtype
(a relative standard deviation below about 0.35 % in float32), and flat windows contribute
``r = 0``; ``r`` is also clamped to ``<= 1`` (Cauchy-Schwarz). Elsewhere the value is MONAI's.
Zero padding makes windows at the image border see a step, so they are never flat and their
value depends on the intensity offset (as in MONAI): bring intensities to about ``[0, 1]``.

Speed: the five products ``I, J, I^2, J^2, IJ`` are stacked and box-summed together, one axis at
a time by shifted adds; the backward pass applies the same (self-adjoint) box sum to the
gradient maps, only for the inputs that need a gradient. Measured on 2 shared CPU cores, one
5-channel box sum of 160x192x224 volumes, window 9: shifted adds 0.68 s, separable depthwise
``conv3d`` 0.86 s, separable ``avg_pool3d`` 1.21 s, float64 cumulative sums 1.87 s (float32
cumulative sums are 10x less accurate). Forward+backward at 1x1x160x192x224, median of 5
alternating rounds (``python scripts/benchmarks/ops.py``, 2 busy cores): 4.5 s vs 37 s for
MONAI's (8.3x), loss values within 1.2e-7, gradients within 1.5e-11.
"""

from __future__ import annotations

import torch


def _padded_buffer(
    shape: list[int], axis: int, radius: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised buffer of ``shape`` widened by ``radius`` zeros on both sides of ``axis``.

    Returns ``(buffer, interior)``; writing into ``interior`` fills the unpadded part.
    """
    n = shape[axis]
    widened = list(shape)
    widened[axis] += 2 * radius
    buffer = torch.empty(widened, dtype=like.dtype, device=like.device)
    buffer.narrow(axis, 0, radius).zero_()
    buffer.narrow(axis, radius + n, radius).zero_()
    return buffer, buffer.narrow(axis, radius, n)


def _box_sum_padded(padded: torch.Tensor, window: int) -> torch.Tensor:
    """:func:`box_sum` of a tensor whose first spatial axis is already zero-padded by
    ``window // 2`` on both sides. Each axis pass writes straight into a buffer padded for the
    next axis, so no pass copies or fills a whole volume."""
    radius = window // 2
    last = padded.dim() - 1
    source = padded
    for axis in range(2, last + 1):
        n = source.shape[axis] - 2 * radius
        shape = list(source.shape)
        shape[axis] = n
        if axis < last:
            buffer, out = _padded_buffer(shape, axis + 1, radius, source)
        else:
            buffer = out = torch.empty(shape, dtype=source.dtype, device=source.device)
        torch.add(source.narrow(axis, 0, n), source.narrow(axis, 1, n), out=out)
        for offset in range(2, window):
            out.add_(source.narrow(axis, offset, n))
        source = buffer
    return source


def box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum of ``x (B, C, *S)`` over a centred cubic window of ``window`` (odd) voxels per axis.

    Values outside the image count as zero, so the output has the input's shape.
    """
    if window == 1:
        return x.clone()
    buffer, interior = _padded_buffer(list(x.shape), 2, window // 2, x)
    interior.copy_(x)
    return _box_sum_padded(buffer, window)


def fixed_windows(
    fixed: torch.Tensor, window: int, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed image's part of :func:`local_ncc`: its window sums ``S[I]``, its window
    variances ``var_I`` and where they are flat (module docstring), each ``(B, C, *S)``. They do
    not change while only the warped image does, so :class:`regnet.losses.LNCC` keeps them."""
    channels = fixed.shape[1]
    n = float(window ** (fixed.dim() - 2))
    rtol = 100.0 * torch.finfo(fixed.dtype).eps
    shape = [fixed.shape[0], 2 * channels, *fixed.shape[2:]]
    buffer, stacked = _padded_buffer(shape, 2, window // 2, fixed)
    image_i, prod_ii = stacked.split(channels, dim=1)
    image_i.copy_(fixed)
    torch.mul(fixed, fixed, out=prod_ii)
    sums = _box_sum_padded(buffer, window) if window > 1 else stacked.clone()
    s_i, var_i = sums.split(channels, dim=1)
    mean_sq = s_i * s_i / n
    var_i.sub_(mean_sq)  # in place: S[II] -> var_I
    flat = var_i <= mean_sq.mul_(rtol).clamp_min_(eps)
    return s_i, var_i, flat


class _LocalNCC(torch.autograd.Function):
    """``-sum(weight * r)`` with ``r`` the squared local correlation map (module docstring);
    ``windows`` are :func:`fixed_windows` of ``fixed``. The warped image's three window sums
    (``S[J]``, ``S[JJ]``, ``S[IJ]``) are taken together, apart from the fixed image's two: on a
    121x145x121 volume, window 7, 2 CPU threads, one 5-channel box sum took 144 ms and a
    3-channel one 45 ms."""

    @staticmethod
    def forward(ctx, fixed, warped, weight, window, eps, windows):
        channels = fixed.shape[1]
        n = float(window ** (fixed.dim() - 2))
        rtol = 100.0 * torch.finfo(fixed.dtype).eps
        s_i, var_i, flat_i = windows
        shape = [fixed.shape[0], 3 * channels, *fixed.shape[2:]]
        buffer, stacked = _padded_buffer(shape, 2, window // 2, fixed)
        image_j, prod_jj, prod_ij = stacked.split(channels, dim=1)
        image_j.copy_(warped)
        torch.mul(warped, warped, out=prod_jj)
        torch.mul(fixed, warped, out=prod_ij)
        sums = _box_sum_padded(buffer, window) if window > 1 else stacked.clone()
        del buffer, stacked, image_j, prod_jj, prod_ij
        s_j, var_j, cross = sums.split(channels, dim=1)
        # In place: S[JJ] -> var_J, S[IJ] -> cross (saves two volumes).
        mean_sq = s_j * s_j / n
        var_j.sub_(mean_sq)
        flat = flat_i | (var_j <= mean_sq.mul_(rtol).clamp_min_(eps))
        torch.mul(s_i, s_j, out=mean_sq).div_(n)
        cross.sub_(mean_sq)
        ratio = torch.mul(var_i.clamp_min(eps), var_j.clamp_min(eps), out=mean_sq)
        ratio = torch.mul(cross, cross).div_(ratio).masked_fill_(flat, 0.0)
        ctx.save_for_backward(fixed, warped, weight, s_i, var_i, sums, ratio)
        ctx.window, ctx.eps, ctx.n = window, eps, n
        return -(ratio.clamp_max(1.0) * weight).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        fixed, warped, weight, s_i, var_i, sums, ratio = ctx.saved_tensors
        channels = fixed.shape[1]
        s_j, var_j, cross = sums.split(channels, dim=1)
        need_fixed, need_warped = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        window, eps, n = ctx.window, ctx.eps, ctx.n
        # dL/dr, zero on flat windows (r = 0 there by definition) and where r was clamped at 1;
        # off flat windows both variances exceed eps, so no clamp is active.
        g = ((ratio > 0) & (ratio <= 1.0)).to(ratio.dtype).mul_(-grad_out * weight)
        # Gradients with respect to the window sums, written into one padded stack:
        # S[IJ], then S[I], S[II] (if fixed needs a gradient), then S[J], S[JJ] (if warped does).
        count = 1 + 2 * int(need_fixed) + 2 * int(need_warped)
        shape = [fixed.shape[0], count * channels, *fixed.shape[2:]]
        buffer, stacked = _padded_buffer(shape, 2, window // 2, fixed)
        maps = list(stacked.split(channels, dim=1))
        d_cross = maps[0]
        torch.mul(g, cross, out=d_cross).mul_(2.0).div_((var_i * var_j).clamp_min_(eps * eps))
        g.mul_(ratio)  # now g * r, the numerator of dL/dvar
        per_input = ((need_fixed, s_i, s_j, var_i), (need_warped, s_j, s_i, var_j))
        for wanted, s_own, s_other, var in per_input:
            if not wanted:
                continue
            d_sum, d_var = maps[1], maps[2]
            del maps[1:3]
            torch.div(g, var.clamp_min(eps), out=d_var).neg_()
            torch.mul(d_cross, s_other, out=d_sum).addcmul_(d_var, s_own, value=2.0).mul_(-1.0 / n)
        del g, maps, d_cross, stacked
        spread = _box_sum_padded(buffer, window) if window > 1 else buffer.clone()
        del buffer
        spread = list(spread.split(channels, dim=1))
        g_ij = spread.pop(0)
        grad_fixed = grad_warped = None
        if need_fixed:
            g_i, g_ii = spread.pop(0), spread.pop(0)
            grad_fixed = torch.addcmul(g_i, fixed, g_ii, value=2.0).addcmul_(warped, g_ij)
        if need_warped:
            g_j, g_jj = spread.pop(0), spread.pop(0)
            grad_warped = torch.addcmul(g_j, warped, g_jj, value=2.0).addcmul_(fixed, g_ij)
        return grad_fixed, grad_warped, None, None, None, None


def local_ncc(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 9,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Negative mean squared local NCC of two images, in ``[-1, 0]`` (lower is better).

    Args:
        fixed, warped: ``(B, C, *S)``, 2D or 3D, same shape; either may require a gradient.
        window: odd window width in voxels along every axis (VoxelMorph's default is 9).
        eps: lower bound on each window's summed variance (MONAI's ``smooth_dr``).
        mask: optional ``(B|1, 1, *S)`` voxel weights (e.g. a fixed-image mask); the mean over
            voxels becomes a mask-weighted mean.
        windows: :func:`fixed_windows` of ``fixed`` (same dtype, ``window`` and ``eps``), when
            already at hand; else computed here.

    Returns:
        Scalar tensor; double backward is not supported.
    """
    if fixed.shape != warped.shape:
        raise ValueError(
            f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must have the same shape"
        )
    if fixed.dim() not in (4, 5):
        raise ValueError(f"lncc expects (B, C, *S) 2D or 3D images, got {tuple(fixed.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"lncc window must be a positive odd integer, got {window}")
    dtype = torch.promote_types(torch.promote_types(fixed.dtype, warped.dtype), torch.float32)
    fixed, warped = fixed.to(dtype), warped.to(dtype)
    if mask is None:
        weight = torch.full(
            (1,) * fixed.dim(), 1.0 / fixed.numel(), dtype=dtype, device=fixed.device
        )
    else:
        mask = mask.detach().to(dtype).expand(fixed.shape[0], 1, *fixed.shape[2:])
        weight = mask / (mask.sum() * fixed.shape[1]).clamp_min(1e-12)
    if windows is None:
        with torch.no_grad():
            windows = fixed_windows(fixed, int(window), float(eps))
    return _LocalNCC.apply(fixed, warped, weight, int(window), float(eps), windows)
