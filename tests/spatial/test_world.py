"""World-space conversions and ITK/ANTs files, checked analytically and against SimpleITK."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regnet.spatial import warp
from regnet.spatial.world import (
    ddf_to_world,
    fortran_order,
    itk_geometry_to_affine,
    load_itk_displacement,
    resample_world_field,
    save_displacement_nifti,
    save_itk_affine,
    save_itk_displacement,
    save_nifti,
    voxel_to_world_points,
    warp_world,
    world_points_to_voxel,
    world_to_ddf,
)

FIXED_SHAPE = (20, 18, 16)
MOVING_SHAPE = (22, 21, 19)


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(directions: np.ndarray, spacing, origin) -> np.ndarray:
    """Voxel->RAS affine with unit axis directions (columns), spacing (mm) and origin (mm)."""
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


LAS = np.diag([-1.0, 1.0, 1.0])
LPS = np.diag([-1.0, -1.0, 1.0])
FIXED_AFFINES = {
    "las_iso": make_affine(LAS, (1.5, 1.5, 1.5), (40.0, -25.0, 12.0)),
    "las_aniso": make_affine(LAS, (1.5, 1.0, 2.0), (40.0, -25.0, 12.0)),
    "oblique_las_aniso": make_affine(rotation((12, -8, 25)) @ LAS, (1.5, 1.0, 2.0), (35, -20, 9)),
}


def world_positions(affine: np.ndarray, shape) -> np.ndarray:
    """RAS positions ``(3, *shape)`` of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(float)
    return np.einsum("ij,j...->i...", affine[:3, :3], index) + affine[:3, 3, None, None, None]


def moving_affine_around(fixed_affine: np.ndarray) -> np.ndarray:
    """An LPS grid with other spacing and shape, centred near the fixed image's centre."""
    centre = fixed_affine[:3, :3] @ ((np.array(FIXED_SHAPE) - 1) / 2) + fixed_affine[:3, 3]
    linear = LPS @ np.diag([1.3, 1.2, 1.4])
    origin = centre + np.array([1.1, -0.7, 0.4]) - linear @ ((np.array(MOVING_SHAPE) - 1) / 2)
    return make_affine(LPS, (1.3, 1.2, 1.4), origin)


def save_image(path: Path, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Write a scalar NIfTI (sform = qform, code 1); returns the affine as stored (float32)."""
    image = nib.Nifti1Image(data.astype(np.float64), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return nib.load(path).affine


def itk_resample(moving_path: Path, fixed_path: Path, transform: sitk.Transform) -> np.ndarray:
    """SimpleITK linear resampling of the moving file onto the fixed file's grid, (i, j, k)."""
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat64)
    fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat64)
    out = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def itk_field_transform(path: Path) -> sitk.Transform:
    return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


def interior(fixed_affine, moving_affine, disp_mm: np.ndarray) -> np.ndarray:
    """Fixed voxels whose target lies within the moving image's outermost voxel centres.

    Outside them padding conventions differ (ITK uses the edge value up to half a voxel out).
    """
    target = world_positions(fixed_affine, FIXED_SHAPE) + disp_mm
    inverse = np.linalg.inv(moving_affine)
    index = np.einsum("ij,j...->i...", inverse[:3, :3], target) + inverse[:3, 3, None, None, None]
    mask = np.ones(FIXED_SHAPE, dtype=bool)
    for axis, n in enumerate(MOVING_SHAPE):
        mask &= (index[axis] >= 1e-3) & (index[axis] <= n - 1 - 1e-3)
    return mask


def smooth_image(shape) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return np.sin(0.35 * i) * np.cos(0.3 * j) + 0.4 * np.sin(0.25 * k + 0.5 * i) + 0.02 * i * k


def as_batch(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(array, dtype=dtype)[None]


# --- voxel <-> world vectors and points ---------------------------------------------------------


def test_ddf_to_world_known_vector_las():
    affine = make_affine(LAS, (1.5, 1.5, 1.5), (10.0, 20.0, 30.0))
    ddf = torch.zeros(1, 3, 4, 5, 6)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 2.0, -1.0, 0.5
    disp = ddf_to_world(ddf, affine)
    expected = torch.tensor([-3.0, -1.5, 0.75]).view(1, 3, 1, 1, 1).expand_as(disp)
    torch.testing.assert_close(disp, expected)


def test_ddf_world_round_trip_oblique_and_batched_affines():
    torch.manual_seed(0)
    ddf = torch.randn(2, 3, 5, 4, 3, dtype=torch.float64)
    affines = np.stack([FIXED_AFFINES["oblique_las_aniso"], FIXED_AFFINES["las_aniso"]])
    disp = ddf_to_world(ddf, affines)
    torch.testing.assert_close(disp[1:], ddf_to_world(ddf[1:], affines[1]))
    linear = torch.as_tensor(affines[0, :3, :3])
    torch.testing.assert_close(disp[0, :, 1, 2, 0], linear @ ddf[0, :, 1, 2, 0])
    torch.testing.assert_close(world_to_ddf(disp, affines), ddf)


def test_ddf_to_world_2d_with_3x3_and_4x4_affines():
    affine_2d = np.array([[0.0, -2.0, 5.0], [1.5, 0.0, 3.0], [0.0, 0.0, 1.0]])
    ddf = torch.zeros(1, 2, 6, 7)
    ddf[:, 0], ddf[:, 1] = 1.0, 2.0
    disp = ddf_to_world(ddf, affine_2d)
    torch.testing.assert_close(disp[0, :, 3, 4], torch.tensor([-4.0, 1.5]))
    affine_3d = np.eye(4)
    affine_3d[:2, :2], affine_3d[:2, 3] = affine_2d[:2, :2], affine_2d[:2, 2]
    affine_3d[2, 2] = 7.0
    torch.testing.assert_close(ddf_to_world(ddf, affine_3d), disp)
    torch.testing.assert_close(world_to_ddf(disp, affine_2d), ddf)


def test_points_known_values_and_round_trip():
    affine = FIXED_AFFINES["las_aniso"]
    points = np.array([[0.0, 0.0, 0.0], [2.0, 3.0, 4.0]])
    world = voxel_to_world_points(points, affine)
    np.testing.assert_allclose(world, [[40.0, -25.0, 12.0], [37.0, -22.0, 20.0]])
    oblique = FIXED_AFFINES["oblique_las_aniso"]
    tensor_points = torch.tensor([[1.5, -2.0, 7.25], [10.0, 3.0, 0.0]])
    back = world_points_to_voxel(voxel_to_world_points(tensor_points, oblique), oblique)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    torch.testing.assert_close(back, tensor_points)


def test_bad_affine_raises():
    with pytest.raises(ValueError, match="affine"):
        ddf_to_world(torch.zeros(1, 3, 4, 4, 4), np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        ddf_to_world(torch.zeros(1, 3, 4, 4, 4), np.diag([1.0, 0.0, 1.0, 1.0]))


# --- resampling fields between grids ------------------------------------------------------------


def test_resample_world_field_same_grid_is_identity():
    torch.manual_seed(1)
    field = torch.randn(1, 3, 7, 6, 5, dtype=torch.float64)
    affine = FIXED_AFFINES["oblique_las_aniso"]
    out = resample_world_field(field, affine, affine, (7, 6, 5))
    torch.testing.assert_close(out, field)


def test_resample_world_field_half_resolution_reproduces_linear_field():
    src_affine = FIXED_AFFINES["oblique_las_aniso"]
    src_shape = (17, 15, 13)
    dst_affine = src_affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    dst_shape = (9, 8, 7)
    gradient = np.array([[0.10, -0.05, 0.02], [0.03, 0.07, -0.04], [-0.02, 0.01, 0.06]])
    offset = np.array([1.0, -2.0, 0.5])

    def linear_field(affine, shape):
        return (
            np.einsum("ij,j...->i...", gradient, world_positions(affine, shape))
            + offset[:, None, None, None]
        )

    src = as_batch(linear_field(src_affine, src_shape), torch.float64)
    out = resample_world_field(src, src_affine, dst_affine, dst_shape)
    expected = as_batch(linear_field(dst_affine, dst_shape), torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)


# --- warping in world space ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_warp_world_undoes_a_left_right_flip_exactly(mode):
    fixed_affine = FIXED_AFFINES["las_aniso"]
    image = smooth_image(FIXED_SHAPE)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, FIXED_SHAPE[0] - 1
    moving_affine = fixed_affine @ flip  # moving voxel i holds fixed voxel n-1-i: same anatomy
    moving = as_batch(image[::-1].copy())[None]
    out = warp_world(moving, moving_affine, torch.zeros(1, 3, *FIXED_SHAPE), fixed_affine, mode)
    torch.testing.assert_close(out[0, 0], torch.as_tensor(image, dtype=torch.float32))


@pytest.mark.parametrize("ndim", [2, 3])
def test_warp_world_on_shared_grid_equals_voxel_warp(ndim):
    torch.manual_seed(2)
    shape = FIXED_SHAPE[:ndim]
    affine = FIXED_AFFINES["oblique_las_aniso"]
    if ndim == 2:
        affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]
    moving = torch.rand(2, 1, *shape)
    ddf = 1.5 * torch.randn(2, ndim, *shape)
    expected = warp(moving, ddf, padding="zeros")
    out = warp_world(moving, affine, ddf_to_world(ddf, affine), affine)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# --- ITK / ANTs files, checked with SimpleITK ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXED_AFFINES))
def test_itk_displacement_matches_simpleitk_resampling(tmp_path, name):
    fixed_affine = save_image(tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE), FIXED_AFFINES[name])
    moving_image = smooth_image(MOVING_SHAPE)
    moving_affine = save_image(
        tmp_path / "moving.nii.gz", moving_image, moving_affine_around(fixed_affine)
    )
    p = world_positions(fixed_affine, FIXED_SHAPE)
    disp = 2.5 * np.stack([np.sin(p[1] / 7), np.cos(p[2] / 6), np.sin(p[0] / 8 + 0.3)])

    field_path = save_itk_displacement(
        tmp_path / "field.nii.gz", as_batch(disp, torch.float64), fixed_affine
    )
    itk_out = itk_resample(
        tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", itk_field_transform(field_path)
    )
    ours = warp_world(as_batch(moving_image)[None], moving_affine, as_batch(disp), fixed_affine)

    mask = interior(fixed_affine, moving_affine, disp)
    assert mask.mean() > 0.3
    scale = np.abs(moving_image).max()
    np.testing.assert_allclose(ours[0, 0].numpy()[mask], itk_out[mask], atol=1e-4 * scale, rtol=0)
    # The comparison can fail: the field applied with its sign flipped is far off.
    wrong = warp_world(as_batch(moving_image)[None], moving_affine, -as_batch(disp), fixed_affine)
    assert np.abs(wrong[0, 0].numpy()[mask] - itk_out[mask]).max() > 0.1 * scale


def test_2d_field_on_an_oblique_metaimage_matches_simpleitk_resampling(tmp_path):
    """A 2D fixed image with a 30° direction and anisotropic spacing, an axis-aligned moving
    image on another grid: SimpleITK applying the saved 2D field gives :func:`warp_world`'s
    image, with the geometry regnet derives from SimpleITK's origin, spacing and direction."""
    angle = math.radians(30.0)
    fixed = sitk.Image([17, 13], sitk.sitkFloat64)
    fixed.SetSpacing((0.9, 1.4))
    fixed.SetOrigin((3.0, -2.0))
    fixed.SetDirection((math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)))
    moving_values = smooth_image((26, 24, 1))[..., 0]  # (i, j)
    moving = sitk.GetImageFromArray(moving_values.T.copy())
    moving.SetSpacing((1.1, 1.1))
    moving.SetOrigin((-8.0, -4.0))
    geometry = [
        (image.GetOrigin(), image.GetSpacing(), image.GetDirection()) for image in (fixed, moving)
    ]
    fixed_affine, moving_affine = (itk_geometry_to_affine(*g) for g in geometry)
    index = np.stack(np.meshgrid(np.arange(17), np.arange(13), indexing="ij")).astype(float)
    p = np.einsum("ij,j...->i...", fixed_affine[:2, :2], index) + fixed_affine[:2, 3, None, None]
    disp = 1.5 * np.stack([np.sin(p[1] / 5), np.cos(p[0] / 4 + 0.2)])  # RAS mm

    field_path = save_itk_displacement(
        tmp_path / "field.nii.gz", as_batch(disp, torch.float64), fixed_affine
    )
    field = sitk.ReadImage(str(field_path), sitk.sitkVectorFloat64)
    assert field.GetDimension() == 2
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-5)
    resampled = sitk.Resample(
        moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0
    )
    itk_out = sitk.GetArrayFromImage(resampled).T
    ours = warp_world(as_batch(moving_values)[None], moving_affine, as_batch(disp), fixed_affine)

    inverse = np.linalg.inv(moving_affine)
    target = p + disp
    moving_index = np.einsum("ij,j...->i...", inverse[:2, :2], target) + inverse[:2, 3, None, None]
    mask = np.all(
        (moving_index > 1e-3) & (moving_index < np.array([25, 23])[:, None, None] - 1e-3), 0
    )
    assert mask.mean() > 0.5
    np.testing.assert_allclose(ours[0, 0].numpy()[mask], itk_out[mask], atol=1e-4, rtol=0)
    wrong = warp_world(as_batch(moving_values)[None], moving_affine, -as_batch(disp), fixed_affine)
    assert np.abs(wrong[0, 0].numpy()[mask] - itk_out[mask]).max() > 0.1
    # the RAS file (intent 1006) holds the same field; regnet reads both back alike
    ras_path = save_displacement_nifti(tmp_path / "ras.nii.gz", as_batch(disp), fixed_affine)
    for path in (field_path, ras_path):
        loaded, affine = load_itk_displacement(path)
        assert loaded.shape == (1, 2, 17, 13)
        np.testing.assert_allclose(loaded[0].numpy(), disp, atol=1e-5)
        np.testing.assert_allclose(affine, fixed_affine, atol=1e-5)


def linear_intensity(affine: np.ndarray, shape) -> np.ndarray:
    """Image whose value is a linear function of RAS position (trilinear sampling is exact)."""
    p = world_positions(affine, shape)
    return 0.3 * p[0] - 0.2 * p[1] + 0.1 * p[2] + 5.0


def test_itk_translation_field_matches_analytic_result(tmp_path):
    fixed_affine = save_image(
        tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE), FIXED_AFFINES["oblique_las_aniso"]
    )
    moving_affine = moving_affine_around(fixed_affine)
    moving_affine = save_image(
        tmp_path / "moving.nii.gz", linear_intensity(moving_affine, MOVING_SHAPE), moving_affine
    )
    shift = np.array([4.0, -3.0, 2.5])  # mm, RAS
    disp = np.broadcast_to(shift[:, None, None, None], (3, *FIXED_SHAPE)).copy()
    p = world_positions(fixed_affine, FIXED_SHAPE) + disp
    expected = 0.3 * p[0] - 0.2 * p[1] + 0.1 * p[2] + 5.0
    mask = interior(fixed_affine, moving_affine, disp)
    assert mask.mean() > 0.3

    moving = as_batch(linear_intensity(moving_affine, MOVING_SHAPE), torch.float64)[None]
    ours = warp_world(moving, moving_affine, as_batch(disp, torch.float64), fixed_affine)
    np.testing.assert_allclose(ours[0, 0].numpy()[mask], expected[mask], atol=1e-9)

    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    itk_path = save_itk_displacement(tmp_path / "itk.nii.gz", disp, fixed_affine)
    itk_out = itk_resample(moving_path, fixed_path, itk_field_transform(itk_path))
    np.testing.assert_allclose(itk_out[mask], expected[mask], atol=1e-4)

    # The NIfTI-standard file (intent DISPVECT, RAS components) is converted by ITK >= 5.4 itself.
    ras_path = save_displacement_nifti(tmp_path / "ras.nii.gz", disp, fixed_affine)
    assert int(nib.load(ras_path).header["intent_code"]) == 1006
    ras_out = itk_resample(moving_path, fixed_path, itk_field_transform(ras_path))
    np.testing.assert_allclose(ras_out[mask], expected[mask], atol=1e-4)

    # RAS components labelled as plain vectors are misread by ITK: x and y come out flipped.
    wrong = nib.Nifti1Image(np.moveaxis(disp, 0, -1)[:, :, :, None, :], fixed_affine)
    wrong.header.set_intent("vector")
    nib.save(wrong, tmp_path / "wrong.nii.gz")
    wrong_out = itk_resample(
        moving_path, fixed_path, itk_field_transform(tmp_path / "wrong.nii.gz")
    )
    both = mask & interior(
        fixed_affine, moving_affine, disp * np.array([-1, -1, 1])[:, None, None, None]
    )
    assert np.abs(wrong_out[both] - expected[both]).min() > 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_itk_displacement_file_layout_and_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(3)
    disp = rng.normal(size=(1, 3, 5, 4, 3)).astype(dtype)
    affine = FIXED_AFFINES["oblique_las_aniso"]
    path = save_itk_displacement(tmp_path / "field.nii.gz", torch.from_numpy(disp), affine)
    image = nib.load(path)
    assert image.shape == (5, 4, 3, 1, 3) and image.get_data_dtype() == dtype
    assert int(image.header["intent_code"]) == 1007
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    stored = np.asanyarray(image.dataobj)[2, 1, 0, 0]
    np.testing.assert_array_equal(stored, disp[0, :, 2, 1, 0] * np.array([-1, -1, 1], dtype))

    loaded, loaded_affine = load_itk_displacement(path)
    assert loaded.dtype == torch.from_numpy(disp).dtype
    torch.testing.assert_close(loaded, torch.from_numpy(disp), atol=0, rtol=0)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field.nii.gz"]


def test_fields_are_gzip_without_deflate_and_images_deflated(tmp_path):
    """Displacement fields go into ``.nii.gz`` as stored gzip blocks (FIELD_GZIP_LEVEL 0), other
    images at nibabel's level 1; both read back bit for bit, also by SimpleITK."""
    disp = np.zeros((1, 3, 12, 11, 10), np.float32)  # deflate would shrink this to almost nothing
    path = save_itk_displacement(tmp_path / "field.nii.gz", torch.from_numpy(disp), np.eye(4))
    raw = gzip.decompress(path.read_bytes())
    assert path.stat().st_size > len(raw)  # stored: header + data + gzip framing
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (10, 11, 12, 3)
    image = nib.Nifti1Image(np.zeros((12, 11, 10), np.float32), np.eye(4))
    save_nifti(image, tmp_path / "image.nii.gz")
    assert (tmp_path / "image.nii.gz").stat().st_size < len(raw) / 10
    assert np.asarray(nib.load(tmp_path / "image.nii.gz").dataobj).shape == (12, 11, 10)


def test_load_reads_dispvect_files_as_ras(tmp_path):
    disp = np.random.default_rng(4).normal(size=(3, 4, 4, 3))
    path = save_displacement_nifti(tmp_path / "ras.nii", disp, np.eye(4))
    loaded, _ = load_itk_displacement(path)
    np.testing.assert_allclose(loaded[0].numpy(), disp)


def test_saving_bad_field_or_affine_names_the_file(tmp_path):
    path = tmp_path / "field.nii.gz"
    with pytest.raises(ValueError, match="field.nii.gz"):
        save_itk_displacement(path, torch.zeros(1, 2, 4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="field.nii.gz"):
        save_itk_displacement(path, torch.zeros(1, 3, 4, 4, 4), np.eye(3))
    with pytest.raises(ValueError, match="field.nii.gz"):
        save_displacement_nifti(path, torch.zeros(2, 3, 4, 4, 4), np.eye(4))
    with pytest.raises(ValueError, match="field.mha"):
        save_itk_displacement(tmp_path / "field.mha", torch.zeros(1, 3, 4, 4, 4), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_itk_affine_file_matches_simpleitk_resampling(tmp_path):
    fixed_affine = save_image(
        tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE), FIXED_AFFINES["oblique_las_aniso"]
    )
    moving_affine = moving_affine_around(fixed_affine)
    moving_image = linear_intensity(moving_affine, MOVING_SHAPE)
    moving_affine = save_image(tmp_path / "moving.nii.gz", moving_image, moving_affine)
    world_map = np.eye(4)  # RAS mm -> RAS mm: rotation about the image centre plus a shift
    centre = fixed_affine[:3, :3] @ ((np.array(FIXED_SHAPE) - 1) / 2) + fixed_affine[:3, 3]
    world_map[:3, :3] = rotation((4, -3, 6))
    world_map[:3, 3] = centre - world_map[:3, :3] @ centre + np.array([2.0, -1.5, 1.0])
    matrix_vox = np.linalg.inv(moving_affine) @ world_map @ fixed_affine

    path = save_itk_affine(tmp_path / "affine.tfm", matrix_vox, fixed_affine, moving_affine)
    itk_out = itk_resample(
        tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", sitk.ReadTransform(str(path))
    )

    p = world_positions(fixed_affine, FIXED_SHAPE)
    target = np.einsum("ij,j...->i...", world_map[:3, :3], p) + world_map[:3, 3, None, None, None]
    disp = target - p
    expected = 0.3 * target[0] - 0.2 * target[1] + 0.1 * target[2] + 5.0
    ours = warp_world(
        as_batch(moving_image, torch.float64)[None],
        moving_affine,
        as_batch(disp, torch.float64),
        fixed_affine,
    )
    mask = interior(fixed_affine, moving_affine, disp)
    assert mask.mean() > 0.3
    np.testing.assert_allclose(ours[0, 0].numpy()[mask], expected[mask], atol=1e-9)
    np.testing.assert_allclose(itk_out[mask], expected[mask], atol=1e-4)


def test_a_2d_affine_is_written_as_an_itk_2d_transform(tmp_path):
    """A (3, 3) RAS map of the plane z = 0 becomes AffineTransform_double_2_2 in LPS: SimpleITK
    maps an LPS point as the RAS map does with x and y negated."""
    import SimpleITK as sitk

    from regnet.spatial.world import save_itk_affine

    ras_map = np.array([[0.9, -0.1, 2.0], [0.1, 0.95, -3.0], [0.0, 0.0, 1.0]])
    path = save_itk_affine(tmp_path / "affine.tfm", ras_map, np.eye(4), np.eye(4))
    transform = sitk.ReadTransform(str(path))
    assert transform.GetDimension() == 2
    for lps in ([1.0, 2.0], [-4.0, 7.5]):
        ras = ras_map @ np.array([-lps[0], -lps[1], 1.0])
        np.testing.assert_allclose(transform.TransformPoint(lps), [-ras[0], -ras[1]], atol=1e-12)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.float32).reshape(3, 4, 5),
        np.arange(120, dtype=np.float64).reshape(2, 3, 4, 5)[:, ::-1],  # negative strides
        np.arange(24, dtype=np.uint16).reshape(2, 3, 4),
        np.asfortranarray(np.ones((2, 3), np.int16)),
    ],
    ids=["float32", "flipped-view", "uint16", "already"],
)
def test_fortran_order_keeps_values_and_gives_nifti_layout(array):
    out = fortran_order(array)
    assert out.flags.f_contiguous and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)
