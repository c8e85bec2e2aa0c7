"""MIND-SSC descriptors and the ``mind`` loss against a plain reference written here.

The reference follows the definition in :mod:`regnet.losses.mind` literally: replicate-padded
image, one slice per patch offset and neighbour, ``amin``/``mean``/``clamp`` over a stacked edge
axis, autograd for its gradients. It shares no code with the module except ``_ssc_edges``, used
only to put the reference's edges in the module's channel order (and checked to list exactly the
neighbour pairs on different axes, once each).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from regnet.losses import MIND, MSE, build_loss, mind_ssc
from regnet.losses.mind import _ssc_edges
from regnet.spatial.smooth import gaussian_smooth

EDGES = {2: 4, 3: 12}


def _units(ndim):
    """The ``2 ndim`` neighbours ``±e_k``."""
    return [
        tuple(sign if k == axis else 0 for k in range(ndim))
        for axis in range(ndim)
        for sign in (1, -1)
    ]


def _reference_pairs(ndim):
    """Unordered neighbour pairs ``{p, q}`` with ``|p - q|^2 = 2`` (on different axes)."""
    return [
        frozenset((p, q))
        for p, q in itertools.combinations(_units(ndim), 2)
        if sum((a - b) ** 2 for a, b in zip(p, q, strict=True)) == 2
    ]


def _module_order(ndim):
    """The module's edges as unordered pairs ``{q + v, q}``, in its channel order."""
    directions, edges = _ssc_edges(ndim)
    return [
        frozenset((tuple(a + b for a, b in zip(q, directions[j], strict=True)), q))
        for j, q in edges
    ]


def _shift(padded, pad, shape, offset):
    """``I(x + offset)`` for every ``x`` of the ``shape`` grid, from an image padded by ``pad``."""
    index = [slice(None), slice(None)]
    index += [slice(pad + o, pad + o + n) for o, n in zip(offset, shape, strict=True)]
    return padded[tuple(index)]


def _reference_parts(image, radius, dilation):
    """``d (N, E, *S)``, unclamped ``V (N, 1, *S)`` and its image mean ``m`` (floored)."""
    batch, channels, *shape = image.shape
    ndim = len(shape)
    pad = radius + dilation
    x = image.reshape(batch * channels, 1, *shape)
    padded = F.pad(x, [pad] * (2 * ndim), mode="replicate")
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=ndim))
    distances = []
    for pair in _module_order(ndim):
        p, q = sorted(pair)
        total = torch.zeros_like(x)
        for o in offsets:
            a = _shift(
                padded, pad, shape, [oi + dilation * pi for oi, pi in zip(o, p, strict=True)]
            )
            b = _shift(
                padded, pad, shape, [oi + dilation * qi for oi, qi in zip(o, q, strict=True)]
            )
            total = total + (a - b) ** 2
        distances.append(total)
    distance = torch.cat(distances, dim=1)
    d = distance - distance.amin(dim=1, keepdim=True)
    variance = d.mean(dim=1, keepdim=True)
    spatial = tuple(range(2, variance.dim()))
    level = variance.detach().mean(dim=spatial, keepdim=True).clamp_min(1e-12)
    return d, variance, level


def reference_mind(image, radius=1, dilation=2):
    """MIND-SSC ``(B, C * E, *S)`` of ``image (B, C, *S)`` straight from the definition."""
    d, variance, level = _reference_parts(image, radius, dilation)
    variance = torch.minimum(torch.maximum(variance, 1e-3 * level), 1e3 * level)
    return torch.exp(-d / variance).reshape(image.shape[0], -1, *image.shape[2:])


def reference_loss(fixed, warped, mask=None, radius=1, dilation=2):
    squares = reference_mind(fixed, radius, dilation) - reference_mind(warped, radius, dilation)
    squares = squares**2
    if mask is None:
        return squares.mean()
    weights = mask.expand(squares.shape[0], 1, *squares.shape[2:])
    return (squares * weights).sum() / (weights.sum() * squares.shape[1])


def _random(shape, seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _two_level(shape, seed=0):
    """Random image whose second half along the first axis has 1e-4 of the amplitude, so the
    lower variance clamp is active there (without exact ties between edges)."""
    image = _random(shape, seed)
    image[:, :, shape[2] // 2 :] *= 1e-4
    return image


def _smooth(shape, seed=0, coarse=6):
    """Smooth random 3D image in [0, 1]: coarse noise upsampled trilinearly."""
    noise = _random((1, 1, coarse, coarse, coarse), seed)
    image = F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)
    return (image - image.min()) / (image.max() - image.min())


@pytest.mark.parametrize("ndim", [2, 3])
def test_ssc_edges_are_the_neighbour_pairs_on_different_axes(ndim):
    order = _module_order(ndim)
    assert len(order) == EDGES[ndim] == len(set(order))
    assert set(order) == set(_reference_pairs(ndim))
    directions, _ = _ssc_edges(ndim)
    assert len(directions) == ndim * (ndim - 1)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("radius", [0, 1])
@pytest.mark.parametrize("dilation", [1, 2])
def test_descriptors_equal_reference(ndim, radius, dilation):
    shape = (2, 2, *((9, 10) if ndim == 2 else (7, 8, 6)))
    image = _random(shape, seed=ndim + 10 * radius + 100 * dilation)
    ours = mind_ssc(image, radius, dilation)
    expected = reference_mind(image, radius, dilation)
    assert ours.shape == (2, 2 * EDGES[ndim], *shape[2:])
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=1e-8)
    # Independent of the channel order: the sorted descriptors of each voxel agree too.
    torch.testing.assert_close(
        ours.reshape(2, 2, EDGES[ndim], -1).sort(dim=2).values,
        expected.reshape(2, 2, EDGES[ndim], -1).sort(dim=2).values,
        atol=1e-10,
        rtol=1e-8,
    )
    # Channel c holds its own edges: descriptors of channel 1 alone are the second block.
    torch.testing.assert_close(
        mind_ssc(image[:, 1:], radius, dilation), ours[:, EDGES[ndim] :], atol=1e-12, rtol=0
    )
    assert ours.min() > 0 and ours.max() <= 1
    torch.testing.assert_close(
        ours.reshape(2, 2, EDGES[ndim], -1).amax(dim=2),
        torch.ones(2, 2, ours[0, 0].numel(), dtype=torch.float64),
    )


def test_descriptors_equal_reference_with_clamp_and_float32():
    image = _two_level((2, 1, 10, 9, 8))
    expected = reference_mind(image)
    torch.testing.assert_close(mind_ssc(image), expected, atol=1e-10, rtol=1e-8)
    # float32 input gives float32 descriptors close to the float64 reference
    ours32 = mind_ssc(image.float())
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), expected, atol=2e-5, rtol=0)


def test_clamp_is_exercised_by_two_level_image():
    """Guard for the tests that rely on ``_two_level``: the lower clamp is active on part of
    the image and inactive on the rest, with no exact ties among the smallest distances."""
    for radius, dilation in ((1, 2), (1, 1)):
        d, variance, level = _reference_parts(_two_level((1, 1, 10, 9, 8)), radius, dilation)
        low = variance < 1e-3 * level
        assert 0.1 < low.double().mean() < 0.9
        assert ((d == 0).sum(dim=1) == 1).all()


def test_constant_image_gives_ones_and_zero_gradient():
    image = torch.full((1, 2, 6, 7, 5), 3.0, dtype=torch.float64, requires_grad=True)
    descriptors = mind_ssc(image)
    assert torch.equal(descriptors, torch.ones_like(descriptors))
    descriptors.mul(_random(descriptors.shape)).sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().max() == 0


def test_gradcheck_descriptors_2d():
    image = _random((1, 1, 7, 8)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, 1, 2), (image,))
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, 0, 1), (image,))


def test_gradcheck_descriptors_3d():
    image = _random((1, 1, 6, 6, 7), seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, 1, 2), (image,), fast_mode=True)
    two_level = _two_level((1, 1, 6, 6, 7), seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mind_ssc(x, 1, 1), (two_level,), fast_mode=True)


def test_descriptor_gradient_equals_reference_autograd():
    image = _two_level((2, 2, 7, 6, 8), seed=3)
    weights = _random((2, 2 * 12, 7, 6, 8), seed=4)
    grads = []
    for function in (mind_ssc, reference_mind):
        x = image.clone().requires_grad_()
        (function(x, 1, 2) * weights).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("shape", [(1, 2, 9, 9), (1, 1, 7, 6, 8)])
def test_gradient_with_tied_minimal_edges_equals_reference_autograd(shape):
    """Small-integer images make exact ties among the smallest distances common (all sums are
    exact): the minimal edges then share the gradient of the minimum, as ``amin``'s does."""
    image = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(19)).double()
    d, _, _ = _reference_parts(image, 1, 1)
    assert ((d == 0).sum(dim=1) > 1).any()  # there are ties
    weights = _random((shape[0], shape[1] * EDGES[len(shape) - 2], *shape[2:]), seed=20)
    grads = []
    for function in (mind_ssc, reference_mind):
        x = image.clone().requires_grad_()
        (function(x, 1, 1) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_loss(masked):
    fixed = _random((2, 1, 7, 8), seed=5)
    warped = _random((2, 1, 7, 8), seed=6).requires_grad_()
    inputs = {"fixed": fixed}
    if masked:
        inputs["fixed_mask"] = (_random((1, 1, 7, 8), seed=7) > 0.4).double()
    term = MIND()
    assert torch.autograd.gradcheck(lambda w: term({**inputs, "warped": w}), (warped,))
    # w.r.t. both images (fixed descriptors then come from mind_ssc's autograd path)
    fixed = fixed.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, w: term({**inputs, "fixed": f, "warped": w}), (fixed, warped)
    )


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("mask_batch", [None, 1, 2])
def test_loss_value_and_gradient_equal_reference(ndim, mask_batch):
    shape = (2, 2, *((12, 11) if ndim == 2 else (7, 8, 6)))
    fixed = _two_level(shape, seed=8)
    warped = _random(shape, seed=9)
    mask = None
    if mask_batch is not None:
        mask = (_random((mask_batch, 1, *shape[2:]), seed=10) > 0.5).double()
    results = []
    for compute in ("ours", "reference"):
        f = fixed.clone().requires_grad_()
        w = warped.clone().requires_grad_()
        if compute == "ours":
            inputs = {"fixed": f, "warped": w}
            if mask is not None:
                inputs["fixed_mask"] = mask
            value = MIND(radius=1, dilation=1)(inputs)
        else:
            value = reference_loss(f, w, mask, radius=1, dilation=1)
        value.backward()
        results.append((value.detach(), f.grad, w.grad))
    (value, grad_f, grad_w), (expected, expected_f, expected_w) = results
    assert 0.01 < value.item() < 1
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad_w, expected_w, atol=1e-11, rtol=1e-7)
    torch.testing.assert_close(grad_f, expected_f, atol=1e-11, rtol=1e-7)
    assert grad_w.abs().sum() > 0 and grad_f.abs().sum() > 0


@pytest.mark.parametrize("a", [3.7, -0.6])
def test_affine_intensity_invariance(a):
    image = _random((1, 2, 9, 8, 7), seed=11)
    transformed = a * image - 2.0
    torch.testing.assert_close(mind_ssc(transformed), mind_ssc(image), atol=1e-12, rtol=1e-9)
    term = MIND()
    assert term({"fixed": image, "warped": transformed}).item() < 1e-20
    assert term({"fixed": image, "warped": image.clone()}).item() == 0.0
    different = term({"fixed": image, "warped": _random(image.shape, seed=12)}).item()
    assert 0.05 < different <= 1.0


def test_loss_in_unit_interval_for_extreme_pair():
    """Descriptors in (0, 1] bound the loss by 1; a constant vs a noisy image gets close."""
    noisy = _random((1, 1, 16, 16), seed=13)
    constant = torch.zeros_like(noisy)
    value = MIND(radius=0, dilation=1)({"fixed": constant, "warped": noisy}).item()
    assert 0.1 < value <= 1.0


def test_multimodal_alignment_minimum_at_zero_shift():
    image = _smooth((24, 24, 24), seed=14)
    remapped = (image - 0.5) ** 2  # non-monotonic contrast change
    term = MIND()
    losses = {}
    for axis in (2, 3, 4):
        for shift in range(-2, 3):
            fixed = image.narrow(axis, 2, 20)
            warped = remapped.narrow(axis, 2 + shift, 20)
            losses[axis, shift] = term({"fixed": fixed, "warped": warped}).item()
        at = {shift: losses[axis, shift] for shift in range(-2, 3)}
        assert min(at, key=at.get) == 0, at
        assert at[2] > 1.5 * at[0] and at[-2] > 1.5 * at[0], at
    assert losses[2, 0] < 0.1
    # the test has teeth: intensity-based MSE does not prefer zero shift on this pair
    mse = [
        MSE()({"fixed": image.narrow(2, 2, 20), "warped": remapped.narrow(2, 2 + shift, 20)})
        for shift in range(-2, 3)
    ]
    assert min(range(5), key=lambda i: mse[i]) != 2


def test_fixed_descriptor_cache_follows_in_place_changes():
    fixed = _random((1, 1, 8, 9, 7), seed=15)
    warped = _random((1, 1, 8, 9, 7), seed=16)
    term = MIND()
    first = term({"fixed": fixed, "warped": warped})
    cached = term._cache[2]
    second = term({"fixed": fixed, "warped": warped})
    assert term._cache[2] is cached  # reused, not recomputed
    assert torch.equal(first, second)
    fixed.add_(0.5 * _random(fixed.shape, seed=17))
    third = term({"fixed": fixed, "warped": warped})
    fresh = MIND()({"fixed": fixed, "warped": warped})
    assert third.item() != first.item()
    torch.testing.assert_close(third, fresh, atol=0, rtol=0)
    torch.testing.assert_close(third, reference_loss(fixed, warped), atol=1e-12, rtol=1e-10)
    # an in-place change through a view counts too
    fixed[..., 0, :, :] += 1.0
    torch.testing.assert_close(
        term({"fixed": fixed, "warped": warped}), MIND()({"fixed": fixed, "warped": warped})
    )
    # a different tensor with the first one's values replaces the cache
    other = _random((1, 1, 8, 9, 7), seed=15)
    torch.testing.assert_close(term({"fixed": other, "warped": warped}), first, atol=0, rtol=0)


def test_build_loss_mind_plus_grad():
    generator = torch.Generator().manual_seed(18)
    inputs = {
        "fixed": torch.rand(1, 1, 8, 8, 8, generator=generator),
        "warped": torch.rand(1, 1, 8, 8, 8, generator=generator).requires_grad_(),
        "ddf": torch.randn(1, 3, 8, 8, 8, generator=generator).requires_grad_(),
    }
    loss = build_loss("mind+grad")
    assert list(loss.terms) == ["mind", "grad"]
    assert isinstance(loss.terms["mind"], MIND)
    assert loss.requires == ("fixed", "warped", "ddf")
    total, values = loss(inputs)
    assert values["mind"].item() == pytest.approx(MIND()(inputs).item(), rel=1e-6)
    assert total.item() == pytest.approx(values["mind"].item() + values["grad"].item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(inputs["warped"].grad).all() and inputs["warped"].grad.abs().sum() > 0
    assert torch.isfinite(inputs["ddf"].grad).all()
    custom = build_loss("mind", options={"mind": {"radius": 0, "dilation": 1}})
    assert (custom.terms["mind"].radius, custom.terms["mind"].dilation) == (0, 1)
    with pytest.raises(ValueError, match="radius >= 0"):
        build_loss("mind", options={"mind": {"radius": -1}})


@pytest.mark.parametrize(
    ("kwargs", "shape", "message"),
    [
        ({"radius": -1}, (1, 1, 8, 8), "radius >= 0 and dilation >= 1, got -1, 2"),
        ({"dilation": 0}, (1, 1, 8, 8), "radius >= 0 and dilation >= 1, got 1, 0"),
        ({"dilation": 2}, (1, 1, 8, 4), r"dilation 2 needs every spatial size >= 5"),
        ({"dilation": 3}, (1, 1, 7, 7, 6), r"dilation 3 needs every spatial size >= 7"),
        ({}, (8, 8), r"expects \(B, C, \*S\) 2D or 3D"),
    ],
)
def test_bad_arguments(kwargs, shape, message):
    with pytest.raises(ValueError, match=message):
        mind_ssc(torch.rand(shape), **kwargs)


def test_bad_term_arguments():
    with pytest.raises(ValueError, match="mind needs radius >= 0"):
        MIND(radius=-1)
    with pytest.raises(ValueError, match="mind needs radius >= 0 and dilation >= 1, got 1, 0"):
        MIND(dilation=0)
    small = torch.rand(1, 1, 4, 9)
    with pytest.raises(ValueError, match="needs every spatial size >= 5"):
        MIND()({"fixed": small, "warped": small})
    with pytest.raises(ValueError, match="same shape"):
        MIND()({"fixed": torch.rand(1, 1, 8, 8), "warped": torch.rand(1, 1, 8, 9)})


@pytest.mark.parametrize("shape", [(2, 1, 9, 8), (1, 2, 7, 8, 6)])
def test_sigma_takes_the_descriptors_of_the_smoothed_image(shape):
    image = _random(shape, seed=11)
    smoothed = gaussian_smooth(image, 0.6)
    torch.testing.assert_close(mind_ssc(image, sigma=0.6), mind_ssc(smoothed))
    assert not torch.allclose(mind_ssc(image, sigma=0.6), mind_ssc(image))
    torch.testing.assert_close(mind_ssc(image, sigma=0.0), mind_ssc(image))


def test_gradcheck_loss_with_sigma():
    fixed = _random((1, 1, 8, 9), seed=12)
    warped = _random((1, 1, 8, 9), seed=13).requires_grad_()
    term = MIND(sigma=0.5)
    assert torch.autograd.gradcheck(lambda w: term({"fixed": fixed, "warped": w}), (warped,))
    plain = MIND()({"fixed": gaussian_smooth(fixed, 0.5), "warped": gaussian_smooth(warped, 0.5)})
    torch.testing.assert_close(term({"fixed": fixed, "warped": warped}), plain)
    with pytest.raises(ValueError, match="mind needs sigma >= 0, got -0.1"):
        MIND(sigma=-0.1)
