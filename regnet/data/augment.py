"""Spatial augmentation of one preprocessed subject (image, label, mask moved together).

A random affine (MONAI ``RandAffined``) followed by an optional smooth elastic deformation
(``Rand2DElasticd`` / ``Rand3DElasticd``) is drawn once per call and applied identically to the
``image`` (linear), ``label`` and ``mask`` (nearest) of a subject record as produced by
:func:`regnet.data.preprocess.subject_transform` (plain tensors ``(1, *S)``). The grid and its
``affine`` are unchanged: the anatomy moves on a fixed grid, so landmarks no longer match the
image and are dropped from augmented records.
"""

from __future__ import annotations

import math

import torch
from monai.transforms import Compose, MapTransform, Rand2DElasticd, Rand3DElasticd, RandAffined

from regnet.data.preprocess import network_array

_KEYS = ("image", "label", "mask")
_MODES = {"image": "bilinear", "label": "nearest", "mask": "nearest"}


class _RestoreDtypes(MapTransform):
    """Labels back to int64, masks to {0, 1} float32, images float32; drop stale landmarks."""

    def __call__(self, data: dict) -> dict:
        data.pop("landmarks", None)
        for key in self.key_iterator(data):
            data[key] = network_array(key, data[key])
        return data


class _LabelsAsFloat(MapTransform):
    """MONAI's resamplers need floating-point input; labels are restored afterwards."""

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            data[key] = torch.as_tensor(data[key]).to(torch.float32)
        return data


def build_augmentation(
    ndim: int,
    prob: float = 1.0,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.0,
    shear: float = 0.0,
    elastic_prob: float = 0.0,
    elastic_sigma: float = 6.0,
    elastic_magnitude: float = 2.0,
    elastic_spacing: int = 16,
) -> Compose:
    """Random affine (+ elastic) augmentation for subject records.

    Args:
        ndim: 2 or 3 spatial dimensions.
        prob: probability of applying the affine part.
        rotate_deg: rotations uniform in ``±rotate_deg`` degrees (one angle in 2D, three in 3D).
        scale: per-axis scale factors uniform in ``1 ± scale``.
        translate: translations uniform in ``±translate`` voxels per axis.
        shear: shear factors uniform in ``±shear``.
        elastic_prob: probability of the smooth deformation (0 disables it).
        elastic_sigma: Gaussian smoothing (control-grid units) of the elastic offsets.
        elastic_magnitude: elastic displacement magnitude (voxels; 3D uses it as the range
            ``(magnitude, magnitude)`` of MONAI's magnitude factor).
        elastic_spacing: voxels between elastic control points (2D only; MONAI's 3D version
            smooths a dense field with ``elastic_sigma``).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    n_angles = 1 if ndim == 2 else 3
    angle = math.radians(rotate_deg)
    modes = [_MODES[k] for k in _KEYS]
    transforms: list = [
        _LabelsAsFloat(["label", "mask"], allow_missing_keys=True),
        RandAffined(
            list(_KEYS),
            prob=prob,
            rotate_range=[angle] * n_angles,
            scale_range=[scale] * ndim,
            translate_range=[translate] * ndim,
            shear_range=[shear] * (2 if ndim == 2 else 6),
            mode=modes,
            padding_mode="zeros",
            allow_missing_keys=True,
        ),
    ]
    if elastic_prob > 0:
        if ndim == 2:
            elastic = Rand2DElasticd(
                list(_KEYS),
                spacing=elastic_spacing,
                magnitude_range=(elastic_magnitude, elastic_magnitude),
                prob=elastic_prob,
                mode=modes,
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        else:
            elastic = Rand3DElasticd(
                list(_KEYS),
                sigma_range=(elastic_sigma, elastic_sigma),
                magnitude_range=(elastic_magnitude, elastic_magnitude),
                prob=elastic_prob,
                mode=modes,
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        transforms.append(elastic)
    transforms.append(_RestoreDtypes(list(_KEYS), allow_missing_keys=True))
    return Compose(transforms)
