"""Label term: soft multi-label Dice between one-hot label maps; lower is better."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regnet.losses.term import LossTerm, field_pair


class Dice(LossTerm):
    """``1 - mean soft Dice`` over labels present in the fixed or the warped label map.

    Inputs ``fixed_label`` and ``warped_label`` are ``(B, K, *S)`` one-hot (or soft) maps, channel
    ``k`` holding label ``k``; channel 0 (background) is excluded unless ``include_background``.
    Per image and label, ``dice = 2 sum(F W) / (sum F + sum W)``; pairs where the label is absent
    from both maps (``sum F + sum W == 0``) are ignored, not counted as 1 or 0. The loss lies in
    ``[0, 1]``; with no label present anywhere it is 0.

    Own implementation rather than MONAI's ``DiceLoss``, whose smoothing constants score a label
    absent from both maps as a perfect match.
    """

    requires = ("fixed_label", "warped_label")

    def __init__(self, include_background: bool = False) -> None:
        super().__init__()
        self.include_background = include_background

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        fixed, warped = field_pair(inputs, "fixed_label", "warped_label")
        if fixed.dim() < 3:
            raise ValueError(
                f"fixed_label must be (B, K, *spatial) one-hot, got {tuple(fixed.shape)}"
            )
        if not self.include_background:
            if fixed.shape[1] < 2:
                raise ValueError(
                    f"fixed_label has {fixed.shape[1]} channel(s); one-hot labels need channel 0 "
                    "for background and one channel per label"
                )
            fixed, warped = fixed[:, 1:], warped[:, 1:]
        fixed = fixed.to(warped.dtype) if warped.is_floating_point() else fixed.float()
        dims = tuple(range(2, fixed.dim()))
        overlap = (fixed * warped).sum(dims)
        size = fixed.sum(dims) + warped.sum(dims)
        present = size > 0
        dice = 2.0 * overlap / torch.where(present, size, torch.ones_like(size))
        return (present * (1.0 - dice)).sum() / present.sum().clamp_min(1)
