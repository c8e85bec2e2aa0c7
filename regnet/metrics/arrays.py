"""Conversion of metric inputs (numpy arrays or torch tensors) to CPU torch tensors."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_tensor(value: ArrayLike, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a detached CPU tensor, optionally cast to ``dtype``; else ``TypeError``."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return tensor if dtype is None else tensor.to(dtype)
