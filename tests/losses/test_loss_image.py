"""Image similarity terms: MSE, global NCC, MI, NMI, NGF."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from regnet.losses import MSE, NCC, NGF, MutualInformation, NormalizedMutualInformation


def _smooth(shape, seed=0):
    """Smooth random image in [0, 1], ``shape = (B, C, *S)``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(*shape[:2], *[max(2, n // 4) for n in shape[2:]], generator=generator)
    mode = "bilinear" if len(shape) == 4 else "trilinear"
    return F.interpolate(coarse, size=shape[2:], mode=mode, align_corners=True)


def _shuffled(image, seed=1):
    order = torch.randperm(image.numel(), generator=torch.Generator().manual_seed(seed))
    return image.flatten()[order].view_as(image)


def test_mse_value_and_mask():
    fixed = torch.zeros(1, 1, 4, 4)
    warped = torch.zeros(1, 1, 4, 4)
    warped[..., :2, :] = 2.0
    assert MSE()({"fixed": fixed, "warped": warped}).item() == pytest.approx(2.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1.0
    assert MSE()({"fixed": fixed, "warped": warped, "fixed_mask": mask}).item() == 0.0


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 2, 8, 10, 12)])
@pytest.mark.parametrize(("scale", "expected"), [(3.0, -1.0), (-0.5, 1.0)])
def test_ncc_affine_intensity_change(shape, scale, expected):
    fixed = _smooth(shape)
    value = NCC()({"fixed": fixed, "warped": scale * fixed + 7.0})
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_ncc_independent_images_near_zero_and_flat_image_finite():
    fixed = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    warped = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    assert abs(NCC()({"fixed": fixed, "warped": warped}).item()) < 0.05
    flat = torch.full((1, 1, 8, 8), 0.3, requires_grad=True)
    value = NCC()({"fixed": fixed[..., :8, :8], "warped": flat})
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(flat.grad).all()


def test_ncc_mask_ignores_outside():
    fixed = _smooth((1, 1, 16, 16))
    warped = fixed.clone()
    warped[..., 8:, :] = torch.rand(1, 1, 8, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0
    masked = NCC()({"fixed": fixed, "warped": warped, "fixed_mask": mask})
    assert masked.item() == pytest.approx(-1.0, abs=1e-5)
    assert NCC()({"fixed": fixed, "warped": warped}).item() > -0.9


def test_mi_equals_monai_global_mutual_information():
    fixed = _smooth((2, 1, 24, 24))
    warped = _smooth((2, 1, 24, 24), seed=3) * 0.5 + fixed * 0.5
    ours = MutualInformation(num_bins=23, sigma_ratio=0.5)({"fixed": fixed, "warped": warped})
    reference = GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)(warped, fixed)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-3)


def test_mi_invariant_to_monotone_remap_of_bin_centred_levels():
    # Intensity levels on bin centres at least 4 bins apart (Parzen overlap exp(-32)): a
    # non-linear monotone remap to other such centres permutes histogram rows, so MI is
    # unchanged and equals the entropy of the level distribution.
    bins = 32
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 4, (1, 1, 20, 20), generator=generator)
    fixed = torch.tensor([2.0, 7.0, 12.0, 17.0])[index] / (bins - 1)
    remapped = torch.tensor([3.0, 9.0, 20.0, 28.0])[index] / (bins - 1)
    loss = MutualInformation(num_bins=bins)
    aligned = loss({"fixed": fixed, "warped": fixed})
    assert loss({"fixed": fixed, "warped": remapped}).item() == pytest.approx(
        aligned.item(), abs=1e-5
    )
    p = torch.bincount(index.flatten(), minlength=4).double() / index.numel()
    assert -aligned.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 1, 12, 12, 12)])
def test_mi_nearly_invariant_to_gamma_and_higher_when_aligned(shape):
    fixed = _smooth(shape)
    loss = MutualInformation()
    aligned = loss({"fixed": fixed, "warped": fixed})
    gamma = loss({"fixed": fixed, "warped": fixed**2})
    shuffled = loss({"fixed": fixed, "warped": _shuffled(fixed)})
    assert gamma.item() == pytest.approx(aligned.item(), rel=0.1)
    # Loss is -MI: aligned images have far more MI than shuffled ones.
    assert aligned.item() < 4.0 * shuffled.item() < 0.0


def test_mi_unnormalised_intensities_with_value_range_none_and_gradient_finite():
    fixed = _smooth((1, 1, 24, 24))
    warped = (1000.0 * fixed - 500.0).requires_grad_()
    # Per-image min..max binning makes MI invariant to a positive affine intensity change.
    auto = MutualInformation(value_range=None)
    same = auto({"fixed": fixed, "warped": fixed})
    assert auto({"fixed": fixed, "warped": warped}).item() == pytest.approx(same.item(), abs=1e-4)
    clamped = MutualInformation()({"fixed": fixed, "warped": warped})
    clamped.backward()
    assert torch.isfinite(clamped) and torch.isfinite(warped.grad).all()


def test_nmi_range_and_ordering():
    fixed = _smooth((2, 1, 32, 32))
    loss = NormalizedMutualInformation()
    aligned = -loss({"fixed": fixed, "warped": fixed}).item()
    shuffled = -loss({"fixed": fixed, "warped": _shuffled(fixed)}).item()
    assert 1.0 <= shuffled < aligned <= 2.0
    assert aligned > 1.4
    assert shuffled < 1.05


def test_mi_gradient_flows():
    fixed = _smooth((1, 1, 16, 16))
    warped = _smooth((1, 1, 16, 16), seed=5).requires_grad_()
    MutualInformation()({"fixed": fixed, "warped": warped}).backward()
    assert torch.isfinite(warped.grad).all() and warped.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (2, 1, 8, 9, 10)])
def test_ngf_zero_for_identical_and_contrast_inverted_images(shape):
    fixed = _smooth(shape)
    assert NGF()({"fixed": fixed, "warped": fixed}).item() == pytest.approx(0.0, abs=1e-6)
    # Inverted contrast: the eps^2 term in the inner product costs O(eps^2 / |g|^2) per voxel.
    assert NGF(eps=1e-4)({"fixed": fixed, "warped": 1.0 - 3.0 * fixed}).item() < 1e-3
    assert NGF(eps=1e-2)({"fixed": fixed, "warped": 1.0 - 3.0 * fixed}).item() > 1e-2


def test_ngf_orthogonal_edges_cost_one():
    i = torch.arange(16.0).view(1, 1, 16, 1).expand(1, 1, 16, 16)
    fixed, warped = i / 15.0, i.transpose(2, 3) / 15.0
    value = NGF(eps=1e-4)({"fixed": fixed, "warped": warped})
    assert value.item() == pytest.approx(1.0, abs=1e-4)


def test_shape_mismatch_and_bad_mask_raise():
    with pytest.raises(ValueError, match="same shape"):
        MSE()({"fixed": torch.rand(1, 1, 8, 8), "warped": torch.rand(1, 1, 8, 7)})
    with pytest.raises(ValueError, match="fixed_mask"):
        MSE()(
            {
                "fixed": torch.rand(1, 1, 8, 8),
                "warped": torch.rand(1, 1, 8, 8),
                "fixed_mask": torch.ones(1, 2, 8, 8),
            }
        )
