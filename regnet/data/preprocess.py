"""Preprocessing one subject (image, optional label and mask) onto a network grid in world space.

Pipeline (MONAI dictionary transforms; keys ``image``, ``label``, ``mask``, the last two optional):

1. load with its affine (:class:`LoadImaged`: any format of :mod:`regnet.data.io`, through
   :func:`regnet.data.io.read_image`), reject NaN/Inf voxels;
2. reorient to RAS+ (``Orientationd``): array axis ``i`` runs left->Right, ``j`` posterior->
   Anterior, ``k`` inferior->Superior;
3. 2D from 3D (``slice_index`` set): keep axial slice ``k = slice_index`` of the *reoriented,
   not yet resampled* volume; the slice keeps its 3D position in the affine;
4. resample to ``spacing`` mm (``Spacingd``; images linear, labels and masks nearest);
5. with ``centre="foreground"``, crop to the bounding box of the foreground (voxels brighter than
   a tenth of the image's 99th percentile, ``CropForegroundd``), so that the next step centres
   the head rather than the scanner's field of view (subjects scanned in different positions
   then start roughly aligned, as after a centre-of-mass initialisation);
6. crop or zero-pad symmetrically about the array centre to ``shape`` (``ResizeWithPadOrCropd``);
7. clip the image to its ``percentiles`` and scale to [0, 1] (``ScaleIntensityRangePercentilesd``;
   ``percentiles=None`` keeps the file's intensities, e.g. CT in HU).

The output holds plain tensors (no MetaTensor): ``image`` ``(1, *shape)`` float32, ``label``
``(1, *shape)`` int64, ``mask`` ``(1, *shape)`` float32 in {0, 1}, and ``affine`` ``(4, 4)``
float64, the voxel -> RAS mm affine of the network grid (for 2D grids the third column is the
slice normal, so ``affine @ (i, j, 0, 1)`` is a point in the 3D scanner space). Plain tensors
collate with PyTorch's default collate (``affine`` becomes ``(B, 4, 4)``, path strings lists).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from regnet.data.io import DataError, read_header, read_image, read_landmarks

IMAGE_KEYS = ("image", "label", "mask")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_INTERPOLATION = {"image": "bilinear", "label": "nearest", "mask": "nearest"}
CENTRES = ("grid", "foreground")
_QUANTILE_SAMPLES = 1_000_000


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than a tenth of the image's 99th percentile (estimated on at most a
    million evenly strided voxels): the head in an MR or CT volume, not the background noise."""
    values = image.detach().flatten().float()
    values = values[:: max(1, values.numel() // _QUANTILE_SAMPLES)]
    low = torch.quantile(values, 0.01)
    high = torch.quantile(values, 0.99)
    return image > low + 0.1 * (high - low)


def _source(tensor: torch.Tensor) -> str:
    meta = getattr(tensor, "meta", {})
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class LoadImaged(MapTransform):
    """Replace each path by a ``(1, *S)`` float32 MetaTensor of the file's voxels (nibabel axis
    order) with its 4x4 voxel -> RAS affine and ``filename_or_obj`` (what MONAI's ``LoadImaged``
    gives for NIfTI), read by :func:`regnet.data.io.read_image` so that every format keeps its
    ITK geometry."""

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        for key in self.key_iterator(data):
            image = read_image(data[key])
            array = torch.from_numpy(np.asarray(image.array, np.float32))[None]
            meta = {"filename_or_obj": str(image.path)}
            data[key] = MetaTensor(array, affine=torch.from_numpy(image.affine), meta=meta)
        return data


class RejectNonFinited(MapTransform):
    """Raise :class:`DataError` naming the row and file if an image holds NaN or Inf voxels."""

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            if not torch.isfinite(torch.as_tensor(data[key])).all():
                raise DataError(
                    f"{data.get('row', 'input')}: {_source(data[key])}: contains NaN or Inf voxels"
                )
        return data


class AxialSliced(MapTransform):
    """Keep axial slice ``index`` (last axis of a RAS-oriented ``(C, I, J, K)`` MetaTensor).

    The affine's translation moves to the slice, so voxel ``(i, j)`` of the slice keeps its world
    position.
    """

    def __init__(self, keys: Sequence[str], index: int, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.index = int(index)

    def __call__(self, data: dict) -> dict:
        for key in self.key_iterator(data):
            volume = data[key]
            if volume.ndim != 4:
                raise DataError(f"{_source(volume)}: slice_index needs a 3D volume")
            depth = volume.shape[-1]
            if not 0 <= self.index < depth:
                raise DataError(
                    f"{data.get('row', 'input')}: {_source(volume)}: slice_index {self.index} "
                    f"outside 0..{depth - 1} of the RAS-oriented volume"
                )
            affine = volume.affine.clone()
            affine[:3, 3] += affine[:3, 2] * self.index
            sliced = volume[..., self.index].clone()
            sliced.affine = affine
            data[key] = sliced
        return data


class ToNetworkArrays(MapTransform):
    """Convert MetaTensors to plain tensors with the dtypes of the module docstring and store the
    image's affine (float64, 4x4) under ``affine``."""

    def __call__(self, data: dict) -> dict:
        data["affine"] = torch.as_tensor(data["image"].affine, dtype=torch.float64).clone()
        for key in self.key_iterator(data):
            data[key] = network_array(key, data[key])
        return data


def network_array(key: str, value) -> torch.Tensor:
    """A record entry as a plain tensor: ``label`` int64 (rounded), ``mask`` {0, 1} float32,
    anything else (images) float32."""
    array = torch.as_tensor(value).as_subclass(torch.Tensor)
    if key == "label":
        return array.round().to(torch.int64)
    if key == "mask":
        return (array > 0.5).to(torch.float32)
    return array.to(torch.float32)


def raise_data_error(error: Exception) -> None:
    """Re-raise the :class:`DataError` that MONAI wrapped (``RuntimeError: applying transform``)
    inside ``error``, so the user sees its one-line message; otherwise re-raise ``error``."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        cause = cause.__cause__
    raise error


def subject_transform(
    ndim: int = 3,
    spacing: Sequence[float] | float | None = None,
    shape: Sequence[int] | None = None,
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    slice_index: int | None = None,
    centre: str = "grid",
) -> Compose:
    """The preprocessing pipeline for records ``{"image": path, "label"?: path, "mask"?: path}``.

    ``spacing`` (mm, per network axis; ``None`` keeps the reoriented file's) and ``shape``
    (voxels; ``None`` keeps the resampled size) have ``ndim`` entries. ``ndim=2`` reads 2D files,
    or axial slice ``slice_index`` of 3D files (index in the RAS-reoriented volume before
    resampling). ``centre``: ``"grid"`` crops/pads about the array centre, ``"foreground"``
    about the centre of the image's foreground bounding box (module docstring, step 5).
    """
    if centre not in CENTRES:
        raise ValueError(f"centre must be one of {list(CENTRES)}, got {centre!r}")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if slice_index is not None and ndim != 2:
        raise ValueError("slice_index selects a 2D axial slice; it needs ndim=2")
    for name, value in (("spacing", spacing), ("shape", shape)):
        if value is not None and not np.isscalar(value) and len(value) != ndim:
            raise ValueError(f"{name} needs {ndim} entries for ndim={ndim}, got {list(value)}")
    keys = list(IMAGE_KEYS)
    file_rank = 3 if slice_index is not None else ndim
    transforms = [
        LoadImaged(keys, allow_missing_keys=True),
        RejectNonFinited(keys, allow_missing_keys=True),
        Orientationd(keys, axcodes="RAS"[:file_rank], labels=_RAS_LABELS, allow_missing_keys=True),
    ]
    if slice_index is not None:
        transforms.append(AxialSliced(keys, slice_index))
    if spacing is not None:
        pixdim = [float(spacing)] * ndim if np.isscalar(spacing) else [float(s) for s in spacing]
        transforms.append(
            Spacingd(
                keys,
                pixdim=pixdim,
                mode=[_INTERPOLATION[k] for k in keys],
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    if centre == "foreground":
        transforms.append(
            CropForegroundd(keys, source_key="image", select_fn=foreground, allow_missing_keys=True)
        )
    if shape is not None:
        transforms.append(
            ResizeWithPadOrCropd(
                keys, spatial_size=[int(s) for s in shape], allow_missing_keys=True
            )
        )
    if percentiles is not None:
        lower, upper = percentiles
        transforms.append(
            ScaleIntensityRangePercentilesd("image", lower, upper, b_min=0.0, b_max=1.0, clip=True)
        )
    transforms.append(ToNetworkArrays(keys, allow_missing_keys=True))
    return Compose(transforms)


def pair_item(fixed: dict, moving: dict) -> dict:
    """Combine two preprocessed subjects into a registration item (see docs/architecture.md).

    Keys: ``fixed``, ``moving`` ``(1, *S)``; ``fixed_label``/``moving_label``,
    ``fixed_mask``/``moving_mask`` when both subjects have them; ``fixed_landmarks``/
    ``moving_landmarks`` ``(N, 3)`` RAS mm when both have them; ``fixed_affine``,
    ``moving_affine`` ``(4, 4)`` float64 (voxel -> RAS of each network grid: the DDF maps fixed
    voxel ``x`` to moving voxel ``x + u(x)``, i.e. world ``moving_affine @ (x + u(x))``); and
    ``fixed_path``, ``moving_path`` (source image files).
    """
    item = {"fixed": fixed["image"], "moving": moving["image"]}
    for key in ("label", "mask", "landmarks"):
        if key in fixed and key in moving:
            item[f"fixed_{key}"] = torch.as_tensor(fixed[key])
            item[f"moving_{key}"] = torch.as_tensor(moving[key])
    item["fixed_affine"] = fixed["affine"]
    item["moving_affine"] = moving["affine"]
    item["fixed_path"] = str(fixed["path"])
    item["moving_path"] = str(moving["path"])
    return item


def subject_record(
    image: str | Path,
    label: str | Path | None = None,
    mask: str | Path | None = None,
    landmarks: str | Path | None = None,
    *,
    ndim: int = 3,
    slice_index: int | None = None,
    row: str = "input",
) -> dict:
    """Validate one subject's files from their headers and return its record for
    :func:`subject_transform`.

    Checks: files exist and are readable images; the image has the rank ``ndim`` needs (3D files
    for ``slice_index``); label and mask share the image's grid (shape and affine). Landmarks are
    read here (voxel keypoints need the original affine). Errors are one line: ``row: file:
    problem``.
    """
    record: dict = {"row": row, "path": str(image)}
    try:
        header = read_header(image)
        file_rank = 3 if slice_index is not None else ndim
        if len(header.shape) != file_rank:
            raise DataError(
                f"{header.path}: is {len(header.shape)}D with shape {header.shape}; expected a "
                f"{file_rank}D image for ndim={ndim}"
                + (" with slice_index" if slice_index is not None else "")
            )
        record["image"] = str(image)
        for key, path in (("label", label), ("mask", mask)):
            if path is None:
                continue
            other = read_header(path)
            if other.shape != header.shape or not np.allclose(
                other.affine, header.affine, atol=1e-3
            ):
                raise DataError(
                    f"{other.path}: {key} grid (shape {other.shape}) differs from its image "
                    f"{header.path} (shape {header.shape}) in shape or affine"
                )
            record[key] = str(path)
        if landmarks is not None:
            points = read_landmarks(landmarks, header.affine)
            record["landmarks"] = torch.as_tensor(points, dtype=torch.float64)
    except DataError as error:
        raise DataError(f"{row}: {error}") from None
    return record


def load_pair(
    fixed_path: str | Path,
    moving_path: str | Path,
    fixed_label: str | Path | None = None,
    moving_label: str | Path | None = None,
    fixed_mask: str | Path | None = None,
    moving_mask: str | Path | None = None,
    *,
    ndim: int = 3,
    spacing: Sequence[float] | float | None = None,
    shape: Sequence[int] | None = None,
    percentiles: tuple[float, float] | None = (1.0, 99.0),
    slice_index: int | None = None,
    centre: str = "grid",
) -> dict:
    """Load and preprocess a single fixed/moving pair; returns a :func:`pair_item` dict without
    batch axis (add it with ``value[None]`` for tensors)."""
    transform = subject_transform(ndim, spacing, shape, percentiles, slice_index, centre)
    kw = {"ndim": ndim, "slice_index": slice_index}
    fixed = subject_record(fixed_path, fixed_label, fixed_mask, row="fixed", **kw)
    moving = subject_record(moving_path, moving_label, moving_mask, row="moving", **kw)
    try:
        return pair_item(transform(fixed), transform(moving))
    except RuntimeError as error:
        raise_data_error(error)
