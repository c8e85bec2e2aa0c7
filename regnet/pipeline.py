"""From image files to a registration result on the fixed image's own grid, in world space.

A registration is estimated on some grid ``G`` (for networks the preprocessed network grid:
canonical RAS, the training spacing and shape), but users need it on the **fixed image's own
grid** ``F`` (its affine ``A_F``, any orientation, spacing and size). This module holds that path:

1. :func:`load_pair_inputs` reads and checks the original files (images, label maps, landmark
   CSVs) as :class:`Volume` objects and landmark arrays.
2. The estimate becomes a :class:`GridField`: a backward world displacement ``disp_mm``
   ``(1, ndim, *S)`` in mm, RAS components, on a grid with a known affine (conventions of
   :mod:`regnet.spatial.world`): the fixed point at world ``p`` corresponds to the moving point
   ``p + disp_mm(p)``. :func:`network_field_to_world` builds it from a network's voxel DDF.
3. :func:`complete_registration` resamples that field once onto ``F``
   (:func:`map_to_fixed_grid`), warps the *original* moving image (linear) and label map
   (nearest) with it, resampling each once, computes the Jacobian determinant and the metrics,
   and returns a :class:`RegistrationResult`.

Landmarks (``(N, 3)`` RAS mm, 3D images only) are mapped through the field on the grid it was
estimated on (:func:`map_points`: fixed landmark ``p`` goes to ``p + disp_mm(p)``) and compared
with the moving landmarks (TRE).

2D and 3D images are handled alike (``ndim`` 2 or 3; both images of a pair have the same). Files
are read by :func:`regnet.data.io.read_image` (every format ITK reads); a 2D image's affine is
``(4, 4)`` whose rows/columns 0, 1 and 3 are its in-plane part (:mod:`regnet.spatial.world`), and
its world vectors have components ``(x, y)`` RAS.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from regnet import __version__
from regnet.bundled import resolve_checkpoint
from regnet.checkpoint import read_checkpoint
from regnet.data.io import DataError, read_header, read_image, read_landmarks
from regnet.data.validate import check_image_content, check_overlap
from regnet.metrics import dice_per_label, hd95, tre
from regnet.metrics.jacobian import determinant_stats
from regnet.spatial import jacobian_determinant, sample
from regnet.spatial.world import (
    GRID_AXES,
    ddf_to_world,
    resample_world_field,
    warp_world,
    world_points_to_voxel,
    world_to_ddf,
)

LANDMARK_NDIM = 3


@dataclass(frozen=True)
class Volume:
    """An image as stored on disk.

    Attributes:
        path: the file (or DICOM series folder).
        data: ``(1, 1, *S)`` on the CPU, ``S = (I, J[, K])`` in nibabel array axis order
            (:mod:`regnet.data.io`); float32 for images, int64 for label maps.
        affine: ``(4, 4)`` float64 voxel -> RAS mm affine of the file.
        header: the file's NIfTI header (``None`` for other formats), reused for outputs.
        dtype: the voxel type stored in the file (e.g. ``uint8`` for an 8-bit PNG).
    """

    path: Path
    data: torch.Tensor
    affine: np.ndarray
    header: nib.Nifti1Header | None
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        """2 or 3."""
        return self.data.dim() - 2

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(I, J[, K])``."""
        return tuple(self.data.shape[2:])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, : self.ndim], axis=0))


def load_volume(path: str | Path, labels: bool = False) -> Volume:
    """Read a 2D or 3D image (or integer label map with ``labels=True``) with its affine, in
    any format of :mod:`regnet.data.io`.

    Raises:
        DataError: ``<path>: <problem>`` if the file is missing, not a readable image, neither
            2D nor 3D, holds NaN/Inf voxels, has a singular affine, or (labels) holds
            non-integer values.
    """
    image = read_image(path)
    path, shape = image.path, image.array.shape
    if image.array.size == 0:  # before the dimension, which an empty array does not keep
        check_image_content(path, image.array)
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: is {len(shape)}D with shape {shape}; expected a 2D or 3D image")
    affine = image.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: voxel-to-world affine is singular or not finite")
    try:
        array = np.asarray(image.array, dtype=np.float64 if labels else np.float32)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: voxel data cannot be read ({type(error).__name__})") from None
    if not np.isfinite(array).all():
        raise DataError(f"{path}: contains NaN or Inf voxels")
    if labels:
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{path}: label map holds non-integer values")
        tensor = torch.from_numpy(array.astype(np.int64))
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return Volume(path, tensor[None, None], affine, image.nifti_header, image.array.dtype)


@dataclass(frozen=True)
class PairInputs:
    """The original files of one pair, checked. Landmarks are ``(N, 3)`` float64 RAS mm."""

    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None = None
    moving_labels: Volume | None = None
    fixed_landmarks: np.ndarray | None = None
    moving_landmarks: np.ndarray | None = None
    landmark_paths: tuple[Path, Path] | None = None

    def describe(self) -> dict[str, str]:
        """Input file paths by role, for ``metrics.json``."""
        files = {"fixed": self.fixed.path, "moving": self.moving.path}
        if self.fixed_labels is not None and self.moving_labels is not None:
            files.update(fixed_labels=self.fixed_labels.path, moving_labels=self.moving_labels.path)
        if self.landmark_paths is not None:
            files.update(
                fixed_landmarks=self.landmark_paths[0], moving_landmarks=self.landmark_paths[1]
            )
        return {role: str(path) for role, path in files.items()}


def _check_same_grid(labels: Volume, image: Volume) -> None:
    if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-3):
        raise DataError(
            f"{labels.path}: label grid (shape {labels.shape}) differs from its image "
            f"{image.path} (shape {image.shape}) in shape or affine"
        )


def _landmarks(source: str | Path | np.ndarray | torch.Tensor, affine: np.ndarray) -> np.ndarray:
    if isinstance(source, (str, Path)):
        return read_landmarks(source, affine)
    points = np.asarray(source.cpu() if isinstance(source, torch.Tensor) else source, np.float64)
    if points.ndim != 2 or points.shape[1] != LANDMARK_NDIM:
        raise DataError(f"landmarks: expected (N, 3) RAS mm points, got shape {points.shape}")
    return points


def load_pair_inputs(
    fixed: str | Path,
    moving: str | Path,
    labels: Sequence[str | Path] | None = None,
    landmarks: Sequence[str | Path | np.ndarray] | None = None,
) -> PairInputs:
    """Read and check a pair: images (both 2D or both 3D), optional ``labels=(fixed, moving)``
    label maps (each on its image's grid) and, for 3D images, ``landmarks=(fixed, moving)``, CSV
    files (see :func:`regnet.data.io.read_landmarks`) or ``(N, 3)`` RAS mm arrays, with the same
    number of points, corresponding row by row.

    Both images must hold voxels, not be constant, and their fields of view must overlap in
    world space (:mod:`regnet.data.validate`).

    Raises:
        DataError: one line naming the offending file.
    """
    fixed_volume, moving_volume = load_volume(fixed), load_volume(moving)
    if moving_volume.ndim != fixed_volume.ndim:
        raise DataError(
            f"{moving_volume.path}: is {moving_volume.ndim}D, the fixed image "
            f"{fixed_volume.path} is {fixed_volume.ndim}D; both must have the same dimension"
        )
    for volume in (fixed_volume, moving_volume):
        check_image_content(volume.path, volume.data)
    check_overlap(
        fixed_volume.path,
        fixed_volume.shape,
        fixed_volume.affine,
        moving_volume.path,
        moving_volume.shape,
        moving_volume.affine,
    )
    fixed_labels = moving_labels = None
    if labels is not None:
        fixed_labels, moving_labels = (load_volume(p, labels=True) for p in labels)
        _check_same_grid(fixed_labels, fixed_volume)
        _check_same_grid(moving_labels, moving_volume)
    fixed_points = moving_points = landmark_paths = None
    if landmarks is not None:
        if fixed_volume.ndim != LANDMARK_NDIM:
            raise DataError(f"{fixed_volume.path}: is 2D; landmarks need 3D images")
        fixed_points = _landmarks(landmarks[0], fixed_volume.affine)
        moving_points = _landmarks(landmarks[1], moving_volume.affine)
        names = [str(p) if isinstance(p, (str, Path)) else "moving landmarks" for p in landmarks]
        if len(fixed_points) != len(moving_points) or len(fixed_points) == 0:
            raise DataError(
                f"{names[1]}: {len(moving_points)} landmarks, the fixed ones ({names[0]}) have "
                f"{len(fixed_points)}; need the same number (> 0)"
            )
        if all(isinstance(p, (str, Path)) for p in landmarks):
            landmark_paths = (Path(landmarks[0]), Path(landmarks[1]))
    return PairInputs(
        fixed_volume,
        moving_volume,
        fixed_labels,
        moving_labels,
        fixed_points,
        moving_points,
        landmark_paths,
    )


@dataclass(frozen=True)
class GridField:
    """A backward world displacement on a grid: ``disp_mm`` ``(1, ndim, *S)`` mm, RAS
    components, and the grid's ``(4, 4)`` voxel -> RAS ``affine``. Fixed world point ``p``
    corresponds to moving world point ``p + disp_mm(p)``."""

    disp_mm: torch.Tensor
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.disp_mm.shape[2:])

    @classmethod
    def zeros(cls, shape: Sequence[int], affine: np.ndarray) -> GridField:
        """The identity transform on a grid of ``len(shape)`` dimensions."""
        return cls(torch.zeros(1, len(shape), *shape), np.asarray(affine, np.float64))


def network_field_to_world(
    ddf: torch.Tensor, fixed_grid_affine: np.ndarray, moving_grid_affine: np.ndarray
) -> GridField:
    """World field of a network's voxel DDF between two network grids.

    The network maps fixed-grid voxel ``x`` to moving-grid voxel ``x + u(x)``, i.e. world point
    ``A_f x`` to ``A_m (x + u(x))`` (see :func:`regnet.data.preprocess.pair_item`), so
    ``disp_mm(x) = A_m[:n, :n] u(x) + (A_m - A_f) (x, 1)`` (``n = ndim``; for 2D the affines'
    in-plane rows/columns 0, 1, 3). When both grids coincide this is
    :func:`regnet.spatial.world.ddf_to_world`.

    Args:
        ddf: ``(1, ndim, *S)`` voxels of the fixed network grid, tensor axis order.
        fixed_grid_affine, moving_grid_affine: ``(4, 4)`` voxel -> RAS affines of the two
            preprocessed network grids (same shape ``S``).

    Returns:
        :class:`GridField` on the fixed network grid (float32, on ``ddf``'s device).
    """
    ndim = ddf.shape[1]
    fixed_affine = np.asarray(fixed_grid_affine, np.float64).reshape(4, 4)
    moving_affine = np.asarray(moving_grid_affine, np.float64).reshape(4, 4)
    disp = ddf_to_world(ddf.float(), moving_affine)
    keep = GRID_AXES[ndim]
    offset = torch.from_numpy(moving_affine - fixed_affine)[keep][:, keep][:ndim].to(ddf.device)
    if offset.abs().max() > 0:
        axes = [torch.arange(n, dtype=torch.float64, device=ddf.device) for n in ddf.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *S) voxel indices
        shift = torch.einsum("ij,j...->i...", offset[:, :ndim], grid)
        shift = shift + offset[:, ndim].view(ndim, *([1] * ndim))
        disp = disp + shift[None].to(disp.dtype)
    return GridField(disp, fixed_affine)


def map_to_fixed_grid(
    grid_field: GridField, fixed_affine: np.ndarray, fixed_shape: Sequence[int]
) -> GridField:
    """Resample a world field onto the fixed image's grid (linear, border values outside the
    source grid); the vectors stay in mm RAS. ``disp_F = resample_world_field(disp_G, A_G, A_F,
    shape_F)``."""
    fixed_affine = np.asarray(fixed_affine, np.float64)
    if tuple(fixed_shape) == grid_field.shape and np.allclose(
        fixed_affine, grid_field.affine, atol=1e-6
    ):
        return GridField(grid_field.disp_mm, fixed_affine)
    disp = resample_world_field(grid_field.disp_mm, grid_field.affine, fixed_affine, fixed_shape)
    return GridField(disp, fixed_affine)


def map_points(points_mm: np.ndarray, grid_field: GridField) -> np.ndarray:
    """Map fixed-space points through the transform: ``p -> p + disp_mm(p)``.

    Args:
        points_mm: ``(N, 3)`` RAS mm in fixed space.
        grid_field: the transform; ``disp_mm`` is interpolated linearly at each point (border
            values outside its grid).

    Returns:
        ``(N, 3)`` float64 RAS mm: the corresponding moving-space points.
    """
    points = np.asarray(points_mm, np.float64).reshape(-1, LANDMARK_NDIM)
    voxels = world_points_to_voxel(points, grid_field.affine)  # (N, 3)
    coords = torch.from_numpy(voxels).T.reshape(1, LANDMARK_NDIM, -1, 1, 1)
    disp = grid_field.disp_mm.double()
    sampled = sample(disp, coords.to(disp.device), mode="linear", padding="border")
    return points + sampled.reshape(LANDMARK_NDIM, -1).T.cpu().numpy()


@dataclass
class RegistrationResult:
    """A registration on the fixed image's grid ``F`` (tensors on the CPU).

    Attributes:
        field: the transform on ``F`` (``disp_mm`` ``(1, ndim, *S_F)`` float32, mm RAS,
            backward).
        warped: ``(1, 1, *S_F)`` float32, the original moving image resampled once (linear).
        warped_labels: ``(1, 1, *S_F)`` int64 (nearest), when the pair has label maps.
        jacobian: ``(*S_F)`` float32, ``det`` of the transform's Jacobian (unitless; ``<= 0``
            marks folding).
        metrics: see :func:`registration_metrics`.
        seconds: wall-clock time of estimating the transform (as given by the caller).
    """

    field: GridField
    warped: torch.Tensor
    warped_labels: torch.Tensor | None
    jacobian: torch.Tensor
    metrics: dict[str, Any]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def registration_metrics(
    inputs: PairInputs,
    fixed_field: GridField,
    warped_labels: torch.Tensor | None,
    landmark_field: GridField,
    determinant: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Evaluation metrics of a registration (never the training cost).

    Keys: ``folding_percent`` (% of fixed-grid voxels with ``det J <= 0``) and ``sdlogj``
    (std of ``log det J``) of the field on ``F`` (``determinant``: its ``det J`` when already
    computed, float32 or wider; the statistics are taken in float64); with label maps ``dice``
    and ``hd95`` (mm) ``{label: value}`` over the label values ``> 0`` present in either map,
    plus ``dice_mean``
    and ``hd95_mean`` (HD95 is ``None`` for a label missing from one map, and left out of the
    mean); with landmarks
    ``tre_mm`` (mean, std, median, max over the ``N`` pairs, mm), where fixed landmarks are
    mapped through ``landmark_field`` (:func:`map_points`).
    """
    metrics: dict[str, Any] = {}
    if determinant is None:
        ddf = world_to_ddf(fixed_field.disp_mm, fixed_field.affine)
        determinant = jacobian_determinant(ddf)
    metrics.update({k: float(v) for k, v in determinant_stats(determinant).items()})
    if warped_labels is not None and inputs.fixed_labels is not None:
        fixed_labels = inputs.fixed_labels.data
        dice = dice_per_label(warped_labels, fixed_labels)
        distances = hd95(warped_labels, fixed_labels, inputs.fixed.spacing, labels=list(dice))
        metrics["dice"] = {str(label): float(value) for label, value in dice.items()}
        metrics["dice_mean"] = _finite_mean(list(dice.values()))
        metrics["hd95"] = {
            str(label): (float(value) if np.isfinite(value) else None)
            for label, value in distances.items()
        }
        metrics["hd95_mean"] = _finite_mean(list(distances.values()))
    if inputs.fixed_landmarks is not None and inputs.moving_landmarks is not None:
        mapped = map_points(inputs.fixed_landmarks, landmark_field)
        errors = tre(inputs.moving_landmarks, mapped).distances
        metrics["tre_mm"] = {
            "mean": float(errors.mean()),
            "std": float(errors.std()),
            "median": float(np.median(errors)),
            "max": float(errors.max()),
            "n": int(errors.size),
        }
    return metrics


def complete_registration(
    inputs: PairInputs, grid_field: GridField, seconds: float, **info: Any
) -> RegistrationResult:
    """Bring a transform estimated on any grid to the fixed image's grid and evaluate it.

    The field is resampled once onto ``F``; the original moving image (linear, zeros outside)
    and label map (nearest) are warped once from their own grids with
    :func:`regnet.spatial.world.warp_world`. Runs on ``grid_field.disp_mm``'s device; results are
    returned on the CPU.

    Args:
        inputs: the pair's original files.
        grid_field: the estimated transform on its own grid.
        seconds: time spent estimating it, reported as ``metrics["seconds"]``.
        info: extra entries stored in :attr:`RegistrationResult.info` (e.g. ``method``).
    """
    fixed = inputs.fixed
    device = grid_field.disp_mm.device
    fixed_field = map_to_fixed_grid(grid_field, fixed.affine, fixed.shape)
    disp = fixed_field.disp_mm.float()
    warped = warp_world(inputs.moving.data.to(device), inputs.moving.affine, disp, fixed.affine)
    warped_labels = None
    if inputs.moving_labels is not None:
        moving_labels = inputs.moving_labels.data.to(device, torch.float64)
        warped_labels = warp_world(
            moving_labels, inputs.moving_labels.affine, disp.double(), fixed.affine, "nearest"
        )
        warped_labels = warped_labels.round().long().cpu()
    # float32, the field's own precision: on a 1 mm brain field within 5e-7 of float64, 0.31
    # instead of 0.92 s on 2 threads
    determinant = jacobian_determinant(world_to_ddf(disp, fixed.affine)).cpu()
    fixed_field = GridField(disp.cpu(), fixed.affine)
    metrics = registration_metrics(inputs, fixed_field, warped_labels, grid_field, determinant)
    jacobian = determinant[0].float()
    metrics["seconds"] = float(seconds)
    return RegistrationResult(
        fixed_field, warped.float().cpu(), warped_labels, jacobian, metrics, float(seconds), info
    )


class Stopwatch:
    """Wall-clock timer that waits for queued CUDA work before reading the clock."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def seconds(self) -> float:
        """Seconds since construction."""
        return self._now() - self.start


# ---------------------------------------------------------------------------------------------
# Networks: checkpoint -> model + the preprocessing it was trained with.


@dataclass(frozen=True)
class Preprocessing:
    """Network-grid preprocessing (see :mod:`regnet.data.preprocess`) of ``ndim``-D images:
    resample to ``spacing`` mm (``None``: keep each file's), crop/pad to ``shape`` voxels
    (``None``: keep) about the grid's or the foreground's ``centre``, scale intensities between
    ``percentiles`` to [0, 1]."""

    spacing: tuple[float, ...] | None
    shape: tuple[int, ...] | None
    percentiles: tuple[float, float] = (1.0, 99.0)
    centre: str = "grid"
    ndim: int = 3

    def apply(self, inputs: PairInputs) -> dict[str, Any]:
        """Preprocess the pair's images (:func:`regnet.data.preprocess.load_pair`): ``fixed``,
        ``moving`` ``(1, *shape)`` float32 and their grids' ``fixed_affine``, ``moving_affine``
        ``(4, 4)`` float64."""
        from regnet.data.preprocess import load_pair  # MONAI: seconds to import, networks only

        return load_pair(
            inputs.fixed.path,
            inputs.moving.path,
            ndim=self.ndim,
            spacing=None if self.spacing is None else list(self.spacing),
            shape=None if self.shape is None else list(self.shape),
            percentiles=self.percentiles,
            centre=self.centre,
        )


def _setting(data: Mapping[str, Any], key: str) -> Any:
    """``key`` from a data config: the validation, then training dataset spec, then the
    DataModule itself."""
    for node in (data.get("val"), data.get("train"), data):
        if isinstance(node, Mapping) and node.get(key) is not None:
            return node[key]
    return None


def preprocessing_from_config(config: Mapping[str, Any], ndim: int = 3) -> Preprocessing:
    """The :class:`Preprocessing` of a resolved training config (its ``data`` section) for a
    network of ``ndim`` dimensions.

    The spacing is the data's ``spacing`` (file datasets) or ``spacing_mm`` (generators that
    declare the voxel size they render at, e.g. :class:`regnet.data.synth_brain.SynthBrainPairs`).
    Synthetic data without either has no spacing: files are then kept at their own spacing
    (reoriented to RAS) and cropped/padded to the training ``shape``.
    """
    data = config.get("data") or {}
    spacing = _setting(data, "spacing")
    if spacing is None:
        spacing = _setting(data, "spacing_mm")
    if spacing is not None:
        spacing = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(map(float, spacing))
    shape = _setting(data, "shape")
    percentiles = _setting(data, "percentiles") or (1.0, 99.0)
    return Preprocessing(
        spacing,
        None if shape is None else tuple(int(n) for n in shape),
        (float(percentiles[0]), float(percentiles[1])),
        str(_setting(data, "centre") or "grid"),
        ndim,
    )


def _version_key(version: str) -> tuple[int, ...]:
    """Compatibility key: the major version, and the minor one while the major is 0."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:2]] + [0, 0]
    return (parts[0],) if parts[0] > 0 else (0, parts[1])


@dataclass
class Network:
    """A trained registration network: ``model`` (eval mode, on its device), the resolved
    training ``config`` and the :class:`Preprocessing` it implies."""

    path: Path
    model: nn.Module
    config: dict[str, Any]
    preprocessing: Preprocessing
    version: str

    def check_images(self, *paths: str | Path) -> None:
        """Check from their headers that the images have the network's dimension.

        Raises:
            DataError: ``<image>: is 3D; the checkpoint <path> holds a 2D model`` (or the
                reverse) for the first image that does not.
        """
        ndim = self.preprocessing.ndim
        for path in paths:
            rank = len(read_header(path).shape)
            if rank != ndim:
                raise DataError(
                    f"{path}: is {rank}D; the checkpoint {self.path} holds a {ndim}D model"
                )


def load_network(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """Rebuild the network of a checkpoint written by ``regnet-train`` (``path``: a file, or the
    name of a bundled model, :func:`regnet.bundled.resolve_checkpoint`).

    The model is instantiated from ``hyper_parameters["config"]["model"]`` (a Hydra
    ``_target_`` spec, see :class:`regnet.module.RegistrationModule`) and loads the ``model.*``
    weights strictly. The file is read without running code from it
    (:func:`regnet.checkpoint.read_checkpoint`).

    Raises:
        DataError: ``<path>: <problem>`` for a missing or unreadable file, one that only
            arbitrary unpickling could read, a checkpoint that was not written by regnet-train,
            one of an incompatible regnet version, a model that is neither 2D nor 3D, or weights
            that do not fit the model.
    """
    path = resolve_checkpoint(path)
    checkpoint = read_checkpoint(path)
    config = config_section(checkpoint, "hyper_parameters", "config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise DataError(
            f"{path}: not a regnet checkpoint (no hyper_parameters.config.model from regnet-train)"
        )
    version = str(checkpoint.get("regnet_version", "unknown"))
    if version == "unknown" or _version_key(version) != _version_key(__version__):
        raise DataError(
            f"{path}: written by regnet {version}, incompatible with this regnet {__version__}"
        )
    from hydra.utils import instantiate  # only networks need it; keeps the CLIs' start fast

    try:
        model = instantiate(config["model"], _convert_="all")
    except Exception as error:  # Hydra wraps every construction error
        problem = " ".join(str(error).split())[:300]
        raise DataError(f"{path}: its model config cannot be built ({problem})") from None
    ndim = int(getattr(model, "ndim", 3))
    if ndim not in (2, 3):
        raise DataError(f"{path}: holds a {ndim}D model; only 2D and 3D images are supported")
    prefix = "model."
    state = {
        key[len(prefix) :]: value
        for key, value in (checkpoint.get("state_dict") or {}).items()
        if key.startswith(prefix)
    }
    missing, unexpected = _state_mismatch(model, state)
    if missing or unexpected:
        raise DataError(
            f"{path}: weights do not fit the model in its config "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:2]})"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # shapes differ
        problem = " ".join(str(error).split())[:300]
        raise DataError(f"{path}: weights do not fit the model in its config ({problem})") from None
    model.eval().to(device)
    return Network(path, model, dict(config), preprocessing_from_config(config, ndim), version)


def _state_mismatch(model: nn.Module, state: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def config_section(config: Mapping[str, Any], *keys: str) -> Any:
    """``config[k0][k1]...`` or ``None`` when a level is missing or not a mapping."""
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def run_network(
    network: Network, item: Mapping[str, Any], device: torch.device | str, bf16: bool = False
) -> torch.Tensor:
    """The network's DDF for a preprocessed pair item (:meth:`Preprocessing.apply`).

    Runs under ``torch.inference_mode()``; ``bf16`` enables bfloat16 autocast for the network on
    CUDA (ignored on the CPU). Returns ``(1, ndim, *shape)`` float32 voxels of the fixed network
    grid, on ``device``.
    """
    device = torch.device(device)
    fixed = torch.as_tensor(item["fixed"])[None].float().to(device)
    moving = torch.as_tensor(item["moving"])[None].float().to(device)
    use_bf16 = bf16 and device.type == "cuda"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
        ddf = network.model(fixed, moving)["ddf"]
    return ddf.float().clone()
