"""Registration networks: ``forward(fixed, moving) -> dict`` of transformation outputs.

Every model takes ``fixed`` and ``moving`` images ``(B, in_channels, *S)`` on the same grid
(any size; 2D or 3D as set by ``ndim``) and returns at least ``"ddf"`` ``(B, ndim, *S)``: the
backward displacement on the fixed grid, in fixed-grid voxels (conventions of
:mod:`regnet.spatial`), so that ``warp(moving, out["ddf"])`` aligns the moving image to the fixed
one. Models with an affine stage add ``"matrix"`` ``(B, ndim+1, ndim+1)`` (fixed -> moving voxel
coordinates); diffeomorphic ones ``"velocity"``; B-spline ones ``"control_points"``. The
networks see ``fixed`` and ``moving`` concatenated on channels, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from regnet.nets.heads import AffineHead, BSplineHead, DDFHead, SVFHead, float32_geometry
from regnet.nets.unet import PRESETS, Encoder, UNet
from regnet.spatial import apply_affine, identity_grid, warp

DENSE_HEADS = ("ddf", "svf")
AFFINE_ENC_CHANNELS = (16, 32, 32, 64, 64)


def check_pair(fixed: torch.Tensor, moving: torch.Tensor, ndim: int, in_channels: int) -> None:
    """Raise a ValueError unless both images are ``(B, in_channels, *S)`` with equal shapes."""
    for name, image in (("fixed", fixed), ("moving", moving)):
        if image.dim() != ndim + 2 or image.shape[1] != in_channels:
            raise ValueError(
                f"{name} must have shape (B, {in_channels}, *spatial) with {ndim} spatial dims, "
                f"got {tuple(image.shape)}"
            )
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same "
            "shape (resample the moving image to the fixed grid first)"
        )


class VoxelMorph(nn.Module):
    """VoxelMorph: U-Net on the image pair -> dense (``head="ddf"``) or diffeomorphic
    (``head="svf"``, stationary velocity integrated by scaling and squaring) field.

    Args:
        ndim: 2 or 3.
        in_channels: channels of each image.
        enc_channels, dec_channels: U-Net widths (default VoxelMorph-2, see
            :data:`regnet.nets.unet.PRESETS`).
        head: ``"ddf"`` or ``"svf"``.
        int_steps: scaling-and-squaring steps (``svf`` only).
        int_downsize: integrate the velocity on a grid this many times coarser (``svf`` only).
        field_downsize: predict the field at ``1/field_downsize`` resolution and upsample it
            (fewer full-resolution decoder convolutions; a power of two).
        pad_mode: padding of the input to a multiple of ``2**len(enc_channels)``:
            ``"replicate"`` or ``"constant"``.

    Returns from ``forward``: ``{"ddf"}`` plus ``"velocity"`` for ``head="svf"``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        enc_channels: Sequence[int] = PRESETS["vm2"]["enc_channels"],
        dec_channels: Sequence[int] = PRESETS["vm2"]["dec_channels"],
        head: str = "ddf",
        int_steps: int = 7,
        int_downsize: int = 2,
        field_downsize: int = 1,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        if head not in DENSE_HEADS:
            raise ValueError(f"head must be one of {DENSE_HEADS}, got {head!r}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.unet = UNet(
            ndim,
            2 * in_channels,
            enc_channels,
            dec_channels,
            field_downsize=field_downsize,
            pad_mode=pad_mode,
        )
        if head == "ddf":
            self.head: nn.Module = DDFHead(ndim, self.unet.out_channels)
        else:
            self.head = SVFHead(ndim, self.unet.out_channels, int_steps, int_downsize)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(fixed, moving, self.ndim, self.in_channels)
        shape = tuple(fixed.shape[2:])
        features = self.unet(torch.cat([fixed, moving], dim=1))
        return self.head(features, shape, self.unet.padded_shape(shape))


class BSplineNet(nn.Module):
    """U-Net on the image pair -> cubic B-spline control points -> dense field.

    Args:
        control_spacing: control-point spacing in voxels (at most; one value or one per axis).
        Others: as :class:`VoxelMorph`.

    Returns from ``forward``: ``{"ddf", "control_points"}``; ``control_points`` is
    ``(B, ndim, *control_grid_shape(S, control_spacing))`` in voxels.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        enc_channels: Sequence[int] = PRESETS["vm2"]["enc_channels"],
        dec_channels: Sequence[int] = PRESETS["vm2"]["dec_channels"],
        control_spacing: float | Sequence[float] = 5.0,
        field_downsize: int = 1,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.in_channels = in_channels
        self.unet = UNet(
            ndim,
            2 * in_channels,
            enc_channels,
            dec_channels,
            field_downsize=field_downsize,
            pad_mode=pad_mode,
        )
        self.head = BSplineHead(ndim, self.unet.out_channels, control_spacing)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(fixed, moving, self.ndim, self.in_channels)
        shape = tuple(fixed.shape[2:])
        features = self.unet(torch.cat([fixed, moving], dim=1))
        return self.head(features, shape, self.unet.padded_shape(shape))


class AffineNet(nn.Module):
    """Stride-2 conv encoder on the image pair -> global average pooling -> rigid/affine matrix.

    Initialised to output exactly the identity. Args: ``transform`` ``"rigid"`` or ``"affine"``;
    ``enc_channels`` encoder widths; ``spacing`` voxel size for world-rigid rotations (see
    :class:`~regnet.nets.heads.AffineHead`).

    Returns from ``forward``: ``{"ddf", "matrix"}``.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        transform: str = "affine",
        enc_channels: Sequence[int] = AFFINE_ENC_CHANNELS,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.in_channels = in_channels
        self.encoder = Encoder(ndim, 2 * in_channels, enc_channels)
        self.head = AffineHead(ndim, self.encoder.out_channels, transform, spacing)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(fixed, moving, self.ndim, self.in_channels)
        features = self.encoder(torch.cat([fixed, moving], dim=1))[-1]
        return self.head(features, tuple(fixed.shape[2:]))


class AffineVoxelMorph(nn.Module):
    """Cascade: :class:`AffineNet`, then :class:`VoxelMorph` on the affinely warped moving image.

    With affine matrix ``A`` and local field ``v`` (predicted between ``fixed`` and
    ``warp(moving, A)``), the returned field is their composition "``A`` first, then ``v``",
    evaluated exactly (no interpolation of the affine part):
    ``ddf(x) = A (x + v(x)) - x``, which equals ``compose(affine_to_ddf(A), v)``. Warp the
    original moving image with it to resample only once.

    Args:
        transform, affine_enc_channels, spacing: of the affine stage (see :class:`AffineNet`).
        **deformable_kwargs: of the deformable stage (see :class:`VoxelMorph`).

    Returns from ``forward``: ``{"ddf", "matrix", "local_ddf"}`` plus ``"velocity"`` for an
    ``svf`` deformable head.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int = 1,
        transform: str = "affine",
        affine_enc_channels: Sequence[int] = AFFINE_ENC_CHANNELS,
        spacing: Sequence[float] | None = None,
        **deformable_kwargs,
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.in_channels = in_channels
        self.affine = AffineNet(ndim, in_channels, transform, affine_enc_channels, spacing)
        self.deformable = VoxelMorph(ndim, in_channels, **deformable_kwargs)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
        check_pair(fixed, moving, self.ndim, self.in_channels)
        global_out = self.affine(fixed, moving)
        matrix = global_out["matrix"]
        with float32_geometry(fixed.device):
            moved = warp(moving, global_out["ddf"])
        local_out = self.deformable(fixed, moved)
        local = local_out["ddf"]
        with float32_geometry(fixed.device):
            grid = identity_grid(local.shape[2:], local.device, local.dtype)
            ddf = apply_affine(matrix, grid + local) - grid
        out = {"ddf": ddf, "matrix": matrix, "local_ddf": local}
        if "velocity" in local_out:
            out["velocity"] = local_out["velocity"]
        return out


# Defaults of ``voxelmorph`` / ``voxelmorph_diff``: the VoxelMorph encoder, a narrower decoder
# and the field predicted at half resolution (no full-resolution convolutions). At 160x192x224:
# 80 GFLOP per forward against 453 for VoxelMorph-2 (preset vm2) and 247 for VoxelMorph 0.3.4's
# VxmPairwise; on 2 CPU cores 4.9x faster per pair than VxmPairwise (2.9 s vs 14.3 s) with a
# sixth of its inference peak memory, and a higher validation Dice at an equal training budget
# (synthetic 2D pairs, 0.757 vs 0.664): ``scripts/benchmark.py models`` and ``accuracy``.
DEFAULT_DEFORMABLE: dict[str, object] = {
    "enc_channels": (16, 32, 32, 32),
    "dec_channels": (32, 32, 32, 16, 16, 16),
    "field_downsize": 2,
}

MODELS: dict[str, tuple[type[nn.Module], dict]] = {
    "voxelmorph": (VoxelMorph, {"head": "ddf", **DEFAULT_DEFORMABLE}),
    "voxelmorph_diff": (VoxelMorph, {"head": "svf", **DEFAULT_DEFORMABLE}),
    "affine": (AffineNet, {}),
    "bspline": (BSplineNet, {}),
    "affine_voxelmorph": (AffineVoxelMorph, dict(DEFAULT_DEFORMABLE)),
}


def build_model(
    name: str, ndim: int, in_channels: int = 1, preset: str | None = None, **kwargs
) -> nn.Module:
    """Build a registration network by name.

    Args:
        name: one of ``voxelmorph`` (dense), ``voxelmorph_diff`` (diffeomorphic), ``affine``,
            ``bspline``, ``affine_voxelmorph``. ``voxelmorph`` and ``voxelmorph_diff`` default
            to :data:`DEFAULT_DEFORMABLE` (half-resolution field); the other classes keep their
            own defaults.
        ndim: 2 or 3.
        in_channels: channels of each image.
        preset: ``"vm1"`` or ``"vm2"``: the VoxelMorph paper's networks, U-Net widths and a
            full-resolution field (models with a U-Net only; excludes explicit
            ``enc_channels``/``dec_channels``; an explicit ``field_downsize`` still applies).
        **kwargs: passed to the model class (override its defaults).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls, defaults = MODELS[name]
    options = {**defaults, **kwargs}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if cls is AffineNet:
            raise ValueError("preset applies to U-Net models; 'affine' has no U-Net")
        clash = sorted(set(PRESETS[preset]) & set(kwargs))
        if clash:
            raise ValueError(f"preset {preset!r} sets {clash}; do not pass them as well")
        options.update(PRESETS[preset])
        if "field_downsize" in options and "field_downsize" not in kwargs:
            options["field_downsize"] = 1  # the paper networks predict at full resolution
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return cls(ndim=ndim, in_channels=in_channels, **options)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
