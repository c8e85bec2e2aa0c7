"""Folding and smoothness statistics of a displacement field from its Jacobian determinant."""

from __future__ import annotations

import torch

from regnet.metrics.arrays import ArrayLike, as_tensor
from regnet.spatial import jacobian_determinant

LOG_DET_CLIP = (1e-9, 1e9)


def jacobian_stats(ddf: ArrayLike) -> dict[str, float]:
    """``{"folding_percent", "sdlogj"}`` of a field ``(ndim, *S)`` or ``(B, ndim, *S)``, voxels.

    ``det J = det(I + grad u)`` from :func:`regnet.spatial.jacobian_determinant` (central
    differences, one-sided at the border), in float64. ``folding_percent`` is the percentage of
    voxels with ``det J <= 0``; ``sdlogj`` the (population) standard deviation of
    ``log(clip(det J, 1e-9, 1e9))`` as in Learn2Reg. A batch is pooled over all its voxels.
    A 4-D input is one 3D field ``(3, I, J, K)`` unless ``shape[1] == 2`` (then a batch of 2D
    fields).
    """
    field = as_tensor(ddf, "ddf", torch.float64)
    unbatched = field.dim() == 3 or (field.dim() == 4 and field.shape[1] != 2)
    if unbatched:
        field = field.unsqueeze(0)
    return determinant_stats(jacobian_determinant(field))


def determinant_stats(det: torch.Tensor) -> dict[str, float]:
    """:func:`jacobian_stats` of Jacobian determinants already computed (any shape, pooled)."""
    det = det.double()
    folding = (det <= 0).double().mean().item() * 100.0
    log_det = det.clamp(*LOG_DET_CLIP).log()
    return {"folding_percent": folding, "sdlogj": log_det.std(correction=0).item()}
