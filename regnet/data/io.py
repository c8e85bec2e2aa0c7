"""Reading image headers, landmarks and dataset lists from disk.

Conventions (used by :mod:`regnet.data.preprocess` and :mod:`regnet.data.layouts`):

* Images are NIfTI (``.nii``/``.nii.gz``) or any format MONAI's ``LoadImage`` reads; the voxel
  -> world affine is the file's (NIfTI: RAS+, millimetres). Headers are checked with nibabel
  without reading voxel data, so a dataset can validate every row cheaply when it is built.
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

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the row and the file."""


@dataclass(frozen=True)
class ImageHeader:
    """Geometry of an image file: ``shape`` (spatial, nibabel axis order) and its 4x4 voxel->RAS
    ``affine`` (float64, mm)."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray


def read_header(path: str | Path) -> ImageHeader:
    """Read an image's shape and affine without loading its voxels.

    Raises :class:`DataError` naming the file if it is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable image ({error})") from error
    affine = getattr(image, "affine", None)
    if affine is None:
        raise DataError(f"{path}: image has no voxel-to-world affine")
    return ImageHeader(path, tuple(int(n) for n in image.shape), np.asarray(affine, np.float64))


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
