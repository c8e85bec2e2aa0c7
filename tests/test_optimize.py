"""Per-pair registration by gradient descent: known transforms are recovered."""

import math

import pytest
import torch

from regnet.optimize import refine, register
from regnet.optimize.engine import _default_iterations
from regnet.optimize.initialize import centre_of_mass_translation
from regnet.optimize.pyramid import level_shapes
from regnet.spatial import affine_matrix, affine_to_ddf, identity_grid, jacobian_determinant, warp
from regnet.spatial.affine import image_centre
from regnet.spatial.smooth import gaussian_smooth


def textured(shape, seed=1):
    """Smooth random texture in [0, 1] (LNCC needs local structure everywhere)."""
    noise = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
    image = gaussian_smooth(noise, 2.0)
    return (image - image.min()) / (image.max() - image.min())


def blobs(shape, centres, width=2.5):
    """Gaussian blobs on a zero background at ``centres`` (voxels)."""
    grid = identity_grid(shape)
    image = torch.zeros(1, 1, *shape)
    for centre in centres:
        c = torch.tensor(centre, dtype=torch.float32).view(1, -1, *([1] * len(shape)))
        image = image + torch.exp(-((grid - c) ** 2).sum(1, keepdim=True) / (2 * width**2))
    return image


def smooth_field(shape, amplitude, sigma, seed=3):
    noise = torch.randn(1, len(shape), *shape, generator=torch.Generator().manual_seed(seed))
    field = gaussian_smooth(noise, sigma)
    return field / field.abs().max() * amplitude


def misaligned_pair(shape, matrix):
    """``fixed`` and ``moving`` with ``warp(moving, affine_to_ddf(matrix)) ≈ fixed``."""
    fixed = textured(shape)
    moving = warp(fixed, affine_to_ddf(torch.linalg.inv(matrix), shape))
    return fixed, moving


def mean_error(ddf, truth, margin=3):
    inner = (slice(None),) * 2 + (slice(margin, -margin),) * (ddf.dim() - 2)
    return float((ddf - truth)[inner].norm(dim=1).mean())


CASES = {
    2: dict(rotation=[[math.radians(10)]], translation=[[2.0, -1.5]], log_scale=[[0.04, -0.03]]),
    3: dict(
        rotation=[[math.radians(6), math.radians(-5), math.radians(7)]],
        translation=[[1.5, -1.0, 2.0]],
        log_scale=[[0.04, -0.03, 0.03]],
    ),
}


@pytest.mark.parametrize(
    ("shape", "kind"), [((32, 32), "rigid"), ((32, 32), "affine"), ((20, 20, 20), "rigid")]
)
def test_affine_misalignment_is_recovered(shape, kind):
    params = {k: torch.tensor(v) for k, v in CASES[len(shape)].items()}
    if kind == "rigid":
        params.pop("log_scale")
    truth = affine_matrix(**params, centre=image_centre(shape))
    fixed, moving = misaligned_pair(shape, truth)
    result = register(
        fixed, moving, transform=kind, loss="lncc", init="identity", iterations=(60, 40, 30)
    )
    true_ddf = affine_to_ddf(truth, shape)
    assert mean_error(result.ddf, true_ddf) < 0.15
    ndim = len(shape)
    torch.testing.assert_close(
        result.matrix[0, :ndim, :ndim], truth[0, :ndim, :ndim], atol=0.02, rtol=0
    )
    assert mean_error(torch.zeros_like(true_ddf), true_ddf) > 1.5  # the task was not trivial


def test_affine_3d_with_scaling_is_recovered():
    shape = (20, 20, 20)
    truth = affine_matrix(
        **{k: torch.tensor(v) for k, v in CASES[3].items()}, centre=image_centre(shape)
    )
    fixed, moving = misaligned_pair(shape, truth)
    result = register(fixed, moving, transform="affine", loss="lncc", init="identity")
    assert mean_error(result.ddf, affine_to_ddf(truth, shape)) < 0.25


def test_rigid_is_rigid_in_mm_on_anisotropic_grids():
    shape, spacing = (32, 16), (1.0, 2.0)
    truth = affine_matrix(
        translation=torch.tensor([[1.0, 0.5]]),
        rotation=torch.tensor([[math.radians(8)]]),
        centre=image_centre(shape),
        spacing=spacing,
    )
    fixed, moving = misaligned_pair(shape, truth)
    result = register(fixed, moving, transform="rigid", loss="lncc", spacing=spacing)
    assert mean_error(result.ddf, affine_to_ddf(truth, shape), margin=2) < 0.15
    linear_mm = result.matrix[0, :2, :2] * torch.tensor(spacing).view(2, 1) / torch.tensor(spacing)
    torch.testing.assert_close(linear_mm @ linear_mm.T, torch.eye(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("transform", ["bspline", "ddf", "svf"])
def test_smooth_deformation_is_largely_recovered(transform):
    shape = (32, 32)
    moving = textured(shape)
    truth = smooth_field(shape, amplitude=2.5, sigma=4.0)
    fixed = warp(moving, truth)
    result = register(
        fixed,
        moving,
        transform=transform,
        weights={"grad": 0.1},
        init="identity",
        affine_first=False,
        levels=2,
        iterations=(80, 40),
    )
    before = float(truth.norm(dim=1).mean())
    after = float((result.ddf - truth).norm(dim=1).mean())
    assert after < 0.3 * before
    if transform == "svf":
        assert bool((jacobian_determinant(result.ddf) > 0).all())
    assert result.local_ddf is not None


@pytest.mark.parametrize("exact_svf_gradient", [True, False])
def test_svf_3d_recovers_deformation_without_folding(exact_svf_gradient):
    shape = (16, 16, 16)
    moving = textured(shape)
    truth = smooth_field(shape, amplitude=3.0, sigma=3.0)
    fixed = warp(moving, truth)
    result = register(
        fixed,
        moving,
        transform="svf",
        levels=2,
        iterations=(80, 60),
        weights={"grad": 0.1},
        init="identity",
        affine_first=False,
        exact_svf_gradient=exact_svf_gradient,
    )
    before = float(truth.norm(dim=1).mean())
    assert float((result.ddf - truth).norm(dim=1).mean()) < 0.4 * before
    assert bool((jacobian_determinant(result.ddf) > 0).all())


def test_centre_of_mass_initialisation_fixes_a_large_translation():
    shape = (40, 40)
    fixed = blobs(shape, [(12, 14), (18, 10), (15, 20)])
    shift = torch.tensor([14.0, 12.0])
    moving = blobs(shape, [(12 + 14, 14 + 12), (18 + 14, 10 + 12), (15 + 14, 20 + 12)])
    torch.testing.assert_close(
        centre_of_mass_translation(fixed, moving).float(), shift, atol=0.02, rtol=0
    )
    truth = shift.view(1, 2, 1, 1).expand(1, 2, *shape)
    settings = dict(transform="rigid", loss="mse", levels=1, iterations=(60,))
    with_com = register(fixed, moving, init="com", **settings)
    without = register(fixed, moving, init="identity", **settings)  # blobs do not overlap
    region = (slice(None), slice(None), slice(5, 25), slice(5, 25))
    assert float((with_com.ddf - truth)[region].norm(dim=1).mean()) < 0.2
    assert float((without.ddf - truth)[region].norm(dim=1).mean()) > 3.0


def test_fixed_mask_selects_the_structure_to_align():
    shape = (40, 40)
    fixed = blobs(shape, [(12, 12), (28, 28)], width=3.0)
    moving = blobs(shape, [(15, 12), (25, 28)], width=3.0)  # first +3, second -3 along axis 0
    near_first = torch.zeros(1, 1, *shape)
    near_first[..., :20, :20] = 1
    near_second = 1 - near_first
    settings = dict(transform="rigid", loss="mse", init="identity", levels=2)
    first = register(fixed, moving, fixed_mask=near_first, **settings)
    second = register(fixed, moving, fixed_mask=near_second, **settings)
    assert abs(float(first.ddf[0, 0, 12, 12]) - 3.0) < 0.3
    assert abs(float(second.ddf[0, 0, 28, 28]) + 3.0) < 0.3
    # the moving mask works the same way, from the moving image's side
    moved = register(fixed, moving, moving_mask=near_first, **settings)
    assert abs(float(moved.ddf[0, 0, 12, 12]) - 3.0) < 0.3


@pytest.mark.parametrize("spacing", [None, (2.0, 1.0)])
def test_landmarks_alone_recover_a_translation(spacing):
    shape = (24, 24)
    image = textured(shape)
    fixed_points = torch.tensor([[4.0, 5.0], [18.0, 6.0], [10.0, 19.0], [15.0, 15.0]])
    shift = torch.tensor([2.5, -1.5])
    result = register(
        image,
        image,  # the images agree on identity; only the landmarks ask for the shift
        transform="rigid",
        loss=None,
        fixed_landmarks=fixed_points,
        moving_landmarks=fixed_points + shift,
        init="identity",
        spacing=spacing,
        levels=1,
        iterations=(300,),
    )
    torch.testing.assert_close(result.matrix[0, :2, 2], shift, atol=0.05, rtol=0)
    torch.testing.assert_close(result.matrix[0, :2, :2], torch.eye(2), atol=0.01, rtol=0)


def test_landmarks_pull_a_deformable_result():
    shape = (24, 24)
    image = textured(shape)
    points = torch.tensor([[12.0, 12.0]])
    settings = dict(transform="bspline", loss="lncc+grad", init="identity", affine_first=False)
    plain = register(image, image, **settings)
    pulled = register(
        image,
        image,
        fixed_landmarks=points,
        moving_landmarks=points + 2.0,
        landmark_weight=1.0,
        **settings,
    )
    assert float(plain.ddf[0, :, 12, 12].abs().max()) < 0.1
    assert float(pulled.ddf[0, :, 12, 12].min()) > 0.5


@pytest.mark.parametrize(
    ("shape", "transform", "levels"),
    [((32, 32), "svf", 2), ((32, 32), "ddf", 1), ((32, 32), "ddf", 2), ((24, 24, 24), "svf", 2)],
)
def test_refine_improves_a_partial_field(shape, transform, levels):
    moving = textured(shape)
    truth = smooth_field(shape, amplitude=2.0, sigma=4.0)
    fixed = warp(moving, truth)
    start = 0.4 * truth
    refined = refine(
        start, fixed, moving, steps=60, weights={"grad": 0.1}, transform=transform, levels=levels
    )
    assert refined.shape == start.shape
    error_start = float((start - truth).norm(dim=1).mean())
    assert float((refined - truth).norm(dim=1).mean()) < 0.5 * error_start
    assert bool((jacobian_determinant(refined) > 0).all())
    assert refine(start, fixed, moving, steps=0) is not None


@pytest.mark.parametrize("transform", ["svf", "ddf"])
@pytest.mark.parametrize("shape", [(24, 20), (12, 16, 10)])
def test_a_starting_field_passes_through_the_pyramid_unresampled(transform, shape):
    """With no iterations the result is the starting field itself, fine detail included: the
    coarse levels optimise an update and never resample the starting field."""
    start = torch.randn(1, len(shape), *shape, generator=torch.Generator().manual_seed(0))
    image = textured(shape)
    result = register(
        image,
        image,
        transform=transform,
        levels=3,
        iterations=(0, 0, 0),
        init="identity",
        initial_ddf=start,
    )
    torch.testing.assert_close(result.ddf, start, atol=1e-5, rtol=0)


def test_refine_rejects_an_unknown_transform():
    field = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="refine transform must be one of"):
        refine(field, textured((8, 8)), textured((8, 8)), steps=1, transform="bspline")


def test_level_shapes_halve_towards_the_coarsest():
    assert level_shapes((91, 109, 91), 3) == [(23, 28, 23), (46, 55, 46), (91, 109, 91)]
    assert level_shapes((10, 40), 3) == [(8, 11), (8, 21), (10, 40)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(transform="spline"), "transform must be one of"),
        (dict(init="moments"), "init must be"),
        (dict(iterations=(10, 10)), "one value per level"),
        (dict(loss=None), "nothing to optimise"),
        (dict(fixed_landmarks=torch.zeros(3, 2)), "given together"),
        (dict(polish_iterations=-1), "polish_iterations must be >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    image = textured((16, 16))
    with pytest.raises(ValueError, match=message):
        register(image, image, **kwargs)


def test_a_given_matrix_replaces_the_start_and_the_affine_stage():
    """``initial_matrix``: the deformable stage starts from the given alignment (no search, no
    affine stage) and keeps it as the result's matrix; the composed field is the truth."""
    shape = (20, 20, 20)
    truth = affine_matrix(
        **{k: torch.tensor(v) for k, v in CASES[3].items()}, centre=image_centre(shape)
    )
    fixed, moving = misaligned_pair(shape, truth)
    result = register(
        fixed, moving, transform="svf", loss="lncc+grad", initial_matrix=truth, init="search",
        iterations=(10, 10, 5),
    )  # fmt: skip
    assert [record.stage for record in result.history] == ["svf"] * 3
    torch.testing.assert_close(result.matrix, truth)
    assert mean_error(result.ddf, affine_to_ddf(truth, shape)) < 0.25
    with pytest.raises(ValueError, match="initial_matrix needs a deformable transform"):
        register(fixed, moving, transform="affine", loss="lncc", initial_matrix=truth)


def test_a_deferred_loss_returns_after_the_affine_stage():
    """``defer_losses``: when ``loss="auto"`` chooses one of them, the result is the affine
    stage's alignment with the choice, and no deformable stage runs."""
    shape = (20, 20, 20)
    fixed, moving = misaligned_pair(shape, torch.eye(4).unsqueeze(0))
    choices = ("lncc+grad", "mind+grad")
    result = register(
        fixed, moving, transform="svf", loss="auto", affine_loss="mi", defer_losses=choices
    )
    assert result.loss in choices and result.local_ddf is None
    assert result.contrast_correlation is not None
    assert {record.stage for record in result.history} == {"affine"}
    torch.testing.assert_close(result.ddf, affine_to_ddf(result.matrix, shape))


def test_mismatched_images_are_rejected():
    with pytest.raises(ValueError, match="differs from the fixed"):
        register(textured((16, 16)), textured((16, 18)))


def test_first_order_svf_gradient_passes_the_displacement_gradient_to_the_velocity():
    from regnet.optimize.transforms import DenseField
    from regnet.spatial import integrate

    shape = (8, 9, 10)
    base = smooth_field(shape, amplitude=1.5, sigma=2.0)
    exact = DenseField(base, 0.0, True, shape, 5, exact_gradient=True)
    first_order = DenseField(base, 0.0, True, shape, 5, exact_gradient=False)
    assert torch.allclose(exact(), first_order(), atol=1e-6)
    assert torch.allclose(first_order(), integrate(base, 5), atol=1e-6)
    weight = torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(0))
    (first_order() * weight).sum().backward()
    assert torch.allclose(first_order.free.grad, weight)
    (exact() * weight).sum().backward()
    assert not torch.allclose(exact.free.grad, weight, atol=1e-3)  # the exact one differs


@pytest.mark.parametrize("ndim", [2, 3])
def test_overlap_region_is_the_fixed_foreground_near_the_placed_moving_one(ndim):
    from regnet.optimize.overlap import overlap_region

    shape = (24, 26, 22)[:ndim]
    head = torch.zeros(1, 1, *shape)
    head[(..., *[slice(2, n - 2) for n in shape])] = 1.0  # unstripped: a large object
    brain = torch.zeros(1, 1, *shape)
    brain[(..., *[slice(8, 14)] * ndim)] = 1.0  # stripped: voxels 8..13 on every axis
    shift = torch.tensor([2.0, -1.0, 1.0][:ndim])  # fixed voxel x -> moving voxel x + shift
    matrix = torch.eye(ndim + 1)[None]
    matrix[0, :ndim, ndim] = shift
    masks = {"fixed_mask": head, "moving_mask": brain}
    region, moving_fg = overlap_region(head, brain, masks, matrix, 2.0, [1.0] * ndim)
    assert torch.equal(moving_fg, brain)
    # the brain sits at fixed voxels 8 - shift .. 13 - shift; 2 voxels of margin either side
    expected = torch.zeros_like(head)
    box = [slice(int(8 - t) - 2, int(13 - t) + 3) for t in shift]
    expected[(..., *box)] = 1.0
    assert torch.equal(region, expected * head)
    # margin in mm: 4 mm at 2 mm voxels is the same 2 voxels
    region_mm, _ = overlap_region(head, brain, masks, matrix, 4.0, [2.0] * ndim)
    assert torch.equal(region_mm, region)
    # foregrounds of similar volume: no region
    assert overlap_region(head, head, {"fixed_mask": head, "moving_mask": head}, matrix, 2.0,
                           None) is None  # fmt: skip


@pytest.mark.parametrize(
    ("transform", "levels", "spacing", "expected"),
    [
        ("svf", 3, None, (60, 40, 15)),  # voxels: no size to go by
        ("svf", 3, (2.0, 2.0, 2.0), (60, 40, 15)),
        ("svf", 3, (1.5, 1.5, 1.5), (60, 40, 25)),
        ("svf", 3, (2.0, 1.0), (60, 40, 25)),  # 2D, one finer axis
        ("svf", 4, (1.5, 1.5, 1.5), (60, 60, 40, 25)),
        ("svf", 1, (1.0, 1.0), (25,)),
        ("affine", 3, (1.0, 1.0, 1.0), (100, 60, 30)),
    ],
)
def test_default_iterations_give_fine_grids_more_finest_svf_steps(
    transform, levels, spacing, expected
):
    assert _default_iterations(transform, levels, spacing) == expected


@pytest.mark.parametrize(
    ("kind", "levels", "expected"),
    [("affine", 3, (50, 30, 0)), ("rigid", 4, (50, 50, 30, 0)), ("affine", 1, (30,))],
)
def test_affine_prestage_runs_half_the_coarse_defaults_and_skips_the_finest_level(
    kind, levels, expected
):
    from regnet.optimize.engine import prestage_iterations

    assert prestage_iterations(kind, levels) == expected
