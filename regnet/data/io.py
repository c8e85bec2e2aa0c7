"""Reading images, image headers, landmarks and dataset lists from disk.

Conventions (used by :mod:`regnet.data.preprocess`, :mod:`regnet.data.layouts` and
:mod:`regnet.pipeline`):

* **Images** are 2D or 3D files in any format ITK reads: NIfTI (``.nii``, ``.nii.gz``) and MGH
  (``.mgz``, ``.mgh``) through nibabel, everything else (MetaImage ``.mha``/``.mhd``, NRRD
  ``.nrrd``/``.nhdr``, ``.png``, ``.jpg``, ``.tif``, ``.bmp``, a folder holding one DICOM series
  ...) through SimpleITK. Every image comes with the 4x4 voxel -> world affine of regnet's
  convention (:mod:`regnet.spatial.world`: RAS+, millimetres) and its voxels in **nibabel array
  axis order** ``(i, j[, k])``: ``array[i, j, k]`` is ITK index ``(i, j, k)``, i.e. the transpose
  of SimpleITK's ``GetArrayFromImage`` (which is ``(k, j, i)``). ITK's LPS origin, spacing and
  direction cosines (oblique included) are kept exactly
  (:func:`regnet.spatial.world.itk_geometry_to_affine`); a 2D image lies in the plane ``z = 0``
  unless its NIfTI affine says otherwise. RGB images are read as their luminance
  (:data:`RGB_LUMINANCE`); other multi-component images are refused.
* Headers are read without voxel data (nibabel's lazy proxy; SimpleITK's
  ``ReadImageInformation``; a DICOM series is read in full), so a dataset can validate every row
  cheaply when it is built.
* **Landmarks** are ``(N, 3)`` float64 points in **world millimetres, RAS+** (NIfTI convention;
  ITK/ANTs/Slicer LPS points need their x and y negated). A landmark CSV has a header row naming
  the columns ``x,y,z`` (other columns are ignored). A CSV without a header row is read as
  Learn2Reg keypoints: voxel indices ``(i, j, k)`` of the image the file belongs to, converted to
  RAS mm with that image's affine.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from regnet.spatial.world import itk_geometry_to_affine

if TYPE_CHECKING:
    import SimpleITK as sitk

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
"""File endings read with nibabel; every other image goes through SimpleITK."""

IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".mgz",
    ".mgh",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
)
"""File endings of image files (folders of images are searched for these; output names drop
them). A DICOM series is given as its folder."""

RGB_LUMINANCE = np.array([0.299, 0.587, 0.114])
"""Weights of R, G, B in the luminance an RGB image is read as (ITU-R BT.601)."""


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the row and the file."""


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file: ``shape`` (spatial, nibabel axis order) and its 4x4 voxel->RAS
    ``affine`` (float64, mm)."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray


@dataclass(frozen=True)
class ImageFile:
    """An image read from disk: ``array`` (spatial, nibabel axis order, the file's dtype, or
    float for scaled NIfTI data and RGB luminance), its 4x4 voxel->RAS ``affine`` (float64, mm)
    and ``nifti_header`` (``None`` unless the file is NIfTI-1)."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    nifti_header: nib.Nifti1Header | None


def _reads_with_nibabel(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIBABEL_SUFFIXES)


def _check_exists(path: Path) -> None:
    if not path.is_file() and not path.is_dir():
        raise DataError(f"{path}: file not found")


def _first_line(error: Exception) -> str:
    """SimpleITK's multi-line exception text reduced to its last informative line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _simpleitk():
    """SimpleITK, imported on first use: NIfTI files never need it (0.15 s of start-up)."""
    import SimpleITK

    return SimpleITK


def _dicom_series(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in slice order (GDCM)."""
    sitk = _simpleitk()
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise DataError(
            f"{folder}: folder holds {len(series)} DICOM series; give the folder of one"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))


def _itk_affine(image: sitk.Image | sitk.ImageFileReader, path: Path) -> np.ndarray:
    try:
        return itk_geometry_to_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    except ValueError:
        raise DataError(f"{path}: is {image.GetDimension()}D; expected a 2D or 3D image") from None


def read_header(path: str | Path) -> ImageHeader:
    """Read an image's shape and affine without loading its voxels (module docstring).

    Raises :class:`DataError` naming the file if it is missing or not a readable image.
    """
    path = Path(path)
    _check_exists(path)
    if _reads_with_nibabel(path):
        try:
            image = nib.load(str(path))
        except Exception as error:  # nibabel raises several unrelated types for unreadable files
            raise DataError(f"{path}: not a readable image ({error})") from error
        affine = getattr(image, "affine", None)
        if affine is None:
            raise DataError(f"{path}: image has no voxel-to-world affine")
        return ImageHeader(path, tuple(int(n) for n in image.shape), np.asarray(affine, np.float64))
    if path.is_dir():
        image = read_image(path)
        return ImageHeader(path, image.array.shape, image.affine)
    reader = _simpleitk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"{path}: not a readable image ({_first_line(error)})") from None
    return ImageHeader(path, tuple(int(n) for n in reader.GetSize()), _itk_affine(reader, path))


def read_image(path: str | Path) -> ImageFile:
    """Read an image's voxels and affine (module docstring: formats, axis order, geometry).

    Raises:
        DataError: ``<path>: <problem>`` for a missing file, a file no reader understands, a
            folder without exactly one DICOM series, or a multi-component image other than RGB.
    """
    path = Path(path)
    _check_exists(path)
    if _reads_with_nibabel(path):
        try:
            image = nib.load(str(path))
            array = np.asarray(image.dataobj)
        except Exception as error:  # nibabel raises many unrelated types for non-image files
            raise DataError(f"{path}: not a readable image ({type(error).__name__})") from None
        header = image.header if isinstance(image, nib.Nifti1Image) else None
        return ImageFile(path, array, np.asarray(image.affine, np.float64), header)
    sitk = _simpleitk()
    try:
        if path.is_dir():
            image = sitk.ReadImage(_dicom_series(path))
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"{path}: not a readable image ({_first_line(error)})") from None
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3):
        raise DataError(
            f"{path}: has {components} components per voxel; expected a scalar or RGB image"
        )
    affine = _itk_affine(image, path)
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, component])
    if components == 3:
        array = array @ RGB_LUMINANCE
    return ImageFile(path, np.ascontiguousarray(array.transpose()), affine, None)


def same_grid(a: ImageHeader, b: ImageHeader, atol: float = 1e-3) -> bool:
    """True if two headers describe the same voxel grid (shape and affine within ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def voxel_to_world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Map voxel indices ``(N, 3)`` to world mm ``(N, 3)`` with a 4x4 ``affine``."""
    voxels = np.asarray(voxels, np.float64)
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map world mm ``(N, 3)`` to (fractional) voxel indices ``(N, 3)`` with a 4x4 ``affine``."""
    return voxel_to_world(np.linalg.inv(affine), points)


def read_landmarks(path: str | Path, image_affine: np.ndarray | None = None) -> np.ndarray:
    """Read landmarks as ``(N, 3)`` float64 RAS mm.

    A header row with columns ``x,y,z`` means RAS mm. Without a header the rows are Learn2Reg
    voxel indices ``(i, j, k)`` and ``image_affine`` (4x4, of the image they were placed on) is
    required to convert them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: landmark file not found")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        return np.zeros((0, 3), np.float64)
    header = [cell.strip().lower() for cell in rows[0]]
    try:
        if {"x", "y", "z"} <= set(header):
            columns = [header.index(name) for name in ("x", "y", "z")]
            points = np.array([[float(row[c]) for c in columns] for row in rows[1:]], np.float64)
            return points.reshape(-1, 3)
        voxels = np.array([[float(cell) for cell in row[:3]] for row in rows], np.float64)
    except (ValueError, IndexError) as error:
        raise DataError(f"{path}: not a landmark CSV with columns x,y,z ({error})") from error
    if voxels.shape[1] != 3:
        raise DataError(f"{path}: landmark rows need 3 coordinates, got {voxels.shape[1]}")
    if image_affine is None:
        raise DataError(f"{path}: CSV has no x,y,z header (voxel keypoints) and no image affine")
    return voxel_to_world(image_affine, voxels)


def read_pair_list(path: str | Path) -> list[dict[str, str]]:
    """Read a pair list: a CSV with a header row or a JSON list of objects.

    Returns one dict per data row (empty cells dropped), in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pair list not found")
    if path.suffix.lower() == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise DataError(f"{path}: expected a JSON list of objects")
    else:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    return [
        {str(k).strip(): str(v).strip() for k, v in row.items() if k and v not in (None, "")}
        for row in rows
    ]
