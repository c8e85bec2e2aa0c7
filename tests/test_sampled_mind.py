"""MIND-SSC at sampled voxels with warped descriptors, and the engine's own Adam."""

import pytest
import torch

from regnet.losses import build_loss
from regnet.optimize import register
from regnet.optimize.levels import Adam
from regnet.optimize.sampled import SampledMIND
from regnet.spatial import affine_to_ddf, identity_grid, jacobian_determinant, resize_ddf, warp
from regnet.spatial.smooth import gaussian_smooth


def head(shape, seed=0):
    """Textured object on an exactly zero background (MIND of a constant region is all ones)."""
    noise = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    texture = gaussian_smooth(noise, 2.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    inside = torch.ones(1, 1, *[n - 12 for n in shape])
    support = torch.nn.functional.pad(inside, [6] * (2 * len(shape)))
    return (0.2 + 0.8 * texture) * support


def dense_mind(fixed, warped, mask=None):
    inputs = {"fixed": fixed, "moving": warped, "warped": warped, "ddf": None}
    if mask is not None:
        inputs["fixed_mask"] = mask
    return build_loss("mind")(inputs)[0]


@pytest.mark.parametrize("shape", [(40, 36), (28, 24, 26)])
def test_zero_field_equals_the_dense_term(shape):
    fixed, moving = head(shape, 0), head(shape, 1)
    zero = torch.zeros(1, len(shape), *shape)
    mask = (torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    with_mask = SampledMIND(fixed, moving, mask, None, stride=1)
    torch.testing.assert_close(with_mask(zero), dense_mind(fixed, moving, mask))
    # Without a mask: the dilated foreground, normalised by every voxel of the grid.
    unmasked = SampledMIND(fixed, moving, None, None, stride=1)
    torch.testing.assert_close(unmasked(zero), dense_mind(fixed, moving))
    # Image smoothing before the descriptors: as the dense term's of the smoothed images.
    smoothed = SampledMIND(fixed, moving, mask, None, stride=1, sigma=0.4)
    expected = dense_mind(gaussian_smooth(fixed, 0.4), gaussian_smooth(moving, 0.4), mask)
    torch.testing.assert_close(smoothed(zero), expected)


@pytest.mark.parametrize("shape", [(40, 36), (28, 24, 26)])
def test_a_stride_cycle_averages_to_every_voxel(shape):
    fixed, moving = head(shape, 0), head(shape, 1)
    field = 0.7 * torch.ones(1, len(shape), *shape)
    every = SampledMIND(fixed, moving, None, None, stride=1)(field)
    lattice = SampledMIND(fixed, moving, None, None, stride=2)
    values = [lattice(field) for _ in range(2 ** len(shape))]
    assert len({float(v) for v in values}) > 1  # each evaluation sees other voxels
    torch.testing.assert_close(torch.stack(values).mean(), every)
    counts = [index.numel() for index, _, _ in lattice.lattice.samples]
    every_count = SampledMIND(fixed, moving, None, None, stride=1).lattice.samples[0][0].numel()
    assert sum(counts) == every_count


@pytest.mark.parametrize(("shape", "shift"), [((34, 30), (2, -3)), ((30, 28, 26), (2, -1, 3))])
def test_an_integer_shift_is_matched_exactly(shape, shift):
    ndim = len(shape)
    fixed = head(shape)
    moving = torch.roll(fixed, shift, dims=tuple(range(2, 2 + ndim)))  # moving(x + t) = fixed(x)
    mask = torch.zeros(1, 1, *shape)
    mask[(..., *(slice(8, -8),) * ndim)] = 1.0
    similarity = SampledMIND(fixed, moving, mask, None, stride=1)
    t = torch.tensor(shift, dtype=torch.float32).view(1, ndim, *[1] * ndim)
    field = t.expand(1, ndim, *shape)
    assert float(similarity(field)) < 1e-10
    assert float(similarity(torch.zeros_like(field))) > 1e-3
    # The same shift as the affine stage's matrix: the moving image is resampled through it.
    matrix = torch.eye(ndim + 1)[None]
    matrix[0, :ndim, ndim] = torch.tensor(shift, dtype=torch.float32)
    shifted = SampledMIND(fixed, moving, mask, None, matrix, stride=1)
    assert float(shifted(torch.zeros_like(field))) < 1e-10


@pytest.mark.parametrize(
    ("shape", "coarse_shape"), [((27, 22), (14, 11)), ((25, 23, 21), (13, 12, 11))]
)
def test_a_field_on_a_coarser_grid_is_interpolated_as_resize_ddf_does(shape, coarse_shape):
    fixed, moving = head(shape, 0), head(shape, 1)
    generator = torch.Generator().manual_seed(4)
    coarse = 2.0 * torch.randn(1, len(shape), *coarse_shape, generator=generator)
    similarity = SampledMIND(fixed, moving, None, None, stride=1)
    torch.testing.assert_close(similarity(coarse), similarity(resize_ddf(coarse, shape)))


def test_the_gradient_points_towards_the_known_shift():
    shape = (40, 36)
    fixed = head(shape)
    moving = torch.roll(fixed, (2, 0), dims=(2, 3))
    similarity = SampledMIND(fixed, moving, None, None)
    field = torch.zeros(1, 2, *shape, requires_grad=True)
    similarity(field).backward()
    assert float(field.grad[0, 0].sum()) < 0  # descent moves the field towards +2
    assert abs(float(field.grad[0, 1].sum())) < 0.2 * abs(float(field.grad[0, 0].sum()))


def blob_pair(shape, amplitude):
    """``moving`` and ``fixed(x) = moving(x + truth(x))``, both rendered from Gaussian blobs
    (no interpolation), and ``truth``, a smooth field of ``amplitude`` voxels inside."""
    generator = torch.Generator().manual_seed(0)
    size = torch.tensor(shape, dtype=torch.float32)
    centres = torch.rand(60, 3, generator=generator) * (size - 12) + 6
    heights = 0.3 + 0.7 * torch.rand(60, generator=generator)

    def render(points):
        image = torch.zeros(1, 1, *shape)
        for centre, height in zip(centres, heights, strict=True):
            squared = ((points - centre.view(1, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True)
            image += height * torch.exp(-squared / 8.0)
        return image

    noise = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(5))
    truth = gaussian_smooth(noise, 3.0)
    truth = truth / truth[INNER].abs().max() * amplitude
    grid = identity_grid(shape)
    return render(grid + truth), render(grid), truth


INNER = (slice(None), slice(None), *(slice(8, -8),) * 3)


def test_register_with_sampled_mind_recovers_a_deformation():
    """Sampled on every level, the first-order approximation shows on this strongly sheared
    field; a few dense finest steps after it bring the result close to the dense term's."""
    fixed, moving, truth = blob_pair((32, 30, 28), amplitude=2.0)
    errors = {}
    for sampling, polish in ((False, 0), (True, 0), (True, 5)):
        result = register(
            fixed,
            moving,
            transform="svf",
            loss="mind+grad",
            weights={"grad": 0.05},
            levels=2,
            iterations=(60, 40),
            init="identity",
            affine_first=False,
            mind_sampling=sampling,
            polish_iterations=polish,
        )
        errors[sampling, polish] = float((result.ddf - truth)[INNER].norm(dim=1).mean())
        if sampling:  # (the dense term alone folds a few voxels of this field)
            assert bool((jacobian_determinant(result.ddf) > 0).all())
    before = float(truth[INNER].norm(dim=1).mean())
    # When written: 0.85 voxels before, 0.13 dense, 0.43 sampled, 0.33 sampled and polished.
    assert errors[False, 0] < 0.2 * before
    assert errors[True, 0] < 0.6 * before
    assert errors[True, 5] < 0.85 * errors[True, 0]


def test_sampling_leaves_other_similarities_dense():
    shape = (20, 18)
    fixed, moving = head(shape, 0), head(shape, 1)
    kwargs = dict(transform="svf", levels=1, iterations=(5,), init="identity", affine_first=False)
    dense = register(fixed, moving, loss="lncc+grad", **kwargs)
    sampled = register(fixed, moving, loss="lncc+grad", mind_sampling=True, **kwargs)
    torch.testing.assert_close(dense.ddf, sampled.ddf)


def test_adam_matches_torch_optim_adam():
    target = torch.randn(3, 5, generator=torch.Generator().manual_seed(6))
    ours = torch.zeros(3, 5, requires_grad=True)
    theirs = torch.zeros(3, 5, requires_grad=True)
    optimiser = Adam([ours])
    reference = torch.optim.Adam([theirs], lr=0.3)
    for step in range(12):
        lr = 0.3 * (1.0 - 0.05 * step)
        for parameter in (ours, theirs):
            parameter.grad = None
            ((parameter - target) ** 4).sum().backward()
        optimiser.step(lr)
        reference.param_groups[0]["lr"] = lr
        reference.step()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert float((ours.detach() - target).abs().mean()) < float(target.abs().mean())


def test_affine_matrix_unaffected_by_sampling():
    """The start and affine stage do not use the sampled term: same matrix either way."""
    shape = (24, 22, 20)
    fixed = head(shape)
    matrix = torch.eye(4)[None]
    matrix[0, :3, 3] = torch.tensor([1.5, -1.0, 0.5])
    moving = warp(fixed, affine_to_ddf(torch.linalg.inv(matrix), shape))
    kwargs = dict(
        transform="svf",
        loss="mind+grad",
        affine_loss="mi",
        levels=2,
        iterations=(3, 2),
        affine_iterations=(20, 0),
    )
    dense = register(fixed, moving, **kwargs)
    sampled = register(fixed, moving, mind_sampling=True, **kwargs)
    torch.testing.assert_close(dense.matrix, sampled.matrix)


@pytest.mark.parametrize("shape", [(30, 26), (24, 22, 20)])
def test_only_faces_that_cut_the_object_lose_their_band(shape):
    from regnet.optimize.sampled import uncut_region

    ndim = len(shape)
    margins = torch.zeros(1, 1, *shape)
    margins[(..., *(slice(6, -6),) * ndim)] = 1.0  # an object with air all round
    assert bool((uncut_region(margins, 5) == 1).all())
    cut = margins.clone()
    cut[(..., *(slice(6, -6),) * (ndim - 1), slice(6, None))] = 1.0  # runs out of the last face
    keep = uncut_region(cut, 5)
    assert bool((keep[..., -5:] == 0).all()) and bool((keep[..., :-5] == 1).all())


@pytest.mark.parametrize("shape", [(30, 26), (22, 20, 24)])
def test_a_cut_changes_the_descriptors_only_within_radius_plus_dilation_of_the_face(shape):
    """The descriptor's footprint, inside the band of :func:`uncut_region`: cropping an image
    at a face changes the descriptors of the voxels within ``radius + dilation`` of it, no
    others."""
    from regnet.losses.mind import mind_ssc

    image = head(shape, 3)[(..., *(slice(6, -6),) * len(shape))]  # texture everywhere
    cropped = image[..., :-4]
    radius, dilation = 1, 2
    full = mind_ssc(image, radius, dilation)[..., :-4]
    cut = mind_ssc(cropped, radius, dilation)
    footprint = radius + dilation
    torch.testing.assert_close(cut[..., :-footprint], full[..., :-footprint])
    assert not torch.allclose(cut[..., -footprint:], full[..., -footprint:])
    assert not torch.allclose(cut[..., -1], full[..., -1])


def test_a_cut_face_band_carries_no_similarity_weight():
    shape = (26, 24, 22)
    fixed = head(shape, 0)
    fixed[..., -6:] = fixed[..., -7:-6]  # the object runs out of the last face
    lattice = SampledMIND(fixed, head(shape, 1), None, None, stride=1).lattice
    index = lattice.samples[0][0]
    depth = index % shape[2]  # position along the last axis
    band = 1 + 2 + 1  # the descriptor's radius + dilation, and one voxel for smoothing
    assert int(depth.max()) == shape[2] - 1 - band
    assert int(depth.min()) == 0  # the first face is air: its band keeps the dilated foreground
