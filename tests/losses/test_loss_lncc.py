"""Local NCC: equality with MONAI, flat regions, gradients, masks."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss

from regnet.losses import LNCC, box_sum, local_ncc


def _pair(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.rand(shape, generator=generator, dtype=dtype)
    warped = 0.7 * fixed + 0.3 * torch.rand(shape, generator=generator, dtype=dtype)
    return fixed, warped


@pytest.mark.parametrize("window", [1, 3, 5, 9, 13])  # 9 and 13 reach past the 5-voxel axis
@pytest.mark.parametrize("shape", [(2, 3, 6, 7, 5), (2, 3, 8, 5)])
def test_box_sum_equals_convolution_with_zero_padding(window, shape):
    x = torch.rand(shape, dtype=torch.float64)
    ndim = len(shape) - 2
    kernel = torch.ones(3, 1, *[window] * ndim, dtype=torch.float64)
    conv = F.conv3d if ndim == 3 else F.conv2d
    expected = conv(F.pad(x, [window // 2] * 2 * ndim), kernel, groups=3)
    torch.testing.assert_close(box_sum(x, window), expected)


@pytest.mark.parametrize(("shape", "window"), [((2, 1, 20, 24), 9), ((1, 2, 12, 14, 16), 9)])
def test_value_and_gradient_equal_monai(shape, window):
    fixed, warped = _pair(shape)
    warped_ours = warped.clone().requires_grad_()
    warped_monai = warped.clone().requires_grad_()
    ndim = len(shape) - 2
    monai = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=ndim, kernel_size=window, kernel_type="rectangular"
    )
    ours = local_ncc(fixed, warped_ours, window)
    reference = monai(warped_monai, fixed)
    assert abs(ours.item() - reference.item()) < 1e-4
    assert -1.0 <= ours.item() <= -0.3
    ours.backward()
    reference.backward()
    torch.testing.assert_close(warped_ours.grad, warped_monai.grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_perfect_for_scaled_image(scale):
    # The zero padding scales with the image, so every window is perfectly (anti-)correlated.
    fixed, _ = _pair((1, 1, 16, 16))
    value = LNCC(window=5)({"fixed": fixed, "warped": scale * fixed})
    assert value.item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize(("a", "b"), [(0.7, 0.3), (1.0, 1.0), (250.0, 0.5)])
def test_constant_images_are_finite_and_count_interior_as_uncorrelated(a, b):
    fixed = torch.full((1, 1, 16, 16, 16), a)
    warped = torch.full((1, 1, 16, 16, 16), b, requires_grad=True)
    value = local_ncc(fixed, warped, 9)
    value.backward()
    # Interior windows (8^3 of 16^3 voxels) are flat: r = 0. Border windows see the zero
    # padding as a step in both images at the same place: r = 1.
    assert value.item() == pytest.approx(-(1.0 - 8**3 / 16**3), abs=1e-6)
    assert torch.isfinite(warped.grad).all()


def test_flat_against_textured_is_zero_and_finite():
    fixed = torch.zeros(1, 1, 12, 12)
    warped = torch.rand(1, 1, 12, 12, requires_grad=True)
    value = local_ncc(fixed, warped, 5)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(warped.grad).all()


def test_gradcheck_float64_both_inputs_2d_and_3d():
    fixed, warped = _pair((1, 2, 6, 7), torch.float64)
    inputs = (fixed.requires_grad_(), warped.requires_grad_())
    assert torch.autograd.gradcheck(lambda f, w: local_ncc(f, w, 3), inputs)
    fixed, warped = _pair((2, 1, 5, 4, 6), torch.float64, seed=1)
    inputs = (fixed.requires_grad_(), warped.requires_grad_())
    assert torch.autograd.gradcheck(lambda f, w: local_ncc(f, w, 3), inputs)


def test_gradcheck_with_mask():
    fixed, warped = _pair((2, 1, 6, 7), torch.float64)
    mask = (torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.4).double()
    assert torch.autograd.gradcheck(
        lambda w: local_ncc(fixed, w, 3, mask=mask), (warped.requires_grad_(),)
    )


def test_mask_restricts_the_mean():
    fixed, warped = _pair((1, 1, 12, 12), torch.float64)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    mask[..., :6] = 1.0
    monai = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=3, reduction="none")
    per_voxel = monai(warped, fixed)
    expected = per_voxel[..., :6].mean()
    masked = LNCC(window=3)({"fixed": fixed, "warped": warped, "fixed_mask": mask})
    assert masked.item() == pytest.approx(expected.item(), abs=1e-10)


@pytest.mark.parametrize("window", [0, 4])
def test_bad_window_raises(window):
    with pytest.raises(ValueError, match="window"):
        LNCC(window=window)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        local_ncc(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9))


def test_lncc_term_keeps_the_fixed_windows_only_while_the_fixed_image_is_unchanged():
    """Repeated calls with one fixed tensor reuse its window statistics; another tensor, or the
    same one changed in place, gets them again: every value equals a fresh computation."""
    fixed, warped = _pair((1, 1, 10, 12, 9))
    term = LNCC(window=5)

    def fresh(image):
        return local_ncc(image, warped, window=5)

    first = term({"fixed": fixed, "warped": warped})
    kept = term._fixed_windows[2]
    assert torch.equal(term({"fixed": fixed, "warped": warped}), first)
    assert term._fixed_windows[2] is kept  # reused
    assert torch.equal(first, fresh(fixed))
    fixed.mul_(0.5).add_(torch.rand_like(fixed) * 0.5)  # in place: the version changes
    changed = term({"fixed": fixed, "warped": warped})
    assert term._fixed_windows[2] is not kept
    assert torch.equal(changed, fresh(fixed)) and not torch.equal(changed, first)
    other = fixed.clone() ** 2
    assert torch.equal(term({"fixed": other, "warped": warped}), fresh(other))


def test_lncc_term_under_inference_mode_computes_the_fixed_windows_each_time():
    fixed, warped = _pair((1, 1, 10, 12, 9))
    term = LNCC(window=5)
    with torch.inference_mode():
        value = term({"fixed": fixed.clone(), "warped": warped})
    assert term._fixed_windows is None
    assert torch.equal(value, local_ncc(fixed, warped, window=5))
