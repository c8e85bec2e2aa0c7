"""Writing a registration result into an output folder, in the fixed image's space and header.

Files (names fixed; :data:`OUTPUT_FILES`), all on the fixed image's grid with its affine as sform
and qform (codes and other header fields copied from the fixed file where it is NIfTI):

``warped.nii.gz``
    the moving image resampled once onto the fixed grid (linear), float32.
``warped_labels.nii.gz``
    the moving label map resampled once (nearest), integer dtype (only with labels).
``disp_mm.nii.gz``
    the backward displacement in mm with **RAS** components, NIfTI vector image
    (``NIFTI_INTENT_DISPVECT``, :func:`regnet.spatial.world.save_displacement_nifti`).
``itk_warp.nii.gz``
    the same field as an ITK/ANTs displacement-field transform (**LPS** components):
    ``antsApplyTransforms -i moving -r fixed -t itk_warp.nii.gz`` and SimpleITK's
    ``Resample(moving, fixed, DisplacementFieldTransform(field))`` reproduce ``warped.nii.gz``.
``affine.tfm``
    the affine stage alone (rigid/affine registrations, and the affine stage of deformable ones:
    ``info["affine_ras_mm"]`` of the result), as an ITK ``AffineTransform_double_3_3`` text file
    mapping fixed LPS physical points to moving ones: ``sitk.ReadTransform`` +
    ``Resample(moving, fixed, transform)`` and ``antsApplyTransforms -i moving -r fixed -t
    affine.tfm`` resample the moving image with it (:func:`regnet.spatial.world.save_itk_affine`).
``jacdet.nii.gz``
    Jacobian determinant of the transform per fixed voxel, float32 (``<= 0``: folding).
``metrics.json``
    metrics (see :func:`regnet.pipeline.registration_metrics`), ``seconds``, input files,
    method and software versions.
``overview.png``
    axial, coronal and sagittal slices through the middle of the fixed grid, in RAS orientation
    with the display convention and L/R, A/P, S/I marks on the figure: fixed, moving, warped,
    differences, checkerboard, deformed grid and Jacobian determinant, each image windowed on its
    own intensities (:func:`regnet.visualize.make_panel`), moving and warped shown on the fixed
    grid.
``warped.png``
    2D pairs only: the warped image as a picture with the fixed image's pixel layout (column =
    array axis ``i``, row = ``j``, as SimpleITK writes a 2D image), see :func:`save_png`. The
    NIfTI files hold the geometry; a PNG has none.

Every input format of :mod:`regnet.data.io` gives these NIfTI outputs (2D images: 2D NIfTI
images, fields ``(X, Y, 1, 1, 2)``); ITK reads them back with the origin, spacing and direction
it reads from the fixed file. For 2D pairs ITK applies ``itk_warp.nii.gz``; it misreads the
components of a 2D ``disp_mm.nii.gz`` (see :func:`regnet.spatial.world.save_displacement_nifti`).

Safety: :func:`check_output_dir` refuses a folder that already holds files unless ``overwrite``;
:func:`staged_output` writes into a temporary sibling folder and moves the files into place only
when everything was written, so a failure leaves no half-written results.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from regnet import __version__
from regnet.pipeline import GridField, PairInputs, RegistrationResult, Volume
from regnet.spatial.world import (
    FIELD_GZIP_LEVEL,
    fortran_order,
    save_displacement_nifti,
    save_itk_affine,
    save_itk_displacement,
    save_nifti,
    warp_world,
    world_to_ddf,
)
from regnet.visualize import make_panel

OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "warped_labels": "warped_labels.nii.gz",
    "disp_mm": "disp_mm.nii.gz",
    "itk_warp": "itk_warp.nii.gz",
    "affine": "affine.tfm",
    "jacdet": "jacdet.nii.gz",
    "metrics": "metrics.json",
    "overview": "overview.png",
    "warped_png": "warped.png",
}
"""Output file name by role."""


class OutputExistsError(FileExistsError):
    """The output folder already holds results and ``overwrite`` is off; the message is
    ``<folder>: <problem>``."""


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that exists and is not empty, unless ``overwrite``.

    Raises:
        OutputExistsError: also when ``out_dir`` exists but is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: output folder already holds results; pass overwrite=true to replace them"
        )


@contextmanager
def staged_output(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success move its contents to
    ``out_dir``, on any exception delete it and leave ``out_dir`` as it was.

    A missing ``out_dir`` is created by renaming the staging folder (atomic); otherwise each
    entry replaces its namesake in ``out_dir`` (files with other names stay). The folder is
    checked with :func:`check_output_dir` first and again just before the move.
    """
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        check_output_dir(out_dir, overwrite)
        if not out_dir.exists():
            os.replace(staging, out_dir)
            return
        for entry in sorted(staging.iterdir()):
            target = out_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _fixed_header(fixed: Volume, dtype: np.dtype) -> nib.Nifti1Header:
    """The fixed file's header (or a new one) for data of ``dtype``, scaling reset."""
    header = fixed.header.copy() if fixed.header is not None else nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    header.set_intent("none")
    return header


def save_like_fixed(path: str | Path, data: np.ndarray, fixed: Volume, gzip_level: int = 1) -> Path:
    """Save a 3D array ``(I, J, K)`` on the fixed grid with the fixed image's affine and header
    (sform/qform codes kept from the fixed file; 1 when it had none), at ``gzip_level`` for a
    ``.nii.gz`` path."""
    data = np.asarray(data)
    if data.shape != fixed.shape:
        raise ValueError(f"{path}: data shape {data.shape} differs from fixed shape {fixed.shape}")
    header = _fixed_header(fixed, data.dtype)
    image = nib.Nifti1Image(fortran_order(data), fixed.affine, header=header)
    sform_code = int(header["sform_code"]) or 1
    qform_code = int(header["qform_code"]) or 1
    image.set_sform(fixed.affine, code=sform_code)
    image.set_qform(fixed.affine, code=qform_code)
    save_nifti(image, path, gzip_level)
    return Path(path)


def save_png(path: str | Path, data: np.ndarray, moving: Volume) -> Path:
    """Save a 2D image ``(I, J)`` as a PNG with SimpleITK (pixel column ``i``, row ``j``).

    A moving image stored as ``uint8`` or ``uint16`` keeps its type and intensities (rounded,
    clipped to the type's range); any other is scaled linearly from its own min..max to 0..255.
    """
    data = np.asarray(data, np.float64)
    if moving.dtype in (np.uint8, np.uint16):
        dtype = moving.dtype
    else:
        low, high = float(moving.data.min()), float(moving.data.max())
        data = (data - low) * (255.0 / max(high - low, 1e-12))
        dtype = np.dtype(np.uint8)
    pixels = np.clip(np.round(data), 0, np.iinfo(dtype).max).astype(dtype)
    import SimpleITK as sitk  # 2D outputs only; NIfTI pairs never import it

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(pixels.T)), str(path))
    return Path(path)


def label_dtype(labels: np.ndarray) -> np.dtype:
    """Smallest of uint8, int16, int32, int64 holding every value of an integer label map."""
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def software_versions() -> dict[str, str]:
    """Versions of regnet, Python and the libraries that shape the numbers."""
    versions = {"regnet": __version__, "python": platform.python_version()}
    for package in ("torch", "monai", "nibabel", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def json_ready(value: Any) -> Any:
    """``value`` with numbers, tensors and paths as JSON values (non-finite floats as ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def metrics_record(inputs: PairInputs, result: RegistrationResult) -> dict[str, Any]:
    """The content of ``metrics.json``: the result's metrics, then ``inputs`` (files by role),
    ``info`` (method and settings given to :func:`regnet.pipeline.complete_registration`) and
    ``versions``."""
    return json_ready(
        {
            **result.metrics,
            "inputs": inputs.describe(),
            "info": result.info,
            "versions": software_versions(),
        }
    )


@torch.no_grad()
def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write an RGB image ``(3, H, W)`` in ``[0, 1]`` as an 8-bit PNG, each value rounded to the
    nearest of 0..255 (the pixels ``torchvision.utils.save_image`` writes; torchvision itself
    takes seconds to import)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"save_image: expected an RGB image (3, H, W), got {tuple(image.shape)}")
    pixels = image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
    Image.fromarray(pixels.numpy()).save(path, format="PNG")


def overview_image(inputs: PairInputs, result: RegistrationResult) -> torch.Tensor:
    """RGB overview ``(3, H, W)`` in ``[0, 1]`` on the fixed grid (see the module docstring)."""
    fixed = inputs.fixed
    moving_on_fixed = warp_world(
        inputs.moving.data,
        inputs.moving.affine,
        GridField.zeros(fixed.shape, fixed.affine).disp_mm,
        fixed.affine,
    )
    ddf = world_to_ddf(result.field.disp_mm, fixed.affine)
    panel = make_panel(
        fixed.data[0],
        moving_on_fixed[0],
        result.warped[0],
        ddf[0],
        fixed.affine,
        det=result.jacobian,
    )
    return panel.image


def write_registration(
    out_dir: str | Path,
    inputs: PairInputs,
    result: RegistrationResult,
    overwrite: bool = False,
    overview: bool = True,
) -> dict[str, Path]:
    """Write every output of :data:`OUTPUT_FILES` that applies into ``out_dir`` (see the module
    docstring), staged so that ``out_dir`` gets all files or none.

    Returns:
        Final path by role.

    Raises:
        OutputExistsError: ``out_dir`` already holds files and ``overwrite`` is false.
    """
    fixed = inputs.fixed
    written: dict[str, str] = {}
    with staged_output(out_dir, overwrite) as staging:

        def target(role: str) -> Path:
            written[role] = OUTPUT_FILES[role]
            return staging / OUTPUT_FILES[role]

        disp = result.field.disp_mm.float()
        warped, disp_mm, itk_warp, jacdet = (
            target(role) for role in ("warped", "disp_mm", "itk_warp", "jacdet")
        )
        writes = [
            lambda: save_like_fixed(warped, result.warped[0, 0].numpy().astype(np.float32), fixed),
            lambda: save_displacement_nifti(disp_mm, disp, fixed.affine),
            lambda: save_itk_displacement(itk_warp, disp, fixed.affine),
            lambda: save_like_fixed(
                jacdet, result.jacobian.numpy().astype(np.float32), fixed, FIELD_GZIP_LEVEL
            ),
        ]
        if result.warped_labels is not None:
            labels = result.warped_labels[0, 0].numpy()
            labels_path = target("warped_labels")
            writes.append(
                lambda: save_like_fixed(labels_path, labels.astype(label_dtype(labels)), fixed)
            )
        if fixed.ndim == 2:
            png_path = target("warped_png")
            png_data = result.warped[0, 0].numpy()
            writes.append(lambda: save_png(png_path, png_data, inputs.moving))
        if result.info.get("affine_ras_mm") is not None:
            world_map, affine_path = np.asarray(result.info["affine_ras_mm"]), target("affine")
            # a RAS mm -> RAS mm map is a voxel map between grids whose affines are the identity
            writes.append(lambda: save_itk_affine(affine_path, world_map, np.eye(4), np.eye(4)))
        if overview:
            overview_path = target("overview")
            writes.append(lambda: save_image(overview_image(inputs, result), overview_path))
        # gzip compression dominates writing full-size fields and releases the GIL: one thread
        # per core (a 1 mm brain pair, 2 cores: 12 s of writing serially)
        with ThreadPoolExecutor(max(1, min(len(writes), os.cpu_count() or 1))) as pool:
            for done in [pool.submit(write) for write in writes]:
                done.result()
        record = metrics_record(inputs, result)
        record["outputs"] = dict(written, metrics=OUTPUT_FILES["metrics"])
        target("metrics").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    final = Path(out_dir)
    return {role: final / name for role, name in written.items()}
