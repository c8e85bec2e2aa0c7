"""Never silently worse than the start: compare a registration result with the alignment it
started from (usually the scanner headers, i.e. the identity on a world-space working grid).

Images lie on one grid (conventions of :mod:`regnet.spatial`); fields are DDFs in its voxels,
backward (``warped(x) = moving(x + ddf(x))``). The judge is deliberately not the optimised cost:
normalised mutual information (Studholme, ``(H(F) + H(W)) / H(F, W)`` in ``[1, 2]``, higher is
better) from a plain 32-bin joint histogram over a region of the fixed image, which rewards
agreement of structure whatever the contrast; where both images have masks, also the Dice
overlap of the fixed mask and the warped moving mask. A result is kept only when neither score is
worse than the start's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from regnet.spatial import identity_grid, sample

CHECK_BINS = 32
"""Histogram bins per image of :func:`normalized_mutual_information`."""


def _bin_indices(image: torch.Tensor, bins: int) -> torch.Tensor:
    low, high = image.min(), image.max()
    scaled = (image - low) / (high - low).clamp_min(1e-12)
    return (scaled * bins).long().clamp_(0, bins - 1)


def normalized_mutual_information(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    region: torch.Tensor | None = None,
    bins: int = CHECK_BINS,
) -> float:
    """Studholme NMI of two images ``(1, 1, *S)`` over the voxels where ``region > 0.5`` (all
    voxels without one); 1 for independent intensities, 2 for a one-to-one intensity map."""
    fixed, warped = fixed.detach().flatten().float(), warped.detach().flatten().float()
    if region is not None:
        inside = region.detach().flatten() > 0.5
        fixed, warped = fixed[inside], warped[inside]
    if fixed.numel() == 0:
        return 1.0
    pairs = _bin_indices(fixed, bins) * bins + _bin_indices(warped, bins)
    joint = torch.bincount(pairs, minlength=bins * bins).double().view(bins, bins)
    joint = joint / joint.sum()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        p = p[p > 0]
        return -(p * p.log()).sum()

    joint_entropy = entropy(joint.flatten())
    if joint_entropy <= 0:
        return 2.0
    return float((entropy(joint.sum(1)) + entropy(joint.sum(0))) / joint_entropy)


def mask_dice(fixed_mask: torch.Tensor, warped_mask: torch.Tensor) -> float:
    """Dice overlap of two masks (thresholded at 0.5)."""
    a, b = fixed_mask > 0.5, warped_mask > 0.5
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def _warp(image: torch.Tensor, ddf: torch.Tensor | None) -> torch.Tensor:
    """``image`` warped by ``ddf`` (linear, zero outside), or itself for ``None``."""
    if ddf is None:
        return image
    grid = identity_grid(tuple(image.shape[2:]), image.device, image.dtype)
    return sample(image, grid + ddf.to(image.dtype), padding="zeros")


@dataclass
class StartCheck:
    """Scores of the start and of the result (``nmi``; ``mask_dice`` when masks were given) and
    which one is kept: ``"result"``, or ``"start"`` when the result scored worse."""

    start: dict[str, float]
    result: dict[str, float]
    kept: str

    @property
    def result_kept(self) -> bool:
        return self.kept == "result"

    def as_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        """One line for the user when the start was kept."""
        worse = ", ".join(
            f"{name} {self.result[name]:.3f} < {self.start[name]:.3f}"
            for name in self.start
            if self.result[name] < self.start[name]
        )
        return f"the registration ended worse than its start ({worse}); the start is kept"


def check_against_start(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    ddf: torch.Tensor,
    start_ddf: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> StartCheck:
    """Score ``moving`` warped by the result ``ddf`` against the start ``start_ddf`` (``None``:
    the identity), both ``(1, ndim, *S)`` voxels on ``fixed``'s grid.

    Args:
        fixed, moving: ``(1, C, *S)`` images on one grid (channels are summed).
        region: ``(1, 1, *S)`` where NMI is computed (e.g. the fixed foreground); default all.
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks; with both, ``mask_dice`` is
            scored too.
    """
    fixed = fixed.sum(1, keepdim=True)
    moving = moving.sum(1, keepdim=True)
    scores = {}
    for name, field in (("start", start_ddf), ("result", ddf)):
        values = {"nmi": normalized_mutual_information(fixed, _warp(moving, field), region)}
        if fixed_mask is not None and moving_mask is not None:
            values["mask_dice"] = mask_dice(fixed_mask, _warp(moving_mask.float(), field))
        scores[name] = values
    worse = any(scores["result"][key] < scores["start"][key] for key in scores["start"])
    return StartCheck(scores["start"], scores["result"], "start" if worse else "result")
