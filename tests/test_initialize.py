"""Starts that survive real differences: foreground masks, the rotation grid and the multi-start
rigid search (:mod:`regnet.optimize.initialize`), on head phantoms with and without a skull."""

import math

import numpy as np
import pytest
import torch
from phantoms import brain_labels, render, resample, rigid_matrix
from scipy.spatial.transform import Rotation

from regnet.optimize import register
from regnet.optimize.initialize import (
    centre_of_mass,
    foreground_mask,
    otsu_threshold,
    rotation_candidates,
    search_start,
)

SPACING = [2.0, 2.0, 2.0]


def tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))[None, None].float()


def test_otsu_threshold_over_a_range_leaves_the_values_outside_out() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.zeros(500), 0.2 + 0.1 * torch.rand(300, generator=generator),
                        0.7 + 0.2 * torch.rand(200, generator=generator)])  # fmt: skip
    positive = values[values > 0]
    low, high = float(positive.min()), float(positive.max())
    assert otsu_threshold(values, low=low, high=high) == otsu_threshold(positive)
    assert 0.3 < otsu_threshold(positive) < 0.7


def test_otsu_threshold_splits_two_populations() -> None:
    values = torch.cat([torch.full((300,), 0.2), torch.full((100,), 0.9)])
    assert 0.2 < otsu_threshold(values) <= 0.9


def test_foreground_mask_holds_the_head_not_the_background() -> None:
    labels = brain_labels()
    head = tensor(render(labels, skull=True))
    mask = foreground_mask(head, dilation=0)
    brain = torch.from_numpy(labels > 0)[None, None]
    assert mask[brain].mean() > 0.97  # dark ventricles and CSF are inside
    assert mask[0, 0, 0, 0, 0] == 0 and mask[0, 0, -1, -1, -1] == 0
    dilated = foreground_mask(head, dilation=2)
    assert bool((dilated >= mask).all()) and dilated.sum() > mask.sum()


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("radii", [[1, 3, 0], [12, 2, 5]])
def test_dilate_is_one_box_max_pool(ndim: int, radii: list[int]) -> None:
    from regnet.optimize.initialize import dilate

    generator = torch.Generator().manual_seed(ndim)
    mask = (torch.rand(1, 1, *[9 + k for k in range(ndim)], generator=generator) > 0.9).float()
    radius = radii[:ndim]  # 12: wider than the axis
    pool = torch.nn.functional.max_pool2d if ndim == 2 else torch.nn.functional.max_pool3d
    expected = pool(mask, [2 * r + 1 for r in radius], stride=1, padding=radius)
    assert torch.equal(dilate(mask, radius), expected)
    assert dilate(mask, radius).sum() > mask.sum()


def test_foreground_centroid_ignores_a_zero_filled_field_of_view() -> None:
    image = torch.zeros(1, 1, 30, 30)
    image[:, :, 5:15, 10:20] = 1.0
    centroid = centre_of_mass(foreground_mask(image, 0)).float()
    assert torch.allclose(centroid, torch.tensor([9.5, 14.5]), atol=1e-4)


@pytest.mark.parametrize("ndim, count", [(2, 3), (3, 27)])
def test_rotation_candidates_cover_the_grid_zero_first(ndim: int, count: int) -> None:
    candidates = rotation_candidates(ndim)
    assert candidates.shape == (count, 1 if ndim == 2 else 3)
    assert bool((candidates[0] == 0).all())
    assert math.isclose(float(candidates.abs().max()), math.radians(30), rel_tol=1e-6)


def rigid_error(matrix: torch.Tensor, truth: np.ndarray, centre: np.ndarray):
    """Rotation error (degrees) and error at ``centre`` (voxels) of a recovered voxel matrix."""
    found = matrix[0].double().numpy()
    rotation = Rotation.from_matrix(found[:3, :3] @ truth[:3, :3].T).magnitude()
    shift = found[:3, :3] @ centre + found[:3, 3] - (truth[:3, :3] @ centre + truth[:3, 3])
    return math.degrees(rotation), float(np.abs(shift).max())


@pytest.mark.parametrize("skull", ["none", "moving", "fixed"])
def test_search_recovers_30_degrees_and_15_voxels(skull: str) -> None:
    labels = brain_labels()
    centre = (np.array(labels.shape) - 1) / 2
    truth = rigid_matrix((30.0, 0.0, 0.0), (15.0, 0.0, 0.0), centre)  # fixed -> moving voxel
    fixed = tensor(render(labels, skull=skull == "fixed", seed=1))
    content = render(labels, skull=skull == "moving", seed=2)
    moving = tensor(resample(content, np.linalg.inv(truth)))
    result = register(
        fixed, moving, transform="rigid", init="search", affine_loss="mi", spacing=SPACING,
        overlap_margin=6.0,
    )  # fmt: skip
    degrees, voxels = rigid_error(result.matrix, truth, centre)
    assert degrees < 3.0 and voxels < 1.0, (degrees, voxels)
    assert result.history[0].stage == "search"


@pytest.mark.parametrize("ndim", [2, 3])
def test_search_candidates_rotate_about_the_fixed_centroid_onto_the_moving_one(ndim: int) -> None:
    shape = (20, 24, 22)[:ndim]
    fixed_centroid = torch.tensor([8.0, 11.0, 9.5][:ndim])
    moving_centroid = torch.tensor([11.5, 9.0, 12.0][:ndim])
    seen = []

    def score(matrix: torch.Tensor) -> torch.Tensor:
        seen.append(matrix[0].clone())
        return matrix[0, 0, 0]  # lowest for the candidate rotated furthest about the first axis

    winner = search_start(
        shape, [1.0] * ndim, fixed_centroid, moving_centroid, score, lambda rigid: 0.0, keep=1
    )
    assert torch.allclose(seen[0], torch.eye(ndim + 1))  # the unmoved start comes first
    assert len(seen) == 1 + (3 if ndim == 2 else 27)
    for matrix in seen[1:]:
        mapped = matrix[:ndim, :ndim] @ fixed_centroid + matrix[:ndim, ndim]
        assert torch.allclose(mapped, moving_centroid, atol=1e-4)  # x -> c_m + R (x - c_f)
        assert torch.allclose(
            matrix[:ndim, :ndim] @ matrix[:ndim, :ndim].T, torch.eye(ndim), atol=1e-5
        )
    best = winner.matrix().detach()[0]
    # the smallest M[0, 0] on the grid: cos 30 in 2D, cos^2 30 (two rotations involve axis 0) in 3D
    expected = math.cos(math.radians(30)) ** (ndim - 1)
    assert math.isclose(float(best[0, 0]), expected, abs_tol=1e-5)
    assert float(best[0, 0]) == min(float(m[0, 0]) for m in seen)
