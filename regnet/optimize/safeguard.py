"""Never silently worse than the start: compare a registration result with the alignment it
started from (usually the scanner headers, i.e. the identity on a world-space working grid).

Images lie on one grid (conventions of :mod:`regnet.spatial`); fields are DDFs in its voxels,
backward (``warped(x) = moving(x + ddf(x))``). The judge is deliberately not the optimised cost:
normalised mutual information (Studholme, ``(H(F) + H(W)) / H(F, W)`` in ``[1, 2]``, higher is
better) from a plain 32-bin joint histogram over a region of the fixed image, which rewards
agreement of structure whatever the contrast; where both images have masks, also the Dice
overlap of the fixed mask and the warped moving mask. Candidates are judged in order (the header,
an affine-only stage, the final result): a later one is kept only when none of its scores is
worse than the start's, or than an intermediate stage's by more than :data:`STAGE_TOLERANCE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from regnet.spatial import identity_grid, sample

CHECK_BINS = 32
"""Histogram bins per image of :func:`normalized_mutual_information`."""
STAGE_TOLERANCE = 0.02
"""How much lower a deformable result may score than the affine stage before it and still be
kept: local refinement changes NMI by small amounts of either sign, whereas a deformable stage
that breaks the alignment loses far more. On the head phantom pairs of
``tests/cli/test_register_robust.py`` (``transform=affine`` against ``transform=svf``): skull on
the fixed side only, the SVF stage raised label Dice from 0.951 to 0.968 while NMI fell by
0.011; inverted contrast with ``loss=lncc+grad``, NMI fell 1.308 -> 1.225 and Dice 0.977 ->
0.317."""


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
    """Scores (``nmi``; ``mask_dice`` when masks were given) of each candidate alignment, in
    order from the start to the result, and the name of the one kept."""

    scores: dict[str, dict[str, float]]
    kept: str

    @property
    def result_kept(self) -> bool:
        return self.kept == list(self.scores)[-1]

    def as_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        """One line for the user when the result was not kept."""
        result = list(self.scores)[-1]
        worse = ", ".join(
            f"{name} {self.scores[result][name]:.3f} < {value:.3f}"
            for name, value in self.scores[self.kept].items()
            if self.scores[result][name] < value
        )
        return (
            f"the registration ended worse than the {self.kept} alignment ({worse}); "
            f"the {self.kept} alignment is kept"
        )


def check_against_start(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    candidates: Mapping[str, torch.Tensor | None],
    region: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    stage_tolerance: float = STAGE_TOLERANCE,
) -> StartCheck:
    """Score ``moving`` warped by each candidate field and keep the best in order.

    Args:
        fixed, moving: ``(1, C, *S)`` images on one grid (channels are summed).
        candidates: name -> ``(1, ndim, *S)`` DDF in voxels (``None``: the identity), from the
            start (first, e.g. ``"header"``) to the result (last), e.g. with an affine-only
            stage between. Walking in order, a candidate replaces the kept one when none of its
            scores is lower than the start's, nor more than ``stage_tolerance`` lower than an
            intermediate stage's.
        region: ``(1, 1, *S)`` where NMI is computed (e.g. the fixed foreground); default all.
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks; with both, ``mask_dice`` is
            scored too.
    """
    fixed = fixed.sum(1, keepdim=True)
    moving = moving.sum(1, keepdim=True)
    scores: dict[str, dict[str, float]] = {}
    for name, field in candidates.items():
        values = {"nmi": normalized_mutual_information(fixed, _warp(moving, field), region)}
        if fixed_mask is not None and moving_mask is not None:
            values["mask_dice"] = mask_dice(fixed_mask, _warp(moving_mask.float(), field))
        scores[name] = values
    start = kept = next(iter(scores))
    for name, values in scores.items():
        slack = 0.0 if kept == start else stage_tolerance
        if all(values[key] >= scores[kept][key] - slack for key in values):
            kept = name
    return StartCheck(scores, kept)
