"""Image similarity terms: ``fixed`` vs ``warped`` ``(B, C, *S)``, 2D or 3D; lower is better.

Every term reads ``fixed`` and ``warped`` and, when the input dict holds it, restricts itself to
``fixed_mask`` ``(B|1, 1, *S)`` (a voxel weight, usually binary). Sign conventions:

* ``mse``: mean squared difference, ``>= 0``.
* ``ncc``: *negative* global Pearson correlation per image and channel, in ``[-1, 1]``.
* ``lncc``: *negative* mean squared local correlation, in ``[-1, 0]`` (MONAI's definition, see
  :mod:`regnet.losses.lncc`).
* ``mi`` / ``nmi``: negative (normalised) mutual information, in nats, from a Mattes joint
  histogram (cubic B-spline Parzen window on the warped image, see :func:`joint_histogram`):
  ``mi`` loss ``-(H(F) + H(W) - H(F, W)) <= 0``; NMI ``(H(F) + H(W)) / H(F, W)`` lies in
  ``[1, 2]``, so the ``nmi`` loss lies in ``[-2, -1]``. Both are stochastic when ``samples`` is
  set.
* ``ngf``: ``1 - mean cos^2`` of the angle between edge-regularised gradients, in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regnet.losses.differences import central_difference
from regnet.losses.lncc import fixed_windows, local_ncc
from regnet.losses.term import LossTerm, image_pair, masked_mean

IMAGE_KEYS = ("fixed", "warped")


class MSE(LossTerm):
    """Mean squared intensity difference (mask-weighted when ``fixed_mask`` is given)."""

    requires = IMAGE_KEYS

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped, mask = image_pair(inputs)
        return masked_mean((fixed - warped) ** 2, mask)


class NCC(LossTerm):
    """Negative global normalised cross-correlation, averaged over batch and channels.

    ``ncc = cov(F, W) / sqrt(max(var(F) var(W), eps))`` over the voxels (inside ``fixed_mask``) of
    each image and channel; the loss is ``-ncc``: ``-1`` when ``W = a F + b`` with ``a > 0``.
    """

    requires = IMAGE_KEYS

    def __init__(self, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped, mask = image_pair(inputs)
        dims = tuple(range(2, fixed.dim()))
        if mask is None:
            mask = torch.ones_like(fixed[:, :1])
        weights = mask.expand(fixed.shape[0], 1, *fixed.shape[2:])
        total = weights.sum(dims, keepdim=True).clamp_min(1e-12)

        def centred(x: torch.Tensor) -> torch.Tensor:
            return x - (x * weights).sum(dims, keepdim=True) / total

        f, w = centred(fixed), centred(warped)
        cov = (f * w * weights).sum(dims) / total.flatten(1)
        var_f = (f * f * weights).sum(dims) / total.flatten(1)
        var_w = (w * w * weights).sum(dims) / total.flatten(1)
        return -(cov / torch.sqrt((var_f * var_w).clamp_min(self.eps))).mean()


class LNCC(LossTerm):
    """Negative mean squared local NCC over ``window``-voxel cubes, in ``[-1, 0]``.

    See :func:`regnet.losses.lncc.local_ncc` for the definition (MONAI's, with flat windows
    counted as 0) and the measured speed. The fixed image's window statistics are kept from one
    call to the next while the same, unmodified fixed tensor comes back (as in every iteration
    of a registration): forward and backward on a 121x145x121 level, window 9, 2 CPU threads,
    90 ms against 114 ms recomputing them (``python scripts/benchmarks/ops.py --shape
    121,145,121 --table similarity``; ``docs/benchmarks.md``, "Operations").
    """

    requires = IMAGE_KEYS

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"lncc window must be a positive odd integer, got {window}")
        self.window = window
        self.eps = eps
        self._fixed_windows: tuple | None = None  # (fixed tensor, its version, windows)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped, mask = image_pair(inputs)
        windows = self._windows(fixed) if fixed.dtype == warped.dtype else None
        return local_ncc(
            fixed, warped, window=self.window, eps=self.eps, mask=mask, windows=windows
        )

    def _windows(self, fixed: torch.Tensor):
        """:func:`regnet.losses.lncc.fixed_windows` of ``fixed``, computed again only for another
        tensor or after an in-place change (``None`` for an image that needs a gradient, is not
        float32/float64 or is an inference-mode tensor, which has no version counter). The
        tensor itself is held, so its memory cannot be reused by another while it is
        remembered."""
        if (
            fixed.requires_grad
            or fixed.is_inference()
            or fixed.dtype not in (torch.float32, torch.float64)
        ):
            return None
        kept = self._fixed_windows
        if kept is None or kept[0] is not fixed or kept[1] != fixed._version:
            with torch.no_grad():
                windows = fixed_windows(fixed, self.window, self.eps)
            kept = self._fixed_windows = (fixed, fixed._version, windows)
        return kept[2]


def _cubic_bspline_weights(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cubic B-spline weights of bins ``floor(p) - 1 .. floor(p) + 2`` at ``t = p - floor(p)``."""
    s = 1.0 - t
    t2 = t * t
    w0 = s * s * s / 6.0
    w3 = t2 * t / 6.0
    w1 = 2.0 / 3.0 - t2 + 3.0 * w3
    return w0, w1, 1.0 - w0 - w1 - w3, w3


def _cubic_bspline_derivatives(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d/dt`` of :func:`_cubic_bspline_weights`."""
    s = 1.0 - t
    t2 = t * t
    d0 = -0.5 * s * s
    d3 = 0.5 * t2
    d1 = 3.0 * d3 - 2.0 * t
    return d0, d1, -(d0 + d1 + d3), d3


class _MattesHistogram(torch.autograd.Function):
    """Unnormalised joint histogram ``(B, n * n)`` of ``fixed, warped (B, M)`` (Mattes kernels).

    ``fixed`` goes to bin ``floor((f - low) * scale)`` (clamped to ``0 .. n - 1``); ``warped`` to
    the 4 bins around position ``p = w * scale + offset`` (clamped to ``[1, n - 2]``) with cubic
    B-spline weights. ``low``, ``scale``, ``offset`` are ``(B, 1)``; ``weights (B, M)`` or
    ``None`` weights the voxels. The backward pass gathers the incoming gradient at the 4 cells
    of each voxel and applies the kernel's derivative (O(M), no ``(M, n)`` intermediate). The
    gradient to ``fixed`` is zero (its kernel is piecewise constant), to ``weights`` not computed.
    """

    @staticmethod
    def forward(
        ctx, fixed, warped, weights, fixed_low, fixed_scale, warped_scale, warped_offset, n
    ):
        batch = fixed.shape[0]
        fixed_bin = ((fixed - fixed_low) * fixed_scale).clamp_(0, n - 1).to(torch.int32)
        position = torch.addcmul(warped_offset, warped, warped_scale)
        inside = (position > 1) & (position < n - 2) if ctx.needs_input_grad[1] else None
        position = position.clamp_(1, n - 2)
        base = position.to(torch.int32).clamp_(max=n - 3)
        t = position.sub_(base)
        # Flat index of the first of the 4 cells: row (b, fixed bin), column base - 1. The last
        # cell, base + 2 <= n - 1, stays in the row, so cell + 3 < batch * n * n.
        rows = torch.arange(batch, device=fixed.device, dtype=torch.int32).unsqueeze(1) * n
        cell = ((fixed_bin + rows) * n - 1).add_(base).flatten()
        del fixed_bin, base
        histogram = torch.zeros(batch * n * n, dtype=warped.dtype, device=warped.device)
        for j, w in enumerate(_cubic_bspline_weights(t)):
            if weights is not None:
                w = w * weights
            histogram[j:].index_add_(0, cell, w.flatten())
        ctx.fixed_shape = fixed.shape if ctx.needs_input_grad[0] else None
        if inside is not None:
            ctx.save_for_backward(cell, t, inside, weights, warped_scale)
        return histogram.view(batch, n * n)

    @staticmethod
    def backward(ctx, grad_histogram):
        grad_fixed = grad_warped = None
        if ctx.fixed_shape is not None:
            grad_fixed = grad_histogram.new_zeros(ctx.fixed_shape)
        if ctx.needs_input_grad[1]:
            cell, t, inside, weights, warped_scale = ctx.saved_tensors
            flat = grad_histogram.contiguous().flatten()
            grad_warped = torch.zeros_like(t)
            for j, d in enumerate(_cubic_bspline_derivatives(t)):
                grad_warped.addcmul_(flat[j:].index_select(0, cell).view_as(t), d)
            grad_warped.mul_(warped_scale).mul_(inside)
            if weights is not None:
                grad_warped.mul_(weights)
        return grad_fixed, grad_warped, None, None, None, None, None, None


def _value_range(
    image: torch.Tensor, value_range: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch-element ``(low, span)``, each ``(B, 1)``, detached."""
    batch = image.shape[0]
    if value_range is None:
        flat = image.detach().reshape(batch, -1)
        low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        return low, (high - low).clamp_min(1e-12)
    low = torch.full((batch, 1), value_range[0], dtype=image.dtype, device=image.device)
    return low, torch.full_like(low, value_range[1] - value_range[0])


def _sample_voxels(
    fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None, samples: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``samples`` random voxel positions per batch element (with replacement, from
    ``torch.randint``), restricted to ``mask > 0``; returns ``fixed, warped (B, C, samples)`` and
    the mask values there ``(B, 1, samples)`` (0 pads an element whose mask has fewer voxels).
    """
    batch, channels = fixed.shape[:2]
    fixed, warped = fixed.flatten(2), warped.flatten(2)
    voxels = fixed.shape[2]
    if mask is None:
        index = torch.randint(voxels, (batch, samples), device=fixed.device)
        values = None
    else:
        flat_mask = mask.flatten(2).expand(batch, 1, voxels)
        index = torch.zeros(batch, samples, dtype=torch.long, device=fixed.device)
        values = torch.zeros(batch, 1, samples, dtype=flat_mask.dtype, device=fixed.device)
        for b in range(batch):
            support = torch.nonzero(flat_mask[b, 0] > 0).flatten()
            if support.numel() <= samples:
                chosen = support
            else:
                chosen = support[torch.randint(support.numel(), (samples,), device=fixed.device)]
            index[b, : chosen.numel()] = chosen
            values[b, 0, : chosen.numel()] = flat_mask[b, 0, chosen]
    gather_index = index.unsqueeze(1).expand(batch, channels, samples)
    return fixed.gather(2, gather_index), warped.gather(2, gather_index), values


def joint_histogram(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_bins: int = 32,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    samples: int | None = None,
) -> torch.Tensor:
    """Joint intensity histogram ``(B, num_bins, num_bins)`` (Mattes), rows = fixed, sums to 1.

    Args:
        fixed, warped: ``(B, C, *S)``; all channels of a batch element share one histogram.
        mask: ``(B|1, 1, *S)`` voxel weights or ``None``.
        num_bins: bins per image, ``>= 4``.
        value_range: ``(low, high)`` binned by both images; ``None``: each image's own min..max
            (detached, per batch element).
        samples: ``None`` uses every voxel; an integer draws that many voxel positions per
            batch element at random (``torch.randint``, with replacement, only where
            ``mask > 0``), so the result is stochastic; reproducible under ``torch.manual_seed``.
            A mask with fewer voxels than ``samples`` contributes each of its voxels once.

    Kernels (Mattes et al. 2003, as in ITK/ANTs/elastix): each ``fixed`` voxel adds its weight to
    one of ``num_bins`` equal-width bins over ``value_range`` (zero-order kernel); each ``warped``
    voxel spreads its weight over the 4 bins nearest its position with cubic B-spline weights,
    with bin centres ``1 .. num_bins - 2`` spanning ``value_range`` (bins ``0`` and
    ``num_bins - 1`` hold only the kernel's tails). Intensities outside ``value_range`` count as
    the nearest end of it (no gradient there). The histogram is differentiable in ``warped``
    (the B-spline is C2); its gradient with respect to ``fixed`` is zero. Work is O(voxels) with
    4 cells per voxel, memory O(voxels); no ``(voxels, num_bins)`` tensor is built.
    """
    if num_bins < 4:
        raise ValueError(f"num_bins must be >= 4, got {num_bins}")
    if samples is not None and samples < 1:
        raise ValueError(f"samples must be None or >= 1, got {samples}")
    if fixed.shape != warped.shape:
        raise ValueError(
            f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must have the same shape"
        )
    batch = fixed.shape[0]
    fixed_low, fixed_span = _value_range(fixed, value_range)
    warped_low, warped_span = _value_range(warped, value_range)
    if samples is not None and samples < fixed[0, 0].numel():
        fixed, warped, mask = _sample_voxels(fixed, warped, mask, samples)
    weights = None
    if mask is not None:
        weights = mask.expand(batch, fixed.shape[1], *fixed.shape[2:]).reshape(batch, -1)
        weights = weights.to(warped.dtype)
    fixed, warped = fixed.reshape(batch, -1), warped.reshape(batch, -1)
    fixed_scale = num_bins / fixed_span
    warped_scale = (num_bins - 3) / warped_span
    histogram = _MattesHistogram.apply(
        fixed,
        warped,
        weights,
        fixed_low,
        fixed_scale,
        warped_scale,
        1.0 - warped_low * warped_scale,
        num_bins,
    )
    if weights is None:
        histogram = histogram / fixed.shape[1]
    else:
        histogram = histogram / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return histogram.view(batch, num_bins, num_bins)


def _entropies(joint: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """``H(F), H(W), H(F, W)`` in nats, each ``(B,)``, of a joint histogram ``(B, n, n)``."""
    p_fixed, p_warped = joint.sum(2), joint.sum(1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p + eps)).flatten(1).sum(1)

    return entropy(p_fixed), entropy(p_warped), entropy(joint)


class MutualInformation(LossTerm):
    """Negative mutual information ``-(H(F) + H(W) - H(F, W))`` (nats), Mattes-style.

    Entropies come from :func:`joint_histogram` (zero-order kernel for ``fixed``, cubic B-spline
    Parzen window for ``warped``; see there for bins and ranges), so the loss is differentiable
    in ``warped`` only. Intensities are assumed to lie roughly in ``value_range`` (default
    ``[0, 1]``); values outside count as its nearest end, with no gradient. ``value_range=None``
    bins each image between its own minimum and maximum (for unnormalised data such as CT in HU).

    ``num_bins`` 32 is the Mattes/ANTs/elastix default. It also held up on coarse pyramid
    levels in a synthetic two-contrast test (13k and 108k voxels, translations of -3..3 voxels):
    one minimum, and a deeper cost than 16 or 24 bins relative to its sampling noise. Fewer
    bins may still pay off where the cost is noisy (a few thousand samples); not measured.
    ``samples`` (default ``None``: every voxel) draws that many random voxels per call
    (elastix's random sampler, ANTs' sampling percentage): cheaper, but the loss becomes
    stochastic, a new draw on every call (reproducible under ``torch.manual_seed``).

    Not MONAI's ``GlobalMutualInformationLoss``: that uses a Gaussian kernel over all bins
    (O(voxels x bins) memory), clamps intensities to ``[0, 1]``, has no mask, sampling or NMI.
    Both agree on which of a set of shifts aligns best (tested); values differ with the kernel.
    """

    requires = IMAGE_KEYS

    def __init__(
        self,
        num_bins: int = 32,
        value_range: tuple[float, float] | None = (0.0, 1.0),
        samples: int | None = None,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if num_bins < 4:
            raise ValueError(f"num_bins must be >= 4, got {num_bins}")
        if value_range is not None:
            if len(value_range) != 2 or not value_range[1] > value_range[0]:
                raise ValueError(
                    f"value_range must be (low, high) with high > low, got {value_range}"
                )
            value_range = (float(value_range[0]), float(value_range[1]))
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be None or >= 1, got {samples}")
        self.num_bins = num_bins
        self.value_range = value_range
        self.samples = samples
        self.eps = eps

    def entropies(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``H(F), H(W), H(F, W)``, each ``(B,)``."""
        fixed, warped, mask = image_pair(inputs)
        dtype = torch.promote_types(torch.promote_types(fixed.dtype, warped.dtype), torch.float32)
        joint = joint_histogram(
            fixed.to(dtype),
            warped.to(dtype),
            mask,
            num_bins=self.num_bins,
            value_range=self.value_range,
            samples=self.samples,
        )
        return _entropies(joint, self.eps)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h_fixed, h_warped, h_joint = self.entropies(inputs)
        return -(h_fixed + h_warped - h_joint).mean()

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, value_range={self.value_range}, samples={self.samples}"


class NormalizedMutualInformation(MutualInformation):
    """Negative normalised mutual information ``-(H(F) + H(W)) / H(F, W)``, in ``[-2, -1]``.

    Same histogram and options as :class:`MutualInformation`; ``-2`` needs ``H(F, W) = H(F) =
    H(W)``, which the warped image's B-spline spreading never reaches (an image with itself
    scores about ``-1.5`` at 32 bins).
    """

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h_fixed, h_warped, h_joint = self.entropies(inputs)
        return -((h_fixed + h_warped) / h_joint.clamp_min(self.eps)).mean()


class NGF(LossTerm):
    """Normalised gradient fields (Haber and Modersitzki 2006), for multi-modal edges.

    With central-difference gradients ``g_F, g_W`` (per channel, interior voxels) and edge
    parameter ``eps`` (intensity units per voxel; gradients much smaller count as noise),
    ``cos^2 = (g_F . g_W + eps^2)^2 / ((|g_F|^2 + eps^2)(|g_W|^2 + eps^2))`` and the loss is
    ``mean(1 - cos^2)`` in ``[0, 1]``: exactly 0 for identical images (flat regions included),
    about 0 where edges are parallel or antiparallel with ``|g| >> eps`` (inverted contrast
    costs ``O(eps^2 / |g|^2)``), 1 where they are orthogonal.
    """

    requires = IMAGE_KEYS

    def __init__(self, eps: float = 0.01) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"ngf eps must be > 0, got {eps}")
        self.eps = eps

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped, mask = image_pair(inputs)
        if min(fixed.shape[2:]) < 3:
            raise ValueError(f"ngf needs at least 3 voxels per axis, got {tuple(fixed.shape[2:])}")
        eps2 = self.eps**2
        dims = range(2, fixed.dim())
        grad_fixed = [central_difference(fixed, d) for d in dims]
        grad_warped = [central_difference(warped, d) for d in dims]
        dot = sum(a * b for a, b in zip(grad_fixed, grad_warped, strict=True)) + eps2
        norm_fixed = sum(a * a for a in grad_fixed) + eps2
        norm_warped = sum(b * b for b in grad_warped) + eps2
        misalignment = 1.0 - dot * dot / (norm_fixed * norm_warped)
        if mask is not None:
            mask = mask[(slice(None), slice(None)) + (slice(1, -1),) * (fixed.dim() - 2)]
        return masked_mean(misalignment, mask)
