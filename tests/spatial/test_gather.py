"""Trilinear sampling by gathered channel rows against ``grid_sample`` and analytic values."""

import sys

import pytest
import torch
import torch.nn.functional as F

from regnet.spatial import gather as gather_module
from regnet.spatial import sample
from regnet.spatial.gather import gather_sample
from regnet.spatial.grid import normalized_grid

warp_module = sys.modules["regnet.spatial.warp"]  # the package exports a function named warp
SHAPE = (7, 6, 5)


def points(count, shape=SHAPE, seed=0, margin=1.5):
    """Random voxel coordinates ``(3, count)``, some up to ``margin`` voxels outside the grid."""
    gen = torch.Generator().manual_seed(seed)
    upper = torch.tensor(shape, dtype=torch.float64).view(3, 1) - 1
    unit = torch.rand(3, count, generator=gen, dtype=torch.float64)
    return unit * (upper + 2 * margin) - margin


def grid_sample_at(image, coords):
    grid = normalized_grid(coords.view(1, 3, -1, 1, 1), image.shape[2:])
    out = F.grid_sample(image, grid, padding_mode="border", align_corners=True)
    return out.flatten(2)


def test_values_and_the_coordinates_gradient_equal_grid_sample():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, *SHAPE, generator=gen, dtype=torch.float64)
    coords = points(200).requires_grad_()
    weights = torch.rand(1, 3, 200, generator=gen, dtype=torch.float64)
    ours = gather_sample(image, coords)
    theirs = grid_sample_at(image, coords)
    torch.testing.assert_close(ours, theirs)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), coords)
    (theirs_grad,) = torch.autograd.grad((theirs * weights).sum(), coords)
    torch.testing.assert_close(ours_grad, theirs_grad)
    outside = ((coords < 0) | (coords > torch.tensor(SHAPE).view(3, 1) - 1)).detach()
    assert outside.any() and (ours_grad[outside] == 0).all()


def test_no_gradient_on_a_face_as_grid_sample():
    """Points exactly on a face (an identity grid's outer voxels, as every registration
    starts) pass no gradient along that axis, as ``grid_sample`` with border padding."""
    image = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij")
    coords = torch.stack([axis.flatten() for axis in axes]).requires_grad_()
    (ours,) = torch.autograd.grad(gather_sample(image, coords).sum(), coords)
    (theirs,) = torch.autograd.grad(grid_sample_at(image, coords).sum(), coords)
    # (between faces an integer coordinate has two one-sided slopes; either may be taken)
    on_face = (coords == 0) | (coords == torch.tensor(SHAPE).view(3, 1) - 1)
    assert on_face.any() and (theirs[on_face] == 0).all() and (ours[on_face] == 0).all()
    assert (ours[~on_face] != 0).all()


def test_gradcheck_and_a_constant_image_only():
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(1, 2, 4, 3, 5, generator=gen, dtype=torch.float64)
    coords = points(12, (4, 3, 5), seed=3, margin=0.8).requires_grad_()
    assert torch.autograd.gradcheck(gather_sample, (image, coords))
    with pytest.raises(ValueError, match="constant image"):
        gather_sample(image.requires_grad_(), coords)


def test_linear_image_is_reproduced_with_its_slope():
    # f(i, j, k) = 2 i - 3 j + 0.5 k + 1 is trilinear: exact at any inside point, slope constant.
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in SHAPE], indexing="ij")
    image = (2 * axes[0] - 3 * axes[1] + 0.5 * axes[2] + 1).view(1, 1, *SHAPE)
    coords = points(50, margin=0.0).requires_grad_()
    values = gather_sample(image, coords)[0, 0]
    expected = 2 * coords[0] - 3 * coords[1] + 0.5 * coords[2] + 1
    torch.testing.assert_close(values, expected.detach())
    (slope,) = torch.autograd.grad(values.sum(), coords)
    torch.testing.assert_close(
        slope, torch.tensor([2.0, -3.0, 0.5]).double().view(3, 1).expand(3, 50)
    )


def test_channels_last_storage_and_chunks_give_the_same_result(monkeypatch):
    image = torch.rand(1, 4, *SHAPE, dtype=torch.float64)
    coords = points(300, seed=4)
    whole = gather_sample(image, coords)
    channels_last = image.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(gather_sample(channels_last, coords), whole)
    monkeypatch.setattr(gather_module, "CHUNK_VALUES", 7 * 4)
    torch.testing.assert_close(gather_sample(image, coords), whole)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_sample_gathers_constant_images_at_coordinates_needing_a_gradient_or_one_channel(
    monkeypatch, requires_grad, channels
):
    calls = []
    monkeypatch.setattr(
        warp_module, "gather_sample", lambda *a: calls.append(1) or gather_sample(*a)
    )
    image = torch.rand(1, channels, *SHAPE)
    coords = points(40, seed=5).float().view(1, 3, 40, 1, 1).requires_grad_(requires_grad)
    out = sample(image, coords)
    gathered = int(requires_grad or channels == 1)
    assert len(calls) == gathered
    torch.testing.assert_close(out.flatten(2), grid_sample_at(image, coords.detach()))
    with torch.no_grad():
        sample(image, coords)
    assert len(calls) == gathered + int(channels == 1)
    image.requires_grad_()  # an image that needs a gradient stays with grid_sample
    sample(image, coords)
    assert len(calls) == gathered + int(channels == 1)


def test_row_indices_stay_exact_beyond_float32_integers():
    # 300 x 300 x 200 = 18M voxels: past 2**24, where float32 no longer holds every integer.
    shape = (300, 300, 200)
    rows = gather_module._RowIndex(shape, torch.float32)
    coords = torch.tensor([[298.5, 3.25], [299.0, 7.5], [197.75, 0.0]])  # odd rows past 2**24
    corner, fraction = rows(coords)
    lower = [[298, 3], [298, 7], [197, 0]]  # j: the last cell below the upper face
    base = [lower[0][n] * 300 * 200 + lower[1][n] * 200 + lower[2][n] for n in range(2)]
    offsets = [0, 200, 300 * 200, 300 * 200 + 200]
    assert corner.tolist() == [[b + o for b in base] for o in offsets]
    torch.testing.assert_close(fraction, torch.tensor([[0.5, 0.25], [1.0, 0.5], [0.75, 0.0]]))
