"""Image similarity terms: MSE, global NCC, MI, NMI, NGF."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss

from regnet.losses import (
    MSE,
    NCC,
    NGF,
    MutualInformation,
    NormalizedMutualInformation,
    joint_histogram,
)


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


def _entropy(counts):
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return -(p * p.log()).sum().item()


def _levels(levels, index):
    return torch.tensor(levels, dtype=torch.float32)[index]


def test_joint_histogram_marginals():
    fixed = _smooth((2, 1, 20, 24))
    warped = _smooth((2, 1, 20, 24), seed=4)
    bins = 16
    joint = joint_histogram(fixed, warped, num_bins=bins)
    assert joint.shape == (2, bins, bins)
    torch.testing.assert_close(joint.sum((1, 2)), torch.ones(2))
    # Fixed: zero-order kernel, i.e. a plain histogram of num_bins equal-width bins.
    fixed_bins = (fixed * bins).long().clamp(0, bins - 1).flatten(1)
    counts = torch.stack([torch.bincount(b, minlength=bins) for b in fixed_bins]).float()
    torch.testing.assert_close(joint.sum(2), counts / fixed_bins.shape[1])
    # Warped: the cubic B-spline reproduces linear functions, so the mean bin index is the mean
    # position, with bin centres 1 .. bins - 2 spanning [0, 1].
    mean_bin = (joint.sum(1) * torch.arange(float(bins))).sum(1)
    torch.testing.assert_close(mean_bin, 1.0 + (bins - 3) * warped.flatten(1).mean(1))


@pytest.mark.parametrize("loss_class", [MutualInformation, NormalizedMutualInformation])
def test_mi_gradcheck_float64(loss_class):
    # Intensities in [0.1, 0.9]: no clamping, and the cubic B-spline kernel is C2.
    generator = torch.Generator().manual_seed(0)
    fixed = 0.1 + 0.8 * torch.rand(1, 1, 4, 5, 3, generator=generator, dtype=torch.float64)
    warped = 0.1 + 0.8 * torch.rand(1, 1, 4, 5, 3, generator=generator, dtype=torch.float64)
    mask = (torch.rand(1, 1, 4, 5, 3, generator=generator) > 0.3).double()
    loss = loss_class(num_bins=8)
    for extra in ({}, {"fixed_mask": mask}):
        assert torch.autograd.gradcheck(
            lambda w, extra=extra: loss({"fixed": fixed, "warped": w, **extra}),
            (warped.requires_grad_(),),
        )


def test_mi_invariant_to_monotone_remap_and_self_mi_is_entropy():
    # Four levels at least 4 bins apart: the warped image's B-spline supports (4 bins) do not
    # overlap and the fixed levels fall in different bins, so a strictly monotone remap only
    # permutes histogram cells and the kernel's own entropy cancels: MI = entropy of the levels.
    bins = 32
    index = torch.randint(0, 4, (1, 1, 20, 20), generator=torch.Generator().manual_seed(0))
    centres = _levels([2.0, 7.0, 12.0, 17.0], index)  # warped bin centres
    fixed = (centres - 1.0) / (bins - 3)
    remapped = (_levels([1.0, 6.0, 20.0, 30.0], index) - 1.0) / (bins - 3)
    loss = MutualInformation(num_bins=bins)
    expected = _entropy(torch.bincount(index.flatten()))
    for f, w in ((fixed, fixed), (fixed, remapped), (remapped, fixed)):
        assert -loss({"fixed": f, "warped": w}).item() == pytest.approx(expected, abs=1e-5)


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


def _shifted_pairs(shape, shifts, margin=4):
    """A smooth image cropped by ``margin`` and copies shifted by ``s`` voxels along axis 2."""
    image = _smooth((1, 1, *[n + 2 * margin for n in shape]), seed=2)
    crop = tuple(slice(margin, margin + n) for n in shape)
    fixed = image[(..., *crop)]
    moved = []
    for s in shifts:
        shifted = (slice(margin + s, margin + s + shape[0]), *crop[1:])
        moved.append(image[(..., *shifted)])
    return fixed, moved


@pytest.mark.parametrize("shape", [(48, 48), (20, 20, 20)])
def test_mi_maximal_at_alignment_and_ordered_like_monai(shape):
    # MONAI's GlobalMutualInformationLoss (Gaussian kernel, sigma half a bin, over all bins)
    # gives other values, but both must put the shifts in the same order, best at zero shift.
    # With the same bin spacing (ours: 25 bins, centres 1 .. 23 span [0, 1]; MONAI: 23 centres)
    # the MI values differ by at most 10 % + 0.03 nats (measured: <= 0.12 nats at MI ~1.7,
    # <= 0.02 nats at MI ~0.1, ours higher: the fixed image's box kernel smooths less).
    shifts = [0, 1, 2, 3, 4]
    fixed, moved = _shifted_pairs(shape, shifts)
    ours = [MutualInformation(num_bins=25)({"fixed": fixed, "warped": w}).item() for w in moved]
    monai = GlobalMutualInformationLoss(num_bins=23, sigma_ratio=0.5)
    theirs = [monai(w, fixed).item() for w in moved]
    assert ours == sorted(ours) and len(set(ours)) == len(ours)
    assert theirs == sorted(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a - b) <= 0.1 * abs(b) + 0.03


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


def test_mi_gradient_flows_to_warped_only():
    fixed = _smooth((1, 1, 16, 16)).requires_grad_()
    warped = _smooth((1, 1, 16, 16), seed=5).requires_grad_()
    MutualInformation()({"fixed": fixed, "warped": warped}).backward()
    assert torch.isfinite(warped.grad).all() and warped.grad.abs().sum() > 0
    # The fixed image's zero-order kernel is piecewise constant: zero gradient, no error.
    assert fixed.grad is not None and fixed.grad.abs().sum() == 0


@pytest.mark.parametrize("loss_class", [MutualInformation, NormalizedMutualInformation])
def test_mi_mask_equals_cropped_region(loss_class):
    fixed = _smooth((2, 1, 24, 20))
    warped = (0.7 * fixed + 0.3 * _smooth((2, 1, 24, 20), seed=6)).requires_grad_()
    mask = torch.zeros(1, 1, 24, 20)
    mask[..., 4:15, 3:17] = 1.0
    loss = loss_class(num_bins=16)
    masked = loss({"fixed": fixed, "warped": warped, "fixed_mask": mask})
    cropped = loss({"fixed": fixed[..., 4:15, 3:17], "warped": warped[..., 4:15, 3:17]})
    assert masked.item() == pytest.approx(cropped.item(), abs=1e-6)
    masked.backward()
    assert (warped.grad * (1 - mask)).abs().sum() == 0


@pytest.mark.parametrize("samples", [None, 100])
def test_mi_empty_mask_gives_zero_and_finite_gradient(samples):
    warped = torch.rand(1, 1, 8, 8, 8).requires_grad_()
    inputs = {"fixed": torch.rand(1, 1, 8, 8, 8), "warped": warped}
    for loss_class in (MutualInformation, NormalizedMutualInformation):
        value = loss_class(samples=samples)({**inputs, "fixed_mask": torch.zeros(1, 1, 8, 8, 8)})
        value.backward()
        assert value.item() == 0.0 and torch.isfinite(warped.grad).all()


def test_mi_sampling_reproducible_and_close_to_all_voxels():
    fixed = _smooth((1, 1, 48, 48, 48))
    warped = 0.6 * fixed + 0.4 * _smooth((1, 1, 48, 48, 48), seed=7)
    inputs = {"fixed": fixed, "warped": warped}
    full = MutualInformation(num_bins=16)(inputs).item()
    sampled = MutualInformation(num_bins=16, samples=20000)
    torch.manual_seed(0)
    first = sampled(inputs).item()
    torch.manual_seed(0)
    assert sampled(inputs).item() == first
    torch.manual_seed(1)
    other = sampled(inputs).item()
    assert other != first
    # Plug-in entropy estimates from 20000 samples: within a few percent of all 110592 voxels.
    assert first == pytest.approx(full, rel=0.05) and other == pytest.approx(full, rel=0.05)
    everything = MutualInformation(num_bins=16, samples=fixed[0, 0].numel())
    assert everything(inputs).item() == full


def test_mi_sampling_stays_inside_mask():
    fixed = _smooth((1, 1, 40, 40, 40))
    warped = (0.6 * fixed + 0.4 * _smooth((1, 1, 40, 40, 40), seed=8)).requires_grad_()
    mask = torch.zeros(1, 1, 40, 40, 40)
    mask[..., 5:30, 10:35, :] = 1.0
    inputs = {"fixed": fixed, "warped": warped, "fixed_mask": mask}
    full = MutualInformation(num_bins=16)(inputs).item()
    torch.manual_seed(0)
    sampled = MutualInformation(num_bins=16, samples=10000)(inputs)
    sampled.backward()
    assert sampled.item() == pytest.approx(full, rel=0.05)
    assert (warped.grad * (1 - mask)).abs().sum() == 0
    assert (warped.grad != 0).sum() > 5000
    # A mask smaller than ``samples`` uses each of its voxels once: the exact masked value.
    small = torch.zeros_like(mask)
    small[..., 10:20, 10:20, 10:20] = 1.0
    exact = MutualInformation(num_bins=16)({**inputs, "fixed_mask": small})
    few = MutualInformation(num_bins=16, samples=5000)({**inputs, "fixed_mask": small})
    assert few.item() == pytest.approx(exact.item(), abs=1e-6)


def test_mi_bad_options_raise():
    with pytest.raises(ValueError, match="num_bins"):
        MutualInformation(num_bins=3)
    with pytest.raises(ValueError, match="samples"):
        NormalizedMutualInformation(samples=0)
    with pytest.raises(ValueError, match="value_range"):
        MutualInformation(value_range=(1.0, 0.0))


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
