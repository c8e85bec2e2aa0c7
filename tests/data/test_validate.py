import math

import numpy as np
import pytest
import torch

from regnet.data.io import DataError
from regnet.data.validate import (
    check_image_content,
    check_mask_content,
    check_overlap,
    field_of_view,
    fields_of_view_overlap,
)

SHAPE = (10, 10, 10)


def translated(x: float, y: float = 0.0, z: float = 0.0, scale: float = 1.0) -> np.ndarray:
    affine = np.diag([scale, scale, scale, 1.0])
    affine[:3, 3] = (x, y, z)
    return affine


def test_field_of_view_covers_half_a_voxel_beyond_the_centres():
    affine = np.array([[-2.0, 0, 0, 30.0], [0, 1.5, 0, -4.0], [0, 0, 3.0, 1.0], [0, 0, 0, 1]])
    origin, edges = field_of_view((4, 6, 2), affine)
    np.testing.assert_allclose(origin, [31.0, -4.75, -0.5])
    np.testing.assert_allclose(edges, np.diag([-8.0, 9.0, 6.0]))


@pytest.mark.parametrize(
    ("offset", "overlap"),
    [(0.0, True), (9.9, True), (10.0, False), (-10.0, False), (10.1, False)],
    ids=["same", "almost-apart", "touching", "touching-below", "apart"],
)
def test_axis_aligned_grids_overlap_only_with_a_volume(offset, overlap):
    # voxel centres 0..9 mm: the field of view spans -0.5 .. 9.5 mm
    assert fields_of_view_overlap(SHAPE, np.eye(4), SHAPE, translated(offset)) is overlap


def test_flipped_axes_describe_the_same_field_of_view():
    las = translated(9.0)
    las[0, 0] = -1.0  # LAS: voxel 0 at x = 9, voxel 9 at x = 0
    assert fields_of_view_overlap(SHAPE, las, SHAPE, translated(9.9))
    assert not fields_of_view_overlap(SHAPE, las, SHAPE, translated(10.0))


def test_rotated_grid_outside_although_its_bounding_box_meets():
    """A 4 mm square turned 45 degrees, centred at (12, 12): its axis-aligned bounds
    (9.17 .. 14.83 mm) reach into the fixed field of view (-0.5 .. 9.5 mm), the square does not
    (its edge nearest the fixed corner (9.5, 9.5) lies on x + y = 21.17 > 19); centred at
    (10.5, 10.5) that edge lies on x + y = 18.17 and the squares overlap."""
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    for centre, overlap in ((12.0, False), (10.5, True)):
        rotated = np.eye(4)
        rotated[:2, :2] = [[c, -s], [s, c]]
        # voxel centres 0..3 -> field of view -0.5 .. 3.5: centre voxel index 1.5
        rotated[:3, 3] = np.array([centre, centre, 4.5]) - rotated[:3, :3] @ [1.5, 1.5, 1.5]
        assert fields_of_view_overlap(SHAPE, np.eye(4), (4, 4, 4), rotated) is overlap


def test_two_dimensional_grids():
    plane = np.diag([1.0, 1.0, 1.0])
    far = plane.copy()
    far[1, 2] = 10.0
    assert fields_of_view_overlap((10, 10), plane, (10, 10), plane)
    assert not fields_of_view_overlap((10, 10), plane, (10, 10), far)
    # 2D slices placed in 3D: one voxel thick along the third column
    slab = translated(0.0, 0.0, 0.9)
    assert fields_of_view_overlap((10, 10), np.eye(4), (10, 10), slab)
    assert not fields_of_view_overlap((10, 10), np.eye(4), (10, 10), translated(0.0, 0.0, 1.0))


def test_overlap_error_names_both_files_and_their_extents():
    with pytest.raises(DataError) as error:
        check_overlap("f.nii", SHAPE, np.eye(4), "m.nii", SHAPE, translated(100.0, scale=2.0))
    assert str(error.value) == (
        "m.nii: field of view does not overlap that of the fixed image f.nii in world space as "
        "the headers place them (moving x 99.0..119.0 y -1.0..19.0 z -1.0..19.0 mm RAS; "
        "fixed x -0.5..9.5 y -0.5..9.5 z -0.5..9.5); check the files' affines (origins)"
    )
    check_overlap("f.nii", SHAPE, np.eye(4), "m.nii", SHAPE, translated(5.0))


def test_image_content():
    check_image_content("a.nii", torch.arange(4.0))
    with pytest.raises(DataError, match=r"^a.nii: image is constant \(every voxel is -2.5\)"):
        check_image_content("a.nii", np.full((3, 3), -2.5))
    with pytest.raises(DataError, match=r"^a.nii: image holds no voxels \(size 0\)"):
        check_image_content("a.nii", np.zeros((0, 4)))


def test_mask_content():
    check_mask_content("m.nii", np.ones((2, 2)))  # a constant mask selects everything
    with pytest.raises(DataError, match=r"^m.nii: mask selects no voxel"):
        check_mask_content("m.nii", torch.zeros(3, 3))
    with pytest.raises(DataError, match=r"^m.nii: mask holds no voxels"):
        check_mask_content("m.nii", np.zeros(0))
