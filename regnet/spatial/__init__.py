"""Spatial transforms: the one place where regnet's coordinate conventions are defined.

Conventions (every other module refers here):

* **Images** are tensors ``(B, C, *spatial)`` with ``spatial = (I, J)`` in 2D or ``(I, J, K)`` in
  3D, the array axes of the NIfTI file as nibabel loads it (voxel index ``(i, j[, k])``).
* **Voxel coordinates**: voxel centres sit at integer positions ``0 .. n-1`` along each axis.
* **A dense displacement field (DDF)** ``u`` has shape ``(B, ndim, *spatial)``, lives on the
  *fixed* grid, is in *voxel units of that grid*, and its components follow tensor axis order:
  ``u[:, 0]`` displaces along ``i``, ``u[:, 1]`` along ``j`` (and ``u[:, 2]`` along ``k``).
* **Mapping is backward**: the warped moving image at fixed-grid point ``x`` is
  ``warped(x) = moving(x + u(x))``. A transform is the map ``x -> x + u(x)`` from fixed to moving
  voxel coordinates; an affine ``matrix`` likewise maps fixed voxel coordinates to moving voxel
  coordinates (homogeneous, ``(B, ndim+1, ndim+1)``).
* **Composition**: ``compose(u, v)`` is the field of "apply ``u`` first, then ``v``", i.e.
  ``warp(warp(M, u), v) == warp(M, compose(u, v))`` with ``compose(u, v)(x) = v(x) + u(x + v(x))``.
  Global+local registration is ``compose(affine_ddf, local_ddf)``, resampled once.
* **Resampling** uses ``torch.nn.functional.grid_sample`` with ``align_corners=True``: voxel
  ``0`` maps to normalised ``-1`` and voxel ``n-1`` to ``+1``, and the normalised grid's last
  dimension lists ``(x, y[, z]) = (j..., i)`` reversed relative to tensor axes. This conversion
  lives in :mod:`regnet.spatial.grid` and nowhere else.
* **Resizing a field** (:func:`resize_ddf`) keeps the corner voxels aligned (``align_corners``)
  and scales component ``a`` by ``(n_new_a - 1) / (n_old_a - 1)``.
* **World space** (mm, RAS+ as in NIfTI; LPS for ITK/ANTs) is handled only in
  :mod:`regnet.spatial.world`.
"""

from regnet.spatial.affine import affine_matrix, affine_to_ddf, apply_affine, matrix_from_ddf
from regnet.spatial.bspline import bspline_to_ddf, control_grid_shape
from regnet.spatial.grid import identity_grid
from regnet.spatial.integrate import integrate
from regnet.spatial.jacobian import jacobian_determinant
from regnet.spatial.warp import (
    SpatialTransformer,
    compose,
    resize_ddf,
    sample,
    warp,
    warp_labels,
)

__all__ = [
    "SpatialTransformer",
    "affine_matrix",
    "affine_to_ddf",
    "apply_affine",
    "bspline_to_ddf",
    "compose",
    "control_grid_shape",
    "identity_grid",
    "integrate",
    "jacobian_determinant",
    "matrix_from_ddf",
    "resize_ddf",
    "sample",
    "warp",
    "warp_labels",
]
