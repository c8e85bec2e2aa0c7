"""Cubic B-spline interpolation against scipy.ndimage and analytic cases, 2D and 3D."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from regnet.spatial import affine_matrix, apply_affine, identity_grid
from regnet.spatial.cubic import bspline_coefficients, resample_cubic, sample_cubic

SHAPES = {2: (20, 17), 3: (15, 13, 11)}


def textured(shape, seed=0):
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("ndim", [2, 3])
def test_equals_scipy_affine_transform_order_3_grid_constant(ndim):
    shape = SHAPES[ndim]
    image = textured(shape)
    angles = torch.tensor([[0.3]] if ndim == 2 else [[0.3, -0.2, 0.1]], dtype=torch.float64)
    translation = torch.tensor([[2.3, -1.7, 0.6][:ndim]], dtype=torch.float64)
    scale = torch.full((1, ndim), 1.1, dtype=torch.float64)
    centre = [(n - 1) / 2 for n in shape]
    matrix = affine_matrix(translation, angles, scale, ndim=ndim, centre=centre)
    expected = ndimage.affine_transform(
        image[0, 0].numpy(), matrix[0].numpy(), order=3, mode="grid-constant", cval=0.0
    )
    points = apply_affine(matrix, identity_grid(shape, dtype=torch.float64))
    out = sample_cubic(image, points)[0, 0].numpy()
    assert np.abs(out - expected).max() < 1e-6  # points leave the image: zero extension too
    out32 = sample_cubic(image.float(), points.float())[0, 0].numpy()
    assert np.abs(out32 - expected).max() < 1e-5


@pytest.mark.parametrize("ndim", [2, 3])
def test_voxel_centres_and_integer_shifts_give_the_image_back(ndim):
    shape = SHAPES[ndim]
    image = textured(shape, 1)
    grid = identity_grid(shape, dtype=torch.float64)
    torch.testing.assert_close(sample_cubic(image, grid), image, atol=1e-6, rtol=0)
    shift = torch.zeros(1, ndim, *[1] * ndim, dtype=torch.float64)
    shift[0, 0] = 2.0
    shifted = sample_cubic(image, grid + shift)
    torch.testing.assert_close(shifted[:, :, :-2], image[:, :, 2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_far_outside_is_zero_and_constants_stay_constant_inside(ndim):
    shape = (40,) * ndim
    ones = torch.ones(1, 1, *shape, dtype=torch.float64)
    grid = identity_grid(shape, dtype=torch.float64)
    inside = sample_cubic(ones, grid * 0.37 + 12.2)  # off the voxels, 12 voxels from the edges
    torch.testing.assert_close(inside, torch.ones_like(inside), atol=1e-6, rtol=0)
    outside = sample_cubic(ones, grid - 60.0)
    assert outside.abs().max() == 0


def test_coefficients_hold_the_zero_margin():
    image = textured((9, 8, 7))
    coefficients = bspline_coefficients(image, radius=12)
    assert coefficients.shape == (1, 1, 33, 32, 31)
    assert coefficients[..., 0].abs().max() < 1e-6  # decayed by |z|^12 at the outer edge


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_resample_onto_a_grid_equals_scipy_for_aligned_and_oblique_grids(ndim, aligned):
    """The separable path (output axes along image axes: flipped, permuted, rescaled) and the
    general one give scipy's order-3 grid-constant resampling."""
    shape = SHAPES[ndim]
    image = textured(shape, 2)
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = np.roll(np.diag([-0.7, 1.5, 0.8][:ndim]), 1, axis=1)  # permuted
    matrix[:ndim, ndim] = [12.3, -1.2, 0.4][:ndim]
    if not aligned:
        matrix[0, 0] = 0.1
    out_shape = (20, 14, 22)[:ndim]
    expected = ndimage.affine_transform(
        image[0, 0].numpy(), matrix, output_shape=out_shape, order=3, mode="grid-constant"
    )
    out = resample_cubic(image, torch.from_numpy(matrix), out_shape)
    assert out.shape == (1, 1, *out_shape)
    assert np.abs(out[0, 0].numpy() - expected).max() < 1e-6  # as sample_cubic: far outside too
