"""Reading and preprocessing: world geometry, label alignment, landmarks, bad files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from regnet.data.io import DataError, read_header, read_landmarks, voxel_to_world
from regnet.data.preprocess import load_pair, subject_record

# voxel -> world affines of three orientations with anisotropic spacing
ORIENTATIONS = {
    "RAS": np.diag([1.5, 2.0, 1.25]),
    "LAS": np.diag([-2.0, 1.5, 1.0]),
    "LPS": np.diag([-1.25, -1.5, 2.0]),
}


def affine_of(code: str, origin=(3.0, -7.0, 11.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ORIENTATIONS[code]
    affine[:3, 3] = origin
    return affine


def world_grid(shape, affine) -> np.ndarray:
    """World mm of every voxel, ``(*shape, 3)``."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return voxel_to_world(affine, index.reshape(-1, 3)).reshape(*shape, 3)


def ramp(world: np.ndarray) -> np.ndarray:
    """A linear function of world position: linear interpolation reproduces it exactly."""
    return 50.0 + 0.7 * world[..., 0] - 0.4 * world[..., 1] + 0.25 * world[..., 2]


def save(path, array, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


@pytest.mark.parametrize("code", sorted(ORIENTATIONS))
def test_network_grid_keeps_world_positions(tmp_path, code):
    """Each preprocessed voxel holds the intensity found at its world position (fixed_affine) in
    the original file: a linear ramp in world mm is reproduced to float precision."""
    shape, affine = (14, 12, 10), affine_of(code)
    path = save(
        tmp_path / "ramp.nii.gz", ramp(world_grid(shape, affine)).astype(np.float32), affine
    )
    item = load_pair(path, path, spacing=1.0, shape=(16, 16, 16), percentiles=None)
    grid = item["fixed_affine"].numpy()
    assert np.allclose(np.diag(grid)[:3], 1.0)  # RAS, 1 mm
    world = world_grid((16, 16, 16), grid)
    # voxels whose world position lies inside the original volume (away from its border)
    original_index = voxel_to_world(np.linalg.inv(affine), world.reshape(-1, 3))
    inside = np.all((original_index > 0.01) & (original_index < np.array(shape) - 1.01), axis=1)
    assert inside.sum() > 500
    values = item["fixed"][0].numpy().reshape(-1)
    np.testing.assert_allclose(values[inside], ramp(world.reshape(-1, 3))[inside], atol=2e-3)


@pytest.mark.parametrize("code", sorted(ORIENTATIONS))
def test_label_cube_stays_on_image_cube(tmp_path, code):
    """A bright cube and its label cube stay aligned and keep their world centre."""
    shape, affine = (16, 14, 12), affine_of(code)
    cube = np.zeros(shape, np.float32)
    cube[5:11, 4:9, 3:8] = 1.0
    image = save(tmp_path / "image.nii.gz", 100 * cube + 10, affine)
    label = save(tmp_path / "label.nii.gz", (3 * cube).astype(np.int16), affine)
    item = load_pair(image, image, label, label, spacing=(0.9, 0.9, 0.9), shape=(32, 32, 24))
    labels = item["fixed_label"][0].numpy()
    assert item["fixed_label"].dtype == torch.int64 and set(np.unique(labels)) == {0, 3}
    bright = item["fixed"][0].numpy() > 0.5
    dice = 2 * (bright & (labels == 3)).sum() / (bright.sum() + (labels == 3).sum())
    assert dice > 0.9
    centre_before = voxel_to_world(affine, np.array([[7.5, 6.0, 5.0]]))
    centre_label = ndimage.center_of_mass(labels == 3)
    centre_after = voxel_to_world(item["fixed_affine"].numpy(), np.array([centre_label]))
    np.testing.assert_allclose(centre_after, centre_before, atol=0.3)


def test_intensity_is_percentile_scaled(tmp_path):
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    path = save(tmp_path / "image.nii.gz", values, np.eye(4))
    image = load_pair(path, path, percentiles=(10, 90))["fixed"][0].numpy()
    low, high = np.percentile(values, [10, 90])
    expected = np.clip((values - low) / (high - low), 0, 1)
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_two_dimensional_files_and_axial_slices(tmp_path):
    """2D NIfTI files (LA orientation) and slice k of a 3D LPS volume land on the same RAS grid
    positions as the original voxels."""
    affine = affine_of("LPS")
    volume_shape = (12, 10, 8)
    world = world_grid(volume_shape, affine)
    volume = save(tmp_path / "volume.nii.gz", ramp(world).astype(np.float32), affine)
    # in RAS the LPS volume's k axis is unchanged (S), so RAS slice k is original slice k
    item = load_pair(
        volume, volume, ndim=2, slice_index=5, spacing=1.0, shape=(20, 18), percentiles=None
    )
    grid = item["fixed_affine"].numpy()
    assert item["fixed"].shape == (1, 20, 18)
    slice_z = voxel_to_world(affine, np.array([[0, 0, 5]]))[0, 2]
    points = voxel_to_world(grid, np.array([[i, j, 0] for i in range(20) for j in range(18)]))
    np.testing.assert_allclose(points[:, 2], slice_z)
    original = voxel_to_world(np.linalg.inv(affine), points)
    inside = np.all((original[:, :2] > 0.01) & (original[:, :2] < np.array([11, 9]) - 0.01), 1)
    values = item["fixed"][0].numpy().reshape(-1)
    np.testing.assert_allclose(values[inside], ramp(points)[inside], atol=2e-3)

    flat_affine = affine_of("LAS")
    flat_shape = (12, 9)
    flat_world = world_grid((*flat_shape, 1), flat_affine)[..., 0, :]
    flat = save(tmp_path / "flat.nii.gz", ramp(flat_world).astype(np.float32), flat_affine)
    item = load_pair(flat, flat, ndim=2, spacing=(1.0, 1.0), shape=(26, 14), percentiles=None)
    grid = item["fixed_affine"].numpy()
    assert grid[0, 0] > 0  # reoriented to R
    points = voxel_to_world(grid, np.array([[i, j, 0] for i in range(26) for j in range(14)]))
    original = voxel_to_world(np.linalg.inv(flat_affine), points)
    inside = np.all((original[:, :2] > 0.01) & (original[:, :2] < np.array([11, 8]) - 0.01), 1)
    assert inside.sum() > 100
    values = item["fixed"][0].numpy().reshape(-1)
    np.testing.assert_allclose(values[inside], ramp(points)[inside], atol=2e-3)


def test_landmarks_in_mm_and_voxel_keypoints(tmp_path):
    affine = affine_of("LAS")
    mm = tmp_path / "mm.csv"
    mm.write_text("id,x,y,z\n1,1.5,-2.0,3.0\n2,4.0,5.0,-6.5\n")
    np.testing.assert_allclose(read_landmarks(mm), [[1.5, -2.0, 3.0], [4.0, 5.0, -6.5]])
    keypoints = tmp_path / "keypoints.csv"
    keypoints.write_text("1.0,2.0,3.0\n0,0,0\n")
    expected = [affine[:3, :3] @ [1.0, 2.0, 3.0] + affine[:3, 3], affine[:3, 3]]
    np.testing.assert_allclose(read_landmarks(keypoints, affine), expected)
    with pytest.raises(DataError, match="keypoints.csv"):
        read_landmarks(keypoints)


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_files_fail_with_the_file_name(tmp_path):
    image = save(tmp_path / "image.nii.gz", np.ones((6, 6, 6), np.float32), np.eye(4))
    message = one_line_error(subject_record, tmp_path / "missing.nii.gz", row="row 4")
    assert message.startswith("row 4: ") and "missing.nii.gz" in message
    small = save(tmp_path / "small.nii.gz", np.ones((6, 6, 5), np.int16), np.eye(4))
    message = one_line_error(subject_record, image, label=small, row="row 2")
    assert "row 2" in message and "small.nii.gz" in message and "grid" in message
    shifted = save(tmp_path / "shifted.nii.gz", np.ones((6, 6, 6), np.int16), affine_of("RAS"))
    assert "shifted.nii.gz" in one_line_error(subject_record, image, mask=shifted, row="row 2")
    four = save(tmp_path / "four.nii.gz", np.ones((6, 6, 6, 2), np.float32), np.eye(4))
    message = one_line_error(subject_record, four, row="row 9")
    assert "row 9" in message and "four.nii.gz" in message and "4D" in message
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = np.nan
    nan = save(tmp_path / "nan.nii.gz", data, np.eye(4))
    subject_record(nan, row="row 5")  # headers are fine; voxels are read at load time
    message = one_line_error(load_pair, nan, nan)
    assert "fixed" in message and "nan.nii.gz" in message and "NaN" in message
    assert read_header(image).shape == (6, 6, 6)
