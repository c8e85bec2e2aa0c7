"""Cubic B-spline FFD: partition of unity, linear precision, basis values at knots."""

import pytest
import torch

from regnet.spatial import bspline_to_ddf, control_grid_shape
from regnet.spatial.bspline import cubic_bspline_basis


def test_basis_is_the_cubic_bspline():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    b = cubic_bspline_basis(s)
    torch.testing.assert_close(b.sum(-1), torch.ones(11, dtype=torch.float64))
    torch.testing.assert_close(b[0], torch.tensor([1 / 6, 4 / 6, 1 / 6, 0], dtype=torch.float64))


@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_control_points_give_constant_field(ndim):
    shape = (21, 17, 13)[:ndim]
    grid = control_grid_shape(shape, 4)
    cp = torch.zeros(2, ndim, *grid)
    for a in range(ndim):
        cp[:, a] = 1.5 - a
    ddf = bspline_to_ddf(cp, shape)
    for a in range(ndim):
        torch.testing.assert_close(ddf[:, a], torch.full_like(ddf[:, a], 1.5 - a))


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_control_points_reproduce_linear_field(ndim):
    shape = (25, 18, 11)[:ndim]
    grid = control_grid_shape(shape, 5)
    # control point k of axis a sits at voxel (k - 1) * delta_a
    deltas = [(n - 1) / (g - 3) for n, g in zip(shape, grid, strict=True)]
    positions = torch.meshgrid(
        *[
            (torch.arange(g, dtype=torch.float64) - 1) * d
            for g, d in zip(grid, deltas, strict=True)
        ],
        indexing="ij",
    )
    voxels = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    slope = [0.1, -0.2, 0.05][:ndim]
    cp = torch.stack([sum(s * p for s, p in zip(slope, positions, strict=True))] * ndim)[None]
    expected = sum(s * x for s, x in zip(slope, voxels, strict=True))
    ddf = bspline_to_ddf(cp, shape)
    torch.testing.assert_close(ddf[0, 0], expected)


def test_single_control_point_weight_at_its_knot():
    shape, spacing = (17, 17), 4
    grid = control_grid_shape(shape, spacing)
    assert grid == (7, 7)
    cp = torch.zeros(1, 2, *grid)
    cp[0, 0, 3, 3] = 6.0  # sits at voxel (8, 8)
    ddf = bspline_to_ddf(cp, shape)
    # B1(0)^2 = (4/6)^2 at the knot, and (1/6)*(4/6) at the neighbouring knot
    assert abs(ddf[0, 0, 8, 8].item() - 6 * (4 / 6) ** 2) < 1e-5
    assert abs(ddf[0, 0, 4, 8].item() - 6 * (1 / 6) * (4 / 6)) < 1e-5
    assert ddf[0, 0, 0, 8].abs().item() < 1e-6
    assert ddf[0, 1].abs().max() == 0


def test_too_small_control_grid_raises():
    with pytest.raises(ValueError, match="at least 4"):
        bspline_to_ddf(torch.zeros(1, 2, 3, 5), (10, 10))
