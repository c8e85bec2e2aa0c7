"""Warping, sampling, composition and resizing against analytic results and scipy."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from regnet.spatial import (
    SpatialTransformer,
    affine_matrix,
    affine_to_ddf,
    bspline_to_ddf,
    compose,
    identity_grid,
    resize_ddf,
    sample,
    warp,
    warp_labels,
)
from regnet.spatial.affine import image_centre
from regnet.spatial.warp import one_hot

SHAPES = {2: (23, 19), 3: (13, 11, 9)}


def smooth_image(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *[max(2, n // 4) for n in shape], generator=gen, dtype=torch.float64)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return torch.nn.functional.interpolate(noise, size=shape, mode=mode, align_corners=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_warp_returns_input(ndim):
    image = torch.rand(2, 3, *SHAPES[ndim])
    out = warp(image, torch.zeros(2, ndim, *SHAPES[ndim]))
    # float32 round trip through grid_sample normalised coordinates: ~1e-6 of a voxel.
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_integer_translation_equals_shifted_array(ndim):
    shape = SHAPES[ndim]
    image = torch.rand(1, 1, *shape)
    shift = (2, -1, 1)[:ndim]
    ddf = torch.zeros(1, ndim, *shape)
    for axis, s in enumerate(shift):
        ddf[:, axis] = s
    out = warp(image, ddf, padding="zeros")
    # out[x] = image[x + shift]
    src = tuple(slice(max(s, 0), n + min(s, 0)) for s, n in zip(shift, shape, strict=True))
    dst = tuple(slice(max(-s, 0), n + min(-s, 0)) for s, n in zip(shift, shape, strict=True))
    torch.testing.assert_close(out[(0, 0, *dst)], image[(0, 0, *src)], atol=1e-5, rtol=0)
    labels = torch.randint(0, 5, (1, 1, *shape))
    for method in ("nearest", "onehot"):
        warped = warp_labels(labels, ddf, method=method)
        assert torch.equal(warped[(0, 0, *dst)], labels[(0, 0, *src)])


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_warp_matches_scipy(ndim):
    shape = SHAPES[ndim]
    image = smooth_image(shape)
    rotation = torch.tensor([[0.3]] if ndim == 2 else [[0.2, -0.15, 0.25]], dtype=torch.float64)
    translation = torch.tensor([[1.3, -0.7, 0.4][:ndim]], dtype=torch.float64)
    matrix = affine_matrix(
        translation,
        rotation,
        torch.tensor([[0.05, -0.1, 0.02][:ndim]], dtype=torch.float64),
        centre=image_centre(shape),
    )
    ours = warp(image, affine_to_ddf(matrix, shape))[0, 0].numpy()
    # scipy maps output coordinate o to input coordinate M o + offset: the same backward
    # convention, independently implemented.
    ref = ndimage.affine_transform(
        image[0, 0].numpy(),
        matrix[0, :ndim, :ndim].numpy(),
        offset=matrix[0, :ndim, ndim].numpy(),
        order=1,
        mode="nearest",
    )
    np.testing.assert_allclose(ours, ref, atol=1e-10)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_with_inverse_is_zero(ndim):
    shape = SHAPES[ndim]
    rotation = torch.tensor([[0.1]] if ndim == 2 else [[0.1, 0.05, -0.08]], dtype=torch.float64)
    matrix = affine_matrix(
        torch.tensor([[0.8, -0.5, 0.3][:ndim]], dtype=torch.float64),
        rotation,
        centre=image_centre(shape),
    )
    u = affine_to_ddf(matrix, shape)
    u_inv = affine_to_ddf(torch.linalg.inv(matrix), shape)
    w = compose(u, u_inv)
    # Inside the grid the linear field is interpolated exactly; outside, border padding differs.
    inside = inside_mask(identity_grid(shape, dtype=torch.float64) + u_inv, shape)
    assert inside.float().mean() > 0.5
    assert w.abs().amax(1)[inside].max() < 1e-9
    w2 = compose(u_inv, u)
    inside2 = inside_mask(identity_grid(shape, dtype=torch.float64) + u, shape)
    assert w2.abs().amax(1)[inside2].max() < 1e-9


def inside_mask(coords, shape):
    ok = torch.ones(coords.shape[0], *shape, dtype=torch.bool)
    for axis, n in enumerate(shape):
        ok &= (coords[:, axis] >= 0) & (coords[:, axis] <= n - 1)
    return ok


def analytic_field(coords, shape, phase):
    """A smooth field of amplitude ~1.5 voxels, evaluated at arbitrary voxel coordinates."""
    ndim = len(shape)
    comps = []
    for a in range(ndim):
        arg = sum(coords[:, b] / (shape[b] - 1) * (1.3 + 0.4 * ((a + b) % 2)) for b in range(ndim))
        comps.append(1.5 * torch.sin(torch.pi * arg + phase + a))
    return torch.stack(comps, dim=1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_matches_analytic_composition(ndim):
    shape = tuple(3 * n for n in SHAPES[ndim])
    grid = identity_grid(shape, dtype=torch.float64)
    u, v = analytic_field(grid, shape, 0.3), analytic_field(grid, shape, 1.1)
    expected = v + analytic_field(grid + v, shape, 0.3)
    inside = inside_mask(grid + v, shape)
    err = (compose(u, v) - expected).abs().amax(1)[inside].max()
    assert err < 0.03  # linear interpolation error of a smooth field, in voxels
    wrong_order = (compose(v, u) - expected).abs().amax(1)[inside].max()
    assert wrong_order > 0.1
    # and warping once with the composition equals warping twice, up to resampling blur
    image = smooth_image(shape, seed=1)
    twice, once = warp(warp(image, u), v), warp(image, compose(u, v))
    assert (twice - once)[:, 0][inside].abs().mean() < 0.05 * float(image.std())


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_ddf_keeps_affine_transform(ndim):
    shape, new = SHAPES[ndim], tuple(2 * n - 1 for n in SHAPES[ndim])
    rotation = torch.tensor([[0.2]] if ndim == 2 else [[0.2, 0.1, -0.1]], dtype=torch.float64)
    matrix = affine_matrix(
        torch.tensor([[1.0, 2.0, -1.0][:ndim]], dtype=torch.float64),
        rotation,
        centre=image_centre(shape),
    )
    # Same physical map on a grid twice as fine (corners aligned): x' = S x with S = 2.
    scale = torch.diag(torch.tensor([2.0] * ndim + [1.0], dtype=torch.float64)).unsqueeze(0)
    expected = affine_to_ddf(scale @ matrix @ torch.linalg.inv(scale), new)
    torch.testing.assert_close(resize_ddf(affine_to_ddf(matrix, shape), new), expected)


def test_sample_at_coordinates_and_errors():
    image = torch.arange(20.0).view(1, 1, 4, 5)
    coords = torch.tensor([[[[1.0, 2.5]], [[3.0, 0.0]]]])  # points (1,3) and (2.5,0)
    out = sample(image, coords)
    torch.testing.assert_close(out, torch.tensor([[[[8.0, 12.5]]]]))
    with pytest.raises(ValueError, match="coords must have shape"):
        sample(image, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="differs from ddf"):
        warp(image, torch.zeros(1, 2, 3, 5))
    with pytest.raises(ValueError, match="mode must be"):
        SpatialTransformer(mode="cubic")


def test_warp_gradcheck():
    image = torch.rand(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    ddf = (0.3 * torch.randn(1, 2, 5, 6, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: warp(a, b), (image, ddf), eps=1e-6, atol=1e-5)
    image3 = torch.rand(1, 1, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    ddf3 = (0.3 * torch.randn(1, 3, 3, 4, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: warp(a, b), (image3, ddf3), eps=1e-6, atol=1e-5)


def test_grids_cached_under_inference_mode_still_support_autograd():
    shape = (7, 5, 6)
    with torch.inference_mode():
        warp(torch.rand(1, 1, *shape), torch.zeros(1, 3, *shape))
        resize_ddf(torch.zeros(1, 3, *shape), (9, 7, 8))
        bspline_to_ddf(torch.zeros(1, 3, 4, 4, 4), shape)
    ddf = torch.zeros(1, 3, *shape, requires_grad=True)
    warp(torch.rand(1, 1, *shape), ddf).sum().backward()
    small = torch.zeros(1, 3, *shape, requires_grad=True)
    resize_ddf(small, (9, 7, 8)).sum().backward()
    cp = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    bspline_to_ddf(cp, shape).sum().backward()
    assert ddf.grad is not None and cp.grad is not None and small.grad is not None


@pytest.mark.parametrize("shape", [(2, 1, 7, 9), (2, 1, 5, 6, 7)])
@pytest.mark.parametrize("cell", [1, 2, 3])
def test_one_hot_counts_class_fractions_per_cell(shape, cell):
    labels = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0))
    labels.view(-1)[0] = 3
    reference = F.one_hot(labels[:, 0], 4).movedim(-1, 1).double()
    if cell > 1:
        pool = F.avg_pool2d if len(shape) == 4 else F.avg_pool3d
        reference = pool(reference, cell)
    result = one_hot(labels, 4, cell=cell)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), reference)
    with pytest.raises(ValueError, match="label 3 is out of range for 3 classes"):
        one_hot(labels, 3, cell=cell)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["border", "zeros", "reflection"])
def test_threaded_3d_sampling_equals_one_batch_item(monkeypatch, mode, padding):
    """A 3D CPU sampling cut into batch items (one thread each) gives grid_sample's values and
    gradients exactly, also for a point count the pieces do not divide."""
    warp_module = importlib.import_module("regnet.spatial.warp")  # `warp` is also a function

    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 4, 9, 8, 7, generator=gen, dtype=torch.float64)
    coords = (
        torch.rand(1, 3, 7, 5, 3, generator=gen, dtype=torch.float64) * 12 - 2
    ).requires_grad_()
    reference = F.grid_sample(
        image,
        warp_module.normalized_grid(coords, image.shape[2:]),
        mode={"linear": "bilinear", "nearest": "nearest"}[mode],
        padding_mode=padding,
        align_corners=True,
    )
    (grad_reference,) = torch.autograd.grad((reference * reference).sum(), coords)
    monkeypatch.setattr(warp_module, "MIN_POINTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(warp_module, "_gathers", lambda *args: False)  # tests/spatial/test_gather
    assert warp_module._cpu_chunks(image, coords.permute(0, 2, 3, 4, 1)) == 4
    out = sample(image, coords, mode=mode, padding=padding)
    (grad,) = torch.autograd.grad((out * out).sum(), coords)
    assert torch.equal(out, reference)
    assert torch.equal(grad, grad_reference)


def test_threaded_sampling_splits_an_image_that_needs_a_gradient_only_when_small(monkeypatch):
    """An image needing a gradient is split only when it holds at most
    MAX_GRADIENT_ELEMENTS_PER_POINT elements per sampled point; its gradient (the pieces'
    copies summed) and the points' gradient then equal the unsplit sampling's."""
    warp_module = importlib.import_module("regnet.spatial.warp")  # `warp` is also a function

    monkeypatch.setattr(warp_module, "MIN_POINTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    limit = warp_module.MAX_GRADIENT_ELEMENTS_PER_POINT
    large = torch.rand(1, 3, 8, 8, 8, requires_grad=True)  # 1536 elements
    grid = torch.zeros(1, 4, 4, 4, 3)  # 64 points
    assert 1536 > limit * 64 and warp_module._cpu_chunks(large, grid) == 1
    assert warp_module._cpu_chunks(large.detach(), grid) == 2
    assert warp_module._cpu_chunks(large.detach()[:, :, 0], grid[:, 0]) == 1  # 2D
    gen = torch.Generator().manual_seed(5)
    field = torch.rand(1, 3, 6, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(1, 3, 9, 3, 2, generator=gen, dtype=torch.float64) * 7 - 1
    coords.requires_grad_()
    assert warp_module._cpu_chunks(field, coords.permute(0, 2, 3, 4, 1)) == 2
    out = sample(field, coords)
    grads = torch.autograd.grad((out * out).sum(), (field, coords))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    reference = sample(field, coords)
    reference_grads = torch.autograd.grad((reference * reference).sum(), (field, coords))
    assert torch.equal(out, reference)
    for grad, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
