"""Supervised term: regression of the predicted ``ddf`` onto a known ``target_ddf``.

Both fields are ``(B, ndim, *S)`` in voxel units of the fixed grid (see :mod:`regnet.spatial`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regnet.losses.term import LossTerm, displacement, field_pair


class DDFRegression(LossTerm):
    """Error of ``ddf`` against ``target_ddf``, zero at the target.

    ``mode="mse"``: mean squared component error (voxels^2); ``mode="epe"``: mean end-point error,
    the Euclidean length of the error vector per voxel (voxels).
    """

    requires = ("ddf", "target_ddf")

    def __init__(self, mode: str = "mse") -> None:
        super().__init__()
        if mode not in ("mse", "epe"):
            raise ValueError(f"ddf loss mode must be 'mse' or 'epe', got {mode!r}")
        self.mode = mode

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        displacement(inputs, "target_ddf")
        ddf, target = field_pair(inputs, "ddf", "target_ddf")
        error = ddf - target
        if self.mode == "mse":
            return (error * error).mean()
        return torch.linalg.vector_norm(error, dim=1).mean()
