"""Scaling and squaring: stationary velocity field -> diffeomorphic displacement field."""

from __future__ import annotations

import torch

from regnet.spatial.grid import check_field
from regnet.spatial.warp import compose


def integrate(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring.

    ``velocity``: ``(B, ndim, *S)`` in voxels per unit time, same layout as a DDF.
    The result is the DDF of ``exp(v)`` (backward convention of :mod:`regnet.spatial`):
    ``phi = exp(v / 2**steps)``, then ``phi <- phi ∘ phi`` ``steps`` times. ``steps=0``
    returns the velocity itself (a first-order approximation). Computed in float32 or wider.
    """
    check_field(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    dtype = torch.promote_types(velocity.dtype, torch.float32)
    ddf = velocity.to(dtype) / (2**steps)
    for _ in range(steps):
        ddf = compose(ddf, ddf)
    return ddf
