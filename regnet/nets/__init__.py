"""Registration networks: a VoxelMorph-style U-Net, output heads and the models built on them.

Every model is an ``nn.Module`` with ``forward(fixed, moving) -> dict`` holding at least
``"ddf"`` ``(B, ndim, *S)`` (fixed grid, voxel units, backward mapping: conventions of
:mod:`regnet.spatial`). Build one by name with :func:`build_model` or construct the classes
directly (e.g. ``_target_: regnet.nets.VoxelMorph`` in a Hydra config).
"""

from regnet.nets.heads import AffineHead, BSplineHead, DDFHead, SVFHead
from regnet.nets.models import (
    MODELS,
    AffineNet,
    AffineVoxelMorph,
    BSplineNet,
    VoxelMorph,
    build_model,
    count_parameters,
)
from regnet.nets.unet import PRESETS, Encoder, UNet

__all__ = [
    "MODELS",
    "PRESETS",
    "AffineHead",
    "AffineNet",
    "AffineVoxelMorph",
    "BSplineHead",
    "BSplineNet",
    "DDFHead",
    "Encoder",
    "SVFHead",
    "UNet",
    "VoxelMorph",
    "build_model",
    "count_parameters",
]
