"""World-space pipeline: fields to the fixed grid, one-step warping, landmarks, input checks.

References are computed independently with NumPy/SciPy at the world positions of the fixed
voxels (``scipy.ndimage.map_coordinates``, ``mode="grid-constant"`` pads with zeros as
``grid_sample`` does).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from regnet.data.io import DataError
from regnet.pipeline import (
    GridField,
    complete_registration,
    load_pair_inputs,
    load_volume,
    map_points,
    map_to_fixed_grid,
    network_field_to_world,
    preprocessing_from_config,
)

FIXED_SHAPE = (12, 10, 9)
MOVING_SHAPE = (14, 13, 8)


def affine(directions, spacing, origin) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(directions) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


# fixed LAS, moving LPS, different spacings; their fields of view overlap in the middle
FIXED_AFFINE = affine((-1, 1, 1), (1.5, 1.2, 2.0), (20.0, -10.0, 5.0))
MOVING_AFFINE = affine((-1, -1, 1), (1.3, 1.1, 2.2), (19.37, 3.13, 6.73))


def write(path: Path, data: np.ndarray, matrix: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, matrix), str(path))
    return path


def voxel_index(shape) -> np.ndarray:
    """``(4, N)`` homogeneous voxel indices of a grid, C order."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    return np.concatenate([index.reshape(3, -1), np.ones((1, index[0].size))]).astype(float)


def moving_coords(fixed_affine, moving_affine, shape, disp_mm: np.ndarray) -> np.ndarray:
    """Moving voxel coordinates ``(3, N)`` of fixed voxels mapped by ``p -> p + disp_mm``."""
    world = (fixed_affine @ voxel_index(shape))[:3] + disp_mm.reshape(3, -1)
    return (np.linalg.inv(moving_affine) @ np.vstack([world, np.ones(world.shape[1])]))[:3]


@pytest.fixture
def pair(tmp_path: Path):
    rng = np.random.default_rng(0)
    moving = rng.random(MOVING_SHAPE).astype(np.float32) * 100
    fixed = rng.random(FIXED_SHAPE).astype(np.float32)
    moving_labels = rng.integers(0, 4, MOVING_SHAPE).astype(np.int16)
    fixed_labels = rng.integers(0, 4, FIXED_SHAPE).astype(np.int16)
    paths = {
        "fixed": write(tmp_path / "fixed.nii.gz", fixed, FIXED_AFFINE),
        "moving": write(tmp_path / "moving.nii.gz", moving, MOVING_AFFINE),
        "fixed_labels": write(tmp_path / "fl.nii.gz", fixed_labels, FIXED_AFFINE),
        "moving_labels": write(tmp_path / "ml.nii.gz", moving_labels, MOVING_AFFINE),
    }
    inputs = load_pair_inputs(
        paths["fixed"], paths["moving"], labels=(paths["fixed_labels"], paths["moving_labels"])
    )
    return inputs, moving, moving_labels


def test_identity_warps_moving_into_fixed_space_once(pair) -> None:
    inputs, moving, moving_labels = pair
    result = complete_registration(inputs, GridField.zeros(FIXED_SHAPE, FIXED_AFFINE), 0.0)
    coords = moving_coords(FIXED_AFFINE, MOVING_AFFINE, FIXED_SHAPE, np.zeros((3, 1)))
    expected = map_coordinates(moving, coords, order=1, mode="grid-constant").reshape(FIXED_SHAPE)
    assert np.abs(expected).max() > 10  # the grids overlap
    np.testing.assert_allclose(result.warped[0, 0].numpy(), expected, atol=1e-3)
    inside = np.all((coords > 0) & (coords < np.array(MOVING_SHAPE)[:, None] - 1), axis=0)
    assert inside.mean() > 0.3
    nearest = map_coordinates(moving_labels, coords, order=0).reshape(-1)
    warped_labels = result.warped_labels[0, 0].numpy().reshape(-1)
    np.testing.assert_array_equal(warped_labels[inside], nearest[inside])
    assert result.warped_labels.dtype == torch.int64
    np.testing.assert_allclose(result.jacobian.numpy(), 1.0, atol=1e-6)
    assert result.metrics["folding_percent"] == 0.0
    assert result.metrics["sdlogj"] == pytest.approx(0.0, abs=1e-6)


def test_translation_on_another_grid_gives_mm_field_and_zero_tre(pair) -> None:
    inputs, moving, _ = pair
    shift = np.array([3.0, -2.0, 4.5])
    network_grid = affine((1, 1, 1), (2.0, 2.0, 2.0), (-5.0, -15.0, -2.0))
    field = GridField(
        torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).repeat(1, 1, 10, 11, 12),
        network_grid,
    )
    rng = np.random.default_rng(1)
    fixed_points = (FIXED_AFFINE @ np.vstack([rng.random((3, 6)) * 8, np.ones(6)]))[:3].T
    inputs = type(inputs)(
        inputs.fixed,
        inputs.moving,
        inputs.fixed_labels,
        inputs.moving_labels,
        fixed_points,
        fixed_points + shift,
    )
    result = complete_registration(inputs, field, 1.5)
    disp = result.field.disp_mm[0].numpy()
    np.testing.assert_allclose(disp, np.broadcast_to(shift[:, None, None, None], disp.shape), 1e-5)
    coords = moving_coords(FIXED_AFFINE, MOVING_AFFINE, FIXED_SHAPE, disp)
    expected = map_coordinates(moving, coords, order=1, mode="grid-constant").reshape(FIXED_SHAPE)
    np.testing.assert_allclose(result.warped[0, 0].numpy(), expected, atol=1e-3)
    assert result.metrics["tre_mm"]["max"] < 1e-4
    assert result.metrics["tre_mm"]["n"] == 6
    assert result.metrics["seconds"] == 1.5
    identity = complete_registration(inputs, GridField.zeros(FIXED_SHAPE, FIXED_AFFINE), 0.0)
    assert identity.metrics["tre_mm"]["mean"] == pytest.approx(np.linalg.norm(shift), rel=1e-9)


def test_network_field_to_world_between_two_network_grids() -> None:
    rng = np.random.default_rng(2)
    shape = (5, 6, 7)
    fixed_grid = affine((1, 1, 1), (2.0, 2.0, 2.0), (-10.0, 4.0, 1.0))
    moving_grid = affine((1, 1, 1), (1.5, 2.5, 2.0), (-7.5, 1.0, 3.0))
    ddf = rng.normal(size=(1, 3, *shape))
    field = network_field_to_world(torch.tensor(ddf, dtype=torch.float32), fixed_grid, moving_grid)
    index = voxel_index(shape)
    moving_world = moving_grid @ (
        index + np.vstack([ddf.reshape(3, -1), np.zeros((1, index.shape[1]))])
    )
    expected = (moving_world - fixed_grid @ index)[:3].reshape(3, *shape)
    np.testing.assert_allclose(field.disp_mm[0].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(field.affine, fixed_grid)


def test_map_points_and_resampling_are_exact_for_linear_fields() -> None:
    grid = affine((-1, 1, 1), (1.5, 2.0, 1.0), (10.0, -3.0, 2.0))
    shape = (8, 7, 9)
    world = (grid @ voxel_index(shape))[:3]
    linear = np.array([[0.02, -0.01, 0.03], [0.0, 0.05, -0.02], [0.01, 0.0, -0.04]])
    offset = np.array([1.0, -2.0, 0.5])
    values = (linear @ world + offset[:, None]).reshape(3, *shape)
    field = GridField(torch.tensor(values[None]), grid)
    points = (grid @ np.array([[1.3, 2.7, 4.1, 1], [6.2, 0.4, 7.9, 1]]).T)[:3].T
    expected = points + points @ linear.T + offset
    np.testing.assert_allclose(map_points(points, field), expected, atol=1e-9)
    target = affine((1, -1, 1), (1.0, 1.0, 1.5), (0.0, 6.0, 4.0))
    inside = map_to_fixed_grid(field, target, (4, 5, 3))
    target_world = (target @ voxel_index((4, 5, 3)))[:3]
    expected_field = (linear @ target_world + offset[:, None]).reshape(3, 4, 5, 3)
    np.testing.assert_allclose(inside.disp_mm[0].numpy(), expected_field, atol=1e-9)


def test_one_voxel_label_shift_gives_the_numpy_dice(tmp_path: Path) -> None:
    labels = np.zeros(FIXED_SHAPE, np.int16)
    labels[2:8, 2:7, 2:6] = 1
    labels[8:11, 3:9, 1:8] = 2
    for name in ("f", "m"):
        write(tmp_path / f"{name}.nii.gz", labels.astype(np.float32), FIXED_AFFINE)
        write(tmp_path / f"{name}l.nii.gz", labels, FIXED_AFFINE)
    inputs = load_pair_inputs(
        tmp_path / "f.nii.gz",
        tmp_path / "m.nii.gz",
        labels=(tmp_path / "fl.nii.gz", tmp_path / "ml.nii.gz"),
    )
    identity = complete_registration(inputs, GridField.zeros(FIXED_SHAPE, FIXED_AFFINE), 0.0)
    assert identity.metrics["dice"] == {"1": 1.0, "2": 1.0}
    assert identity.metrics["hd95"] == {"1": 0.0, "2": 0.0}
    step = torch.tensor(FIXED_AFFINE[:3, 0], dtype=torch.float32)  # one voxel along i, in mm
    field = GridField(step.view(1, 3, 1, 1, 1).repeat(1, 1, *FIXED_SHAPE), FIXED_AFFINE)
    shifted = complete_registration(inputs, field, 0.0)
    warped = np.concatenate([labels[1:], labels[-1:]])  # warped(x) = labels(x + e_i)
    np.testing.assert_array_equal(shifted.warped_labels[0, 0].numpy(), warped)
    for value in (1, 2):
        a, b = warped == value, labels == value
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert shifted.metrics["dice"][str(value)] == pytest.approx(dice, rel=1e-6)
        assert shifted.metrics["hd95"][str(value)] == pytest.approx(1.5, rel=1e-6)


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("missing", "file not found"),
        ("text", "not a readable image"),
        ("4d", "expected a 2D or 3D image"),
        ("nan", "NaN or Inf"),
        ("float_labels", "non-integer values"),
        ("label_grid", "label grid"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path: Path, case: str, problem: str) -> None:
    ramp = np.arange(np.prod(FIXED_SHAPE), dtype=np.float32).reshape(FIXED_SHAPE)
    image = write(tmp_path / "image.nii.gz", ramp, FIXED_AFFINE)
    labels = write(tmp_path / "labels.nii.gz", np.ones(FIXED_SHAPE, np.int16), FIXED_AFFINE)
    bad = tmp_path / "bad.nii.gz"
    if case == "text":
        bad = tmp_path / "bad.txt"
        bad.write_text("not an image\n")
    elif case == "4d":
        write(bad, np.ones((*FIXED_SHAPE, 2), np.float32), FIXED_AFFINE)
    elif case == "nan":
        data = np.ones(FIXED_SHAPE, np.float32)
        data[1, 2, 3] = np.nan
        write(bad, data, FIXED_AFFINE)
    elif case == "float_labels":
        write(bad, np.full(FIXED_SHAPE, 0.5, np.float32), FIXED_AFFINE)
    elif case == "label_grid":
        write(bad, np.ones(FIXED_SHAPE, np.int16), MOVING_AFFINE)
    with pytest.raises(DataError) as error:
        if case in ("float_labels", "label_grid"):
            load_pair_inputs(image, image, labels=(labels, bad))
        else:
            load_volume(bad)
    message = str(error.value)
    assert message.startswith(str(bad)) and problem in message and "\n" not in message


def test_2d_pairs_refuse_landmarks_and_3d_partners(tmp_path: Path) -> None:
    ramp = np.arange(30, dtype=np.float32).reshape(6, 5)  # not constant: a registrable image
    plane = write(tmp_path / "plane.nii.gz", ramp, FIXED_AFFINE)
    volume = np.arange(np.prod(FIXED_SHAPE), dtype=np.float32).reshape(FIXED_SHAPE)
    volume = write(tmp_path / "volume.nii.gz", volume, FIXED_AFFINE)
    points = tmp_path / "points.csv"
    points.write_text("x,y,z\n1,2,3\n")
    with pytest.raises(DataError, match=r"plane\.nii\.gz: is 2D; landmarks need 3D images"):
        load_pair_inputs(plane, plane, landmarks=(points, points))
    with pytest.raises(DataError, match=r"volume\.nii\.gz: is 3D, the fixed image .* is 2D"):
        load_pair_inputs(plane, volume)
    assert load_pair_inputs(plane, plane).fixed.spacing == pytest.approx(
        tuple(np.linalg.norm(FIXED_AFFINE[:3, :2], axis=0))
    )


def test_preprocessing_is_rebuilt_from_the_training_data_config():
    """predict.py preprocesses as training did: validation settings first, then training's."""
    data = {
        "shape": [8, 8, 8],
        "train": {"spacing": [2.0, 2.0, 2.0], "percentiles": [0.5, 99.5], "centre": "foreground"},
        "val": {"spacing": [2.0, 2.0, 2.0], "percentiles": [0.5, 99.5], "centre": "foreground"},
    }
    settings = preprocessing_from_config({"data": data})
    assert settings.spacing == (2.0, 2.0, 2.0) and settings.shape == (8, 8, 8)
    assert settings.percentiles == (0.5, 99.5) and settings.centre == "foreground"
    assert preprocessing_from_config({"data": {"shape": [8, 8, 8]}}).centre == "grid"
