"""Base class of loss terms and the input checks they share.

A loss term is an ``nn.Module`` whose ``forward`` takes the loss input dict (keys and shapes in
``docs/architecture.md``: ``fixed``, ``warped`` ``(B, C, *S)``, ``ddf`` ``(B, ndim, *S)`` in voxels,
``fixed_label``, ``warped_label`` ``(B, K, *S)`` one-hot, ``target_ddf``, optional ``fixed_mask``
``(B, 1, *S)``) and returns a scalar where lower is better. ``requires`` names the keys it reads;
``fixed_mask`` is never required, similarity terms use it when present.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from regnet.spatial.grid import check_field, check_spatial


class LossTerm(nn.Module):
    """A loss term: ``forward(inputs: dict) -> scalar`` (lower is better).

    Subclasses set ``requires`` to the input-dict keys they read and implement ``forward``.
    """

    requires: tuple[str, ...] = ()


def image_pair(
    inputs: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``fixed``, ``warped`` ``(B, C, *S)`` and ``fixed_mask`` ``(B|1, 1, *S)`` or ``None``.

    Raises ``ValueError`` when the shapes disagree.
    """
    fixed, warped = inputs["fixed"], inputs["warped"]
    check_spatial(fixed, "fixed")
    if fixed.shape != warped.shape:
        raise ValueError(
            f"fixed {tuple(fixed.shape)} and warped {tuple(warped.shape)} must have the same shape"
        )
    mask = inputs.get("fixed_mask")
    if mask is not None:
        if (
            mask.dim() != fixed.dim()
            or mask.shape[1] != 1
            or mask.shape[0] not in (1, fixed.shape[0])
            or mask.shape[2:] != fixed.shape[2:]
        ):
            raise ValueError(
                f"fixed_mask must have shape (B, 1, {', '.join(map(str, fixed.shape[2:]))}), "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.detach().to(fixed.dtype if fixed.is_floating_point() else torch.float32)
    return fixed, warped, mask


def field_pair(
    inputs: Mapping[str, torch.Tensor], first: str, second: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two same-shaped tensors ``inputs[first]``, ``inputs[second]``, else ``ValueError``."""
    a, b = inputs[first], inputs[second]
    if a.shape != b.shape:
        raise ValueError(f"{first} {tuple(a.shape)} and {second} {tuple(b.shape)} differ in shape")
    return a, b


def displacement(inputs: Mapping[str, torch.Tensor], key: str = "ddf") -> torch.Tensor:
    """Return ``inputs[key]`` after checking it is a ``(B, ndim, *S)`` field."""
    field = inputs[key]
    check_field(field, key)
    return field


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values (B, C, *S')`` over all elements, weighted by ``mask (B|1, 1, *S')``.

    An all-zero mask gives 0 (still attached to the graph), not NaN.
    """
    if mask is None:
        return values.mean()
    weights = mask.expand(values.shape[0], 1, *values.shape[2:])
    total = (values * weights).sum()
    return total / (weights.sum() * values.shape[1]).clamp_min(1e-12)
