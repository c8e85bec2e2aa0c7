"""Learn2Reg submissions: file names, the voxel/backward convention checked by an independent
reading of the challenge's evaluation, and its metrics on cases with known answers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from regnet.data.io import DataError
from regnet.learn2reg import (
    dice_scores,
    hd95_scores,
    keypoint_tre,
    log_jacobian,
    sdlogj,
    submission_name,
    voxel_displacement,
    write_displacement,
)

SHAPE = (20, 18, 16)
FIXED_AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, 1.2, 0, -9.0], [0, 0, 2.0, 4.0], [0, 0, 0, 1]])
# the moving scan: another origin (3, -2, 1 fixed voxels away), so the two grids' indices differ
MOVING_AFFINE = FIXED_AFFINE.copy()
MOVING_AFFINE[:3, 3] += FIXED_AFFINE[:3, :3] @ [3, -2, 1]
# RAS mm: fixed point p shows the anatomy at moving point p + s (2, 1, -2 voxels)
SHIFT_MM = FIXED_AFFINE[:3, :3] @ [2.0, 1.0, -2.0]


def test_submission_names_follow_the_evaluation():
    assert submission_name("x/LungCT_0001_0000.nii.gz", "LungCT_0001_0001.nii.gz") == (
        "disp_0001_0001.nii.gz"
    )
    assert submission_name("OASIS_0395_0000.nii.gz", "OASIS_0396_0000.nii.gz") == (
        "disp_0395_0000_0396_0000.nii.gz"
    )
    assert submission_name("ThoraxCBCT_0011_0001.nii.gz", "ThoraxCBCT_0011_0000.nii.gz") == (
        "disp_0011_0001_0011_0000.nii.gz"
    )
    with pytest.raises(DataError, match="brain.nii.gz: not a Learn2Reg image name"):
        submission_name("brain.nii.gz", "OASIS_0396_0000.nii.gz")


def official_reading(path, moving_labels, fixed_points, moving_spacing):
    """The evaluation's use of a submission file, written out independently: ``map_coordinates``
    of the moving labels at fixed voxel + disp (nearest), keypoints moved by the cubic-spline
    sampled disp, errors scaled by the moving spacing."""
    disp = nib.load(str(path)).get_fdata()
    identity = np.meshgrid(*(np.arange(n) for n in disp.shape[:3]), indexing="ij")
    warped = ndimage.map_coordinates(moving_labels, identity + disp.transpose(3, 0, 1, 2), order=0)
    sampled = [ndimage.map_coordinates(disp[..., c], fixed_points.T) for c in range(3)]
    return warped, fixed_points + np.stack(sampled, 1), np.asarray(moving_spacing)


def test_known_translation_reads_back_as_the_evaluation_expects(tmp_path):
    # fixed label map: a box; moving label map: the same anatomy, on the moving grid
    fixed_voxels = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    box = np.all((fixed_voxels >= [5, 4, 4]) & (fixed_voxels <= [13, 12, 10]), axis=-1)
    moving_shape = (30, 22, 18)
    moving_voxels = np.stack(np.meshgrid(*(np.arange(n) for n in moving_shape), indexing="ij"), -1)
    moving_world = moving_voxels @ MOVING_AFFINE[:3, :3].T + MOVING_AFFINE[:3, 3]
    # moving world q shows the anatomy of fixed world q - s
    source = (moving_world - SHIFT_MM - FIXED_AFFINE[:3, 3]) @ np.linalg.inv(FIXED_AFFINE[:3, :3]).T
    moving_labels = ndimage.map_coordinates(box.astype(float), np.moveaxis(source, -1, 0), order=0)
    assert moving_labels.sum() == box.sum()
    fixed_points = np.array([[6.0, 5.0, 5.0], [12.0, 11.0, 9.0], [9.0, 8.0, 7.0]])
    world = fixed_points @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3] + SHIFT_MM
    moving_points = (world - MOVING_AFFINE[:3, 3]) @ np.linalg.inv(MOVING_AFFINE[:3, :3]).T
    moving_spacing = np.abs(np.diag(MOVING_AFFINE)[:3])

    disp_mm = torch.from_numpy(np.broadcast_to(SHIFT_MM[:, None, None, None], (3, *SHAPE)).copy())
    disp = voxel_displacement(disp_mm[None], FIXED_AFFINE, MOVING_AFFINE)
    assert disp.shape == (*SHAPE, 3)
    np.testing.assert_allclose(disp, np.broadcast_to([-1.0, 3.0, -3.0], disp.shape), atol=1e-12)
    path = write_displacement(tmp_path / "disp_0001_0001.nii.gz", disp, FIXED_AFFINE)
    warped, mapped, spacing = official_reading(path, moving_labels, fixed_points, moving_spacing)
    assert dice_scores(box.astype(float), moving_labels, warped, [1]) == [1.0]
    np.testing.assert_allclose(mapped, moving_points, atol=1e-4)
    tre = keypoint_tre(fixed_points, moving_points, nib.load(str(path)).get_fdata(), spacing)
    np.testing.assert_allclose(tre, 0.0, atol=1e-4)

    # the same reading rejects a field of the wrong sign or in mm instead of voxels
    mm_field = np.broadcast_to(SHIFT_MM, (*SHAPE, 3))
    for name, wrong in (("sign", -disp), ("units", mm_field)):
        bad = write_displacement(tmp_path / f"{name}.nii.gz", wrong, FIXED_AFFINE)
        warped, mapped, _ = official_reading(bad, moving_labels, fixed_points, moving_spacing)
        assert dice_scores(box.astype(float), moving_labels, warped, [1])[0] < 0.8, name
        assert keypoint_tre(fixed_points, moving_points, wrong, spacing).min() > 2.0, name


def test_dice_and_hd95_of_shifted_slabs():
    fixed = np.zeros((24, 24, 24))
    fixed[8:10, 2:22, 2:22] = 1  # a slab 2 voxels thick
    fixed[15:20, 15:20, 15:20] = 2
    warped = np.roll(fixed == 1, 3, axis=0).astype(float)  # slab moved by 3 voxels, label 2 lost
    moving = fixed.copy()
    dice = dice_scores(fixed, moving, warped, [1, 2, 3])
    assert dice[0] == 0.0 and dice[1] == 0.0 and np.isnan(dice[2])
    # surface elements of the big faces lie 1 and 3 voxels from the other slab's surface
    hd95 = hd95_scores(fixed, moving, warped, [1, 2, 3])
    assert hd95[0] == 3.0 and hd95[1] == np.inf and np.isnan(hd95[2])
    assert hd95_scores(fixed, moving, fixed, [1, 2]) == [0.0, 0.0]


def test_log_jacobian_matches_the_evaluation_formula():
    rng = np.random.default_rng(1)
    disp = ndimage.gaussian_filter(rng.normal(size=(14, 12, 10, 3)), (2, 2, 2, 0)) * 4
    kernel = np.array([-0.5, 0.0, 0.5])
    gradients = np.empty((3, 3, 14, 12, 10))  # [axis, component]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 3
        for c in range(3):
            gradients[axis, c] = ndimage.correlate(
                disp[..., c], kernel.reshape(shape), mode="constant"
            )
    jacobian = (gradients + np.eye(3)[:, :, None, None, None])[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
    expected = np.log(np.clip(det + 3, 1e-9, 1e9))
    np.testing.assert_allclose(log_jacobian(disp), expected, atol=1e-12)
    mask = np.zeros((14, 12, 10))
    mask[4:9, 3:8, 2:8] = 1
    inside = expected[mask[2:-2, 2:-2, 2:-2] > 0]
    assert sdlogj(disp, mask) == pytest.approx(inside.std(), rel=1e-12)
    assert sdlogj(disp) == pytest.approx(expected.std(), rel=1e-12)
