"""World space: voxel fields ⇄ millimetres, world-space warping and ITK/ANTs transform files.

This module owns every conversion between regnet's voxel conventions (see :mod:`regnet.spatial`)
and physical space. Its conventions:

* **Affines** are NIfTI voxel→world matrices ``A`` (homogeneous, float64): ``p = A @ (i, j, k, 1)``
  maps a voxel index to a position in **mm, RAS+** (x towards Right, y Anterior, z Superior), as
  nibabel's ``image.affine`` gives it. 3D uses ``(4, 4)``; 2D uses ``(3, 3)`` or the 2D part
  (rows/columns 0, 1, 3) of a ``(4, 4)``. Functions taking fields also accept a batch
  ``(B, ndim+1, ndim+1)``.
* **World displacement fields** ``disp_mm`` have the layout of a DDF, ``(B, ndim, *spatial)`` on a
  grid with a known affine, but hold millimetres with components ``(x, y[, z])`` in **RAS**. They
  keep regnet's **backward** direction: the fixed-grid voxel at world position ``p`` takes the
  moving image's value at world position ``p + disp_mm(p)``.
* A voxel DDF ``u`` relates to ``disp_mm`` through the fixed grid's affine only:
  ``disp_mm = A[:3, :3] @ u``. This holds when the moving image shares the fixed grid, as network
  inputs do; images on other grids are handled in world space by :func:`warp_world`.
* **ITK/ANTs** work in **LPS** physical space: ``p_LPS = diag(-1, -1, 1) @ p_RAS``. ITK reads a
  NIfTI header and turns the grid into LPS itself, but takes the vector components of a
  ``NIFTI_INTENT_VECTOR`` (1007) image as LPS millimetres, unchanged. SimpleITK (ITK 5.4) converts
  components from RAS to LPS only for ``NIFTI_INTENT_DISPVECT`` (1006) images. ITK applies a field
  ``d`` to a fixed physical point as ``T(p) = p + d(p)`` and resamples ``moving(T(p))``: the same
  backward direction as regnet. ITK grids have an orthonormal direction matrix, so an affine
  with shear cannot be represented there exactly.
* **ITK image geometry** (origin, spacing, direction cosines in LPS, as SimpleITK reports them for
  MetaImage, NRRD, DICOM, PNG ...) maps ITK index ``(i, j[, k])`` to the LPS point
  ``origin + direction @ diag(spacing) @ index``; :func:`itk_geometry_to_affine` turns it into
  the voxel→RAS affine of the same index, and :func:`affine_to_itk_geometry` back. A 2D grid
  lies in the plane ``z = 0`` and its affine's third column is ``(0, 0, 1)``.
* **2D fields** are written like 3D ones with a singleton third axis, ``(X, Y, 1, 1, 2)``, which
  ITK reads as a 2D image of 2-vectors.

Files are written atomically: to a temporary file in the target folder, then renamed.
"""

from __future__ import annotations

import gzip
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from regnet.spatial.affine import apply_affine
from regnet.spatial.grid import check_field, check_spatial, identity_grid
from regnet.spatial.warp import sample

ArrayLike = np.ndarray | torch.Tensor

#: RAS ⇄ LPS for 3D positions and vectors (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: Rows/columns of a ``(4, 4)`` affine that form the homogeneous affine of a 2D or 3D grid.
GRID_AXES = {2: [0, 1, 3], 3: [0, 1, 2, 3]}

NIFTI_INTENT_DISPVECT = 1006
NIFTI_INTENT_VECTOR = 1007


def _as_float64(value: ArrayLike) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def _homogeneous(affine: ArrayLike, ndim: int, name: str) -> torch.Tensor:
    """``affine`` as float64 CPU ``(..., ndim+1, ndim+1)``; a 4×4 gives its 2D part for 2D."""
    matrix = _as_float64(affine)
    size = ndim + 1
    if matrix.dim() in (2, 3) and matrix.shape[-2:] == (size, size):
        pass
    elif ndim == 2 and matrix.dim() in (2, 3) and matrix.shape[-2:] == (4, 4):
        keep = torch.tensor(GRID_AXES[2])
        matrix = matrix[..., keep, :][..., :, keep]
    else:
        allowed = f"({size}, {size})" + (" or (4, 4)" if ndim == 2 else "")
        raise ValueError(
            f"{name} must be a {allowed} voxel->world matrix, optionally batched, for {ndim}D "
            f"data, got shape {tuple(matrix.shape)}"
        )
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains non-finite values")
    if (torch.linalg.det(matrix[..., :ndim, :ndim]).abs() < 1e-12).any():
        raise ValueError(f"{name} is singular: its voxel axes do not span {ndim}D space")
    return matrix


def _batched(matrix: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``(1 or batch, n, n)`` from ``(n, n)`` or ``(B, n, n)``, checking the batch size."""
    if matrix.dim() == 2:
        return matrix.unsqueeze(0)
    if matrix.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch size {matrix.shape[0]}, the data has {batch}")
    return matrix


def _apply_linear(linear: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Multiply every vector of ``field`` ``(B, n, *S)`` by ``linear`` ``(1 or B, n, n)``."""
    linear = linear.to(field.dtype).to(field.device)
    return torch.einsum("bij,bj...->bi...", linear.expand(field.shape[0], -1, -1), field)


def _world_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def ddf_to_world(ddf: torch.Tensor, affine: ArrayLike) -> torch.Tensor:
    """Voxel DDF → world displacement: ``disp_mm = A[:ndim, :ndim] @ u`` at every voxel.

    Args:
        ddf: ``(B, ndim, *S)`` displacement in voxels of the grid, tensor axis order.
        affine: voxel→RAS affine of that grid, ``(ndim+1, ndim+1)`` or ``(B, ndim+1, ndim+1)``.

    Returns:
        ``(B, ndim, *S)`` displacement in mm, components ``(x, y[, z])`` RAS, same dtype as ``ddf``.
    """
    ndim = check_field(ddf, "ddf")
    matrix = _batched(_homogeneous(affine, ndim, "affine"), ddf.shape[0], "affine")
    return _apply_linear(matrix[:, :ndim, :ndim], ddf)


def world_to_ddf(disp_mm: torch.Tensor, affine: ArrayLike) -> torch.Tensor:
    """World displacement → voxel DDF (inverse of :func:`ddf_to_world`).

    Args:
        disp_mm: ``(B, ndim, *S)`` displacement in mm, RAS components, on the grid of ``affine``.
        affine: voxel→RAS affine of that grid, ``(ndim+1, ndim+1)`` or ``(B, ndim+1, ndim+1)``.

    Returns:
        ``(B, ndim, *S)`` displacement in voxels of the grid, tensor axis order.
    """
    ndim = check_field(disp_mm, "disp_mm")
    matrix = _batched(_homogeneous(affine, ndim, "affine"), disp_mm.shape[0], "affine")
    return _apply_linear(torch.linalg.inv(matrix[:, :ndim, :ndim]), disp_mm)


def _transform_points(points: ArrayLike, matrix: torch.Tensor, name: str) -> ArrayLike:
    """Apply a homogeneous ``matrix`` to ``(N, ndim)`` points; returns the input's kind/dtype."""
    coords = _as_float64(points)
    ndim = matrix.shape[-1] - 1
    if coords.dim() != 2 or coords.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (N, {ndim}), got {tuple(coords.shape)}")
    out = coords @ matrix[:ndim, :ndim].T + matrix[:ndim, ndim]
    if isinstance(points, torch.Tensor):
        dtype = points.dtype if points.is_floating_point() else torch.float32
        return out.to(dtype).to(points.device)
    return out.numpy()


def _single_affine(affine: ArrayLike, ndim: int) -> torch.Tensor:
    matrix = _homogeneous(affine, ndim, "affine")
    if matrix.dim() == 3:
        if matrix.shape[0] != 1:
            raise ValueError(f"affine must be a single matrix here, got {tuple(matrix.shape)}")
        matrix = matrix[0]
    return matrix


def _points_ndim(points: ArrayLike, name: str) -> int:
    shape = tuple(np.shape(points))
    if len(shape) != 2 or shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3), got {shape}")
    return shape[1]


def voxel_to_world_points(points_vox: ArrayLike, affine: ArrayLike) -> ArrayLike:
    """Landmarks in voxel coordinates ``(N, ndim)`` (tensor axis order) → RAS mm ``(N, ndim)``.

    Returns a NumPy float64 array for NumPy input, a tensor of the input's dtype/device otherwise.
    """
    ndim = _points_ndim(points_vox, "points_vox")
    return _transform_points(points_vox, _single_affine(affine, ndim), "points_vox")


def world_points_to_voxel(points_mm: ArrayLike, affine: ArrayLike) -> ArrayLike:
    """Landmarks in RAS mm ``(N, ndim)`` → voxel coordinates ``(N, ndim)`` of the affine's grid.

    Returns a NumPy float64 array for NumPy input, a tensor of the input's dtype/device otherwise.
    """
    ndim = _points_ndim(points_mm, "points_mm")
    inverse = torch.linalg.inv(_single_affine(affine, ndim))
    return _transform_points(points_mm, inverse, "points_mm")


def _grid_to_grid(
    dst_affine: ArrayLike, src_affine: ArrayLike, ndim: int, batch: int, names: tuple[str, str]
) -> torch.Tensor:
    """``(1 or B, ndim+1, ndim+1)`` float64 map from dst voxels to src voxels (same world point)."""
    dst = _batched(_homogeneous(dst_affine, ndim, names[0]), batch, names[0])
    src = _batched(_homogeneous(src_affine, ndim, names[1]), batch, names[1])
    return torch.linalg.inv(src) @ dst


def resample_world_field(
    disp_mm: torch.Tensor,
    src_affine: ArrayLike,
    dst_affine: ArrayLike,
    dst_shape: Sequence[int],
) -> torch.Tensor:
    """Resample a world displacement field onto another grid, matching world positions.

    The value at destination voxel ``y`` is ``disp_mm`` (linearly interpolated, border padding)
    at the source-grid position of world point ``A_dst @ y``. Values stay in mm RAS: only the grid
    changes, never the vectors.

    Args:
        disp_mm: ``(B, ndim, *S_src)`` displacement in mm RAS on the grid of ``src_affine``.
        src_affine, dst_affine: voxel→RAS affines of the source and destination grids.
        dst_shape: spatial shape of the destination grid.

    Returns:
        ``(B, ndim, *dst_shape)`` displacement in mm RAS.
    """
    ndim = check_field(disp_mm, "disp_mm")
    if len(dst_shape) != ndim:
        raise ValueError(f"dst_shape {tuple(dst_shape)} must have {ndim} entries")
    dtype = _world_dtype(disp_mm)
    names = ("dst_affine", "src_affine")
    matrix = _grid_to_grid(dst_affine, src_affine, ndim, disp_mm.shape[0], names)
    grid = identity_grid(dst_shape, disp_mm.device, dtype)
    coords = apply_affine(matrix.to(dtype).to(disp_mm.device), grid)
    return sample(disp_mm.to(dtype), coords, mode="linear", padding="border")


def warp_world(
    moving: torch.Tensor,
    moving_affine: ArrayLike,
    disp_mm: torch.Tensor,
    fixed_affine: ArrayLike,
    mode: str = "linear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Warp ``moving`` (any grid) onto the fixed grid with a world displacement, resampling once.

    ``out(x) = moving(A_m^-1 (A_f x + disp_mm(x)))`` for fixed voxel ``x``: the moving voxel
    coordinates are ``(A_m^-1 A_f) x + A_m^-1[:ndim, :ndim] disp_mm(x)``, so no world coordinates
    (large in mm) are formed in low precision.

    Where ``moving`` and the grids are those of the NIfTI files, this equals SimpleITK/ANTs
    resampling with the field saved by :func:`save_itk_displacement` (tested to ~3e-6 relative in
    float32) at every point within the moving image's outermost voxel centres. Outside them the
    padding differs: ITK keeps the edge value up to half a voxel out, then gives its default.

    Args:
        moving: ``(B, C, *S_m)`` moving image on the grid of ``moving_affine``.
        moving_affine: voxel→RAS affine of the moving grid.
        disp_mm: ``(B or 1, ndim, *S_f)`` displacement in mm RAS on the fixed grid.
        fixed_affine: voxel→RAS affine of the fixed grid.
        mode: ``"linear"`` or ``"nearest"`` (labels).
        padding: ``"zeros"`` or ``"border"`` outside the moving image.

    Returns:
        ``(B, C, *S_f)`` warped moving image on the fixed grid.
    """
    ndim = check_field(disp_mm, "disp_mm")
    check_spatial(moving, "moving", ndim)
    batch = moving.shape[0]
    if disp_mm.shape[0] not in (1, batch):
        raise ValueError(f"disp_mm has batch size {disp_mm.shape[0]}, moving has {batch}")
    dtype = _world_dtype(moving)
    names = ("fixed_affine", "moving_affine")
    fixed_to_moving = _grid_to_grid(fixed_affine, moving_affine, ndim, batch, names)
    mm_to_moving = torch.linalg.inv(
        _batched(_homogeneous(moving_affine, ndim, "moving_affine"), batch, "moving_affine")
    )[:, :ndim, :ndim]
    grid = identity_grid(disp_mm.shape[2:], disp_mm.device, dtype)
    coords = apply_affine(fixed_to_moving.to(dtype).to(disp_mm.device), grid)
    disp_mm = disp_mm.to(dtype).expand(batch, *disp_mm.shape[1:])
    coords = coords + _apply_linear(mm_to_moving, disp_mm)
    return sample(moving, coords.to(moving.device), mode=mode, padding=padding)


def itk_geometry_to_affine(
    origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """Voxel→RAS ``(4, 4)`` float64 affine of an ITK grid (2D or 3D).

    Args:
        origin: LPS mm position of index 0, ``ndim`` values (``image.GetOrigin()``).
        spacing: mm per index step, ``ndim`` values (``image.GetSpacing()``).
        direction: row-major ``ndim x ndim`` direction cosines (``image.GetDirection()``), LPS.

    Returns:
        ``A`` with ``A @ (i, j[, k], 1)`` the RAS point of ITK index ``(i, j[, k])``; for 2D the
        third column is ``(0, 0, 1, 0)`` and the plane sits at ``z = 0``.
    """
    ndim = len(spacing)
    if ndim not in (2, 3) or len(origin) != ndim or len(direction) != ndim * ndim:
        raise ValueError(
            f"expected a 2D or 3D ITK geometry, got origin {tuple(origin)}, spacing "
            f"{tuple(spacing)}, direction {tuple(direction)}"
        )
    lps = np.eye(4)
    lps[:ndim, :ndim] = np.reshape(np.asarray(direction, np.float64), (ndim, ndim)) * np.asarray(
        spacing, np.float64
    )
    lps[:ndim, 3] = np.asarray(origin, np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def affine_to_itk_geometry(
    affine: ArrayLike, ndim: int
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` in LPS of a voxel→RAS affine's grid, as SimpleITK's
    ``SetOrigin``/``SetSpacing``/``SetDirection`` take them (inverse of
    :func:`itk_geometry_to_affine`; for ``ndim=2`` the in-plane part, rows/columns 0 and 1).
    Shear, which ITK cannot represent, is not checked: the direction is the affine's normalised
    columns."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _single_affine(affine, 3).numpy()
    linear = lps[:ndim, :ndim]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return (
        tuple(float(v) for v in lps[:ndim, 3]),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.reshape(-1)),
    )


def _atomic_write(path: str | os.PathLike, suffixes: Sequence[str], write: Callable) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    suffix = next((s for s in suffixes if path.name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{path}: file name must end with one of {list(suffixes)}")
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


FIELD_GZIP_LEVEL = 0
"""gzip level of displacement fields (and of ``register.py``'s Jacobian determinant map) written
as ``.nii.gz``: stored blocks, no deflate. Their float32 values have noise-like low mantissa bits:
at level 1 deflate saved 9 % of a 1 mm brain field (197x233x189x3, 104 MB) and took 2.7 s of one
thread per file (0.14 s stored), and 24 % of that pair's determinant map (34 MB) in 0.6 s (0.04 s
stored). Any gzip reader reads either."""


def fortran_order(array: np.ndarray) -> np.ndarray:
    """``array``'s values, Fortran-contiguous: the layout NIfTI stores (first axis fastest), so
    that nibabel writes them without its own single-threaded transposition. The copy is torch's
    threaded one (a 1 mm brain field, 182x218x182x3 float32, 2 threads: 0.06 s against numpy's
    0.17 s, and writing it then takes 0.09 s instead of 0.38 s)."""
    if array.flags.f_contiguous:
        return array
    reverse = tuple(reversed(range(array.ndim)))
    try:
        flipped = torch.from_numpy(array).permute(reverse).contiguous()
    except (TypeError, ValueError, RuntimeError):  # negative strides, a type torch lacks
        return np.asfortranarray(array)
    return flipped.numpy().transpose(reverse)


def save_nifti(image: nib.Nifti1Image, path: str | os.PathLike, gzip_level: int = 1) -> None:
    """``nib.save(image, path)``, with ``gzip_level`` (0-9) for a ``.nii.gz`` path (nibabel's
    own default is 1)."""
    if not str(path).endswith(".gz"):
        nib.save(image, str(path))
        return
    data = image.to_bytes()
    with gzip.open(path, "wb", compresslevel=gzip_level) as stream:
        stream.write(data)


def _field_components(disp_mm: ArrayLike, path: str | os.PathLike) -> np.ndarray:
    """``(ndim, *S)`` array (float64 kept, else float32) from ``([1,] ndim, *S)``, ndim 2 or 3."""
    field = disp_mm.detach().cpu().numpy() if isinstance(disp_mm, torch.Tensor) else disp_mm
    field = np.asarray(field)
    shape = field.shape
    if field.ndim in (4, 5) and field.shape[0] == 1 and field.shape[1] == field.ndim - 2:
        field = field[0]
    if field.ndim not in (3, 4) or field.shape[0] != field.ndim - 1:
        raise ValueError(
            f"{path}: displacement must have shape ([1,] 3, X, Y, Z) or ([1,] 2, X, Y), got {shape}"
        )
    return field.astype(np.float64 if field.dtype == np.float64 else np.float32, copy=False)


def _lps_components(components: np.ndarray) -> np.ndarray:
    """RAS ⇄ LPS for field components ``(ndim, *S)``: x and y change sign."""
    flip = RAS_TO_LPS.diagonal()[: components.shape[0]].astype(components.dtype)
    return components * flip.reshape(-1, *([1] * (components.ndim - 1)))


def _nifti_affine(affine: ArrayLike, path: str | os.PathLike) -> np.ndarray:
    matrix = _as_float64(affine)
    if matrix.dim() == 3 and matrix.shape[0] == 1:
        matrix = matrix[0]
    if tuple(matrix.shape) != (4, 4):
        raise ValueError(
            f"{path}: affine must be a (4, 4) voxel->RAS matrix, got {tuple(matrix.shape)}"
        )
    return _homogeneous(matrix, 3, f"{path}: affine").numpy()


def _save_vector_nifti(
    path: str | os.PathLike, components: np.ndarray, affine: np.ndarray, intent: int
) -> Path:
    """Write ``components`` ``(3, X, Y, Z)`` as a 5D ``(X, Y, Z, 1, 3)`` NIfTI vector image, or
    ``(2, X, Y)`` as ``(X, Y, 1, 1, 2)``."""
    data = fortran_order(np.moveaxis(components, 0, -1))
    data = data[:, :, :, None, :] if components.shape[0] == 3 else data[:, :, None, None, :]
    image = nib.Nifti1Image(data, affine)
    image.header.set_intent(intent)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return _atomic_write(
        path, (".nii.gz", ".nii"), lambda tmp: save_nifti(image, tmp, FIELD_GZIP_LEVEL)
    )


def save_displacement_nifti(path: str | os.PathLike, disp_mm: ArrayLike, affine: ArrayLike) -> Path:
    """Save a world field with **RAS** mm components, in the NIfTI standard's own convention.

    The file is a ``(X, Y, Z, 1, 3)`` NIfTI image (2D: ``(X, Y, 1, 1, 2)``) with intent
    ``NIFTI_INTENT_DISPVECT`` (1006), the fixed image's affine as sform and qform (code 1).
    Viewers and nibabel read the vectors as RAS; ITK ≥ 5.4 (SimpleITK) converts 1006 components
    RAS→LPS itself, so a 3D file also resamples correctly there; it converts 2D files wrongly
    (it negates the first two of every three stored values, measured with SimpleITK 2.5 / ITK
    5.4). Older ITK/ANTs, and ITK for 2D fields, need :func:`save_itk_displacement`.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        disp_mm: ``([1,] 3, X, Y, Z)`` or ``([1,] 2, X, Y)`` displacement in mm RAS (backward).
        affine: ``(4, 4)`` voxel→RAS affine of the fixed grid.
    """
    components = _field_components(disp_mm, path)
    return _save_vector_nifti(path, components, _nifti_affine(affine, path), NIFTI_INTENT_DISPVECT)


def save_itk_displacement(
    path: str | os.PathLike, disp_mm_ras: ArrayLike, affine: ArrayLike
) -> Path:
    """Save a world field as an ITK/ANTs displacement-field transform.

    The file is a ``(X, Y, Z, 1, 3)`` NIfTI image (2D: ``(X, Y, 1, 1, 2)``) with intent
    ``NIFTI_INTENT_VECTOR`` (1007) on the fixed grid (its affine as sform and qform, code 1)
    holding **LPS** mm components ``(-x, -y[, z])``: the layout ANTs and ITK write and read.
    ``antsApplyTransforms -t path`` and SimpleITK's ``DisplacementFieldTransform`` +
    ``Resample(moving, fixed, transform)`` then give the image :func:`warp_world` gives. Stored
    as float64 for float64 input, float32 otherwise.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        disp_mm_ras: ``([1,] 3, X, Y, Z)`` or ``([1,] 2, X, Y)`` displacement in mm RAS
            (backward).
        affine: ``(4, 4)`` voxel→RAS affine of the fixed grid.
    """
    components = _field_components(disp_mm_ras, path)
    affine = _nifti_affine(affine, path)
    return _save_vector_nifti(path, _lps_components(components), affine, NIFTI_INTENT_VECTOR)


def load_itk_displacement(path: str | os.PathLike) -> tuple[torch.Tensor, np.ndarray]:
    """Read a NIfTI displacement field as ITK does, returning RAS mm components.

    Components are taken as LPS (and flipped to RAS) unless the intent is
    ``NIFTI_INTENT_DISPVECT`` (1006), whose components are RAS (as ITK ≥ 5.4 reads them).

    Returns:
        ``(disp_mm_ras, affine)``: ``(1, 3, X, Y, Z)`` tensor (2D: ``(1, 2, X, Y)`` from an
        ``(X, Y, 1, 1, 2)`` file; float64 if stored so, else float32) and the ``(4, 4)`` float64
        voxel→RAS affine of the field's grid.
    """
    image = nib.load(path)
    shape = image.shape
    planar = len(shape) == 5 and shape[2:] == (1, 1, 2)
    if not planar and (len(shape) != 5 or shape[3] != 1 or shape[4] != 3):
        raise ValueError(
            f"{path}: expected a displacement field (X, Y, Z, 1, 3) or (X, Y, 1, 1, 2), got {shape}"
        )
    dtype = np.float64 if image.get_data_dtype() == np.float64 else np.float32
    vectors = (
        image.get_fdata(dtype=dtype)[:, :, 0, 0, :]
        if planar
        else image.get_fdata(dtype=dtype)[:, :, :, 0, :]
    )
    components = np.moveaxis(vectors, -1, 0)
    if int(image.header["intent_code"]) != NIFTI_INTENT_DISPVECT:
        components = _lps_components(components)
    return torch.from_numpy(np.ascontiguousarray(components)).unsqueeze(0), image.affine.copy()


def save_itk_affine(
    path: str | os.PathLike,
    matrix_vox: ArrayLike,
    fixed_affine: ArrayLike,
    moving_affine: ArrayLike,
) -> Path:
    """Save a voxel affine as an ITK ``AffineTransform_double_3_3`` text file (``.tfm``/``.txt``);
    a ``(3, 3)`` matrix is a 2D map (voxel axes ``i, j`` of images in the plane z = 0) and is
    written as ``AffineTransform_double_2_2``.

    ``matrix_vox`` maps fixed voxel coordinates to moving voxel coordinates (regnet's convention).
    The file holds the same map between LPS physical points, ``L A_m M A_f^-1 L`` with
    ``L = diag(-1, -1, 1, 1)``, which ITK and ANTs apply to fixed points to find where to sample
    the moving image (``Resample(moving, fixed, transform)``, ``antsApplyTransforms -t path``).

    Args:
        path: ``.tfm`` or ``.txt`` file.
        matrix_vox: ``(4, 4)`` or ``(3, 4)``, or ``(3, 3)`` in 2D (optionally with a batch axis
            of 1).
        fixed_affine, moving_affine: ``(4, 4)`` voxel→RAS affines of the two images.
    """
    matrix = _as_float64(matrix_vox)
    if matrix.dim() == 3 and matrix.shape[0] == 1:
        matrix = matrix[0]
    planar = tuple(matrix.shape) == (3, 3)
    if planar:  # a 2D map of the plane z = 0: written as ITK's 2D transform
        matrix = torch.eye(4, dtype=torch.float64).index_put_(
            (torch.tensor([[0], [1], [3]]), torch.tensor([0, 1, 3])), matrix
        )
    if tuple(matrix.shape) == (3, 4):
        matrix = torch.cat([matrix, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
    if tuple(matrix.shape) != (4, 4):
        raise ValueError(
            f"{path}: matrix_vox must be (4, 4) or (3, 4), got {tuple(matrix_vox.shape)}"
        )
    fixed = torch.from_numpy(_nifti_affine(fixed_affine, path))
    moving = torch.from_numpy(_nifti_affine(moving_affine, path))
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    physical = flip @ moving @ matrix @ torch.linalg.inv(fixed) @ flip
    n = 2 if planar else 3
    parameters = [*physical[:n, :n].reshape(-1).tolist(), *physical[:n, 3].tolist()]
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: AffineTransform_double_{n}_{n}\n"
        f"Parameters: {' '.join(f'{v:.17g}' for v in parameters)}\n"
        f"FixedParameters: {' '.join(['0'] * n)}\n"
    )
    return _atomic_write(path, (".tfm", ".txt"), lambda tmp: Path(tmp).write_text(text))
