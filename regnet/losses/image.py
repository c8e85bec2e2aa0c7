"""Image similarity terms: ``fixed`` vs ``warped`` ``(B, C, *S)``, 2D or 3D; lower is better.

Every term reads ``fixed`` and ``warped`` and, when the input dict holds it, restricts itself to
``fixed_mask`` ``(B|1, 1, *S)`` (a voxel weight, usually binary). Sign conventions:

* ``mse``: mean squared difference, ``>= 0``.
* ``ncc``: *negative* global Pearson correlation per image and channel, in ``[-1, 1]``.
* ``lncc``: *negative* mean squared local correlation, in ``[-1, 0]`` (MONAI's definition, see
  :mod:`regnet.losses.lncc`).
* ``mi`` / ``nmi``: negative (normalised) mutual information from Parzen-window histograms; NMI
  ``(H(F) + H(W)) / H(F, W)`` lies in ``[1, 2]``, so the ``nmi`` loss lies in ``[-2, -1]``.
* ``ngf``: ``1 - mean cos^2`` of the angle between edge-regularised gradients, in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regnet.losses.differences import central_difference
from regnet.losses.lncc import local_ncc
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
    counted as 0) and the measured speed.
    """

    requires = IMAGE_KEYS

    def __init__(self, window: int = 9, eps: float = 1e-5) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"lncc window must be a positive odd integer, got {window}")
        self.window = window
        self.eps = eps

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped, mask = image_pair(inputs)
        return local_ncc(fixed, warped, window=self.window, eps=self.eps, mask=mask)


def joint_histogram(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None,
    num_bins: int,
    sigma_ratio: float,
    value_range: tuple[float, float] | None,
) -> torch.Tensor:
    """Differentiable joint intensity histogram ``(B, num_bins, num_bins)``, rows = fixed.

    Bin centres evenly span ``value_range`` (``None``: each image's own min..max, detached).
    Each voxel spreads unit mass over the bins with Gaussian weights of width ``sigma_ratio``
    bin spacings, normalised per voxel (a softmax, so intensities outside ``value_range`` land
    in the edge bins and never give NaN; beyond one bin spacing outside they are clamped).
    Voxels are weighted by ``mask``; each histogram sums to 1.
    """
    batch = fixed.shape[0]
    centres = torch.arange(num_bins, dtype=fixed.dtype, device=fixed.device)

    def parzen(image: torch.Tensor) -> torch.Tensor:
        x = image.reshape(batch, -1, 1)
        if value_range is None:
            low = x.detach().amin(1, keepdim=True)
            span = (x.detach().amax(1, keepdim=True) - low).clamp_min(1e-12)
        else:
            low, span = value_range[0], value_range[1] - value_range[0]
        # Intensity in units of bin spacings, so bin centres are at 0 .. num_bins - 1.
        position = ((x - low) * ((num_bins - 1) / span)).clamp(-1.0, float(num_bins))
        return torch.softmax(-((position - centres) ** 2) / (2.0 * sigma_ratio**2), dim=-1)

    weights_fixed = parzen(fixed)
    weights_warped = parzen(warped)
    if mask is None:
        voxel_weights = torch.full_like(weights_fixed[..., :1], 1.0 / weights_fixed.shape[1])
    else:
        voxel_weights = mask.expand(batch, fixed.shape[1], *fixed.shape[2:]).reshape(batch, -1, 1)
        voxel_weights = voxel_weights / voxel_weights.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.bmm((weights_fixed * voxel_weights).transpose(1, 2), weights_warped)


def _entropies(joint: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """``H(F), H(W), H(F, W)`` in nats, each ``(B,)``, of a joint histogram ``(B, n, n)``."""
    p_fixed, p_warped = joint.sum(2), joint.sum(1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p + eps)).flatten(1).sum(1)

    return entropy(p_fixed), entropy(p_warped), entropy(joint)


class MutualInformation(LossTerm):
    """Negative mutual information ``H(F) + H(W) - H(F, W)`` (nats) from a Parzen joint histogram.

    Intensities are assumed to lie roughly in ``value_range`` (default ``[0, 1]``); values outside
    fall into the edge bins. ``value_range=None`` bins each image between its own minimum and
    maximum (for unnormalised data such as CT in HU). Own implementation rather than MONAI's
    ``GlobalMutualInformationLoss`` because that clamps intensities (zero gradient outside
    ``[0, 1]``), has no mask and no NMI; with the same bins and ``sigma_ratio`` and intensities in
    ``[0, 1]`` both give the same value (tested).
    """

    requires = IMAGE_KEYS

    def __init__(
        self,
        num_bins: int = 32,
        sigma_ratio: float = 0.5,
        value_range: tuple[float, float] | None = (0.0, 1.0),
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if sigma_ratio <= 0:
            raise ValueError(f"sigma_ratio must be > 0, got {sigma_ratio}")
        if value_range is not None:
            if len(value_range) != 2 or not value_range[1] > value_range[0]:
                raise ValueError(
                    f"value_range must be (low, high) with high > low, got {value_range}"
                )
            value_range = (float(value_range[0]), float(value_range[1]))
        self.num_bins = num_bins
        self.sigma_ratio = sigma_ratio
        self.value_range = value_range
        self.eps = eps

    def entropies(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``H(F), H(W), H(F, W)``, each ``(B,)``."""
        fixed, warped, mask = image_pair(inputs)
        dtype = torch.promote_types(fixed.dtype, torch.float32)
        joint = joint_histogram(
            fixed.to(dtype),
            warped.to(dtype),
            mask,
            self.num_bins,
            self.sigma_ratio,
            self.value_range,
        )
        return _entropies(joint, self.eps)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h_fixed, h_warped, h_joint = self.entropies(inputs)
        return -(h_fixed + h_warped - h_joint).mean()


class NormalizedMutualInformation(MutualInformation):
    """Negative normalised mutual information ``(H(F) + H(W)) / H(F, W)``, loss in ``[-2, -1]``.

    Same histogram and options as :class:`MutualInformation`.
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
