"""Target registration error between corresponding landmark sets, in mm."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from regnet.metrics.arrays import ArrayLike, as_tensor


class TRE(NamedTuple):
    """Per-landmark distances ``(N,)`` in mm and their mean."""

    distances: np.ndarray
    mean: float


def tre(fixed_points_mm: ArrayLike, warped_points_mm: ArrayLike) -> TRE:
    """Euclidean distance between each fixed landmark and its registered counterpart.

    Args:
        fixed_points_mm: ``(N, 2|3)`` landmark positions in the fixed image, mm.
        warped_points_mm: ``(N, 2|3)`` the corresponding moving landmarks mapped into the fixed
            image's space by the registration, mm, same order.
    """
    fixed = as_tensor(fixed_points_mm, "fixed_points_mm").double().numpy()
    warped = as_tensor(warped_points_mm, "warped_points_mm").double().numpy()
    if fixed.ndim != 2 or fixed.shape[1] not in (2, 3) or fixed.shape[0] == 0:
        raise ValueError(f"fixed_points_mm must have shape (N, 2|3), N >= 1, got {fixed.shape}")
    if warped.shape != fixed.shape:
        raise ValueError(
            f"warped_points_mm {warped.shape} must match fixed_points_mm {fixed.shape}"
        )
    distances = np.linalg.norm(fixed - warped, axis=1)
    return TRE(distances=distances, mean=float(distances.mean()))
