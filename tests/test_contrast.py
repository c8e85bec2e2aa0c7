"""``loss="auto"``: the local correlation that tells one contrast from two, and the engine's choice
of the deformable similarity from it (regnet/optimize/contrast.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phantoms import LABELS, T1, brain_labels, render
from scipy import ndimage

from regnet.optimize import register
from regnet.optimize.contrast import (
    OTHER_CONTRAST_LOSS,
    SAME_ANATOMY_CORRELATION,
    SAME_CONTRAST_CORRELATION,
    SAME_CONTRAST_LOSS,
    choose_loss,
    local_correlation,
)


def volume(seed: int = 0, shape=(12, 14, 10)) -> torch.Tensor:
    return torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(seed))


def everywhere(image: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(image)


def test_local_correlation_of_one_contrast_under_gain_remap_and_bias_and_of_two():
    image = volume(shape=(16, 16, 16))
    ones = everywhere(image)
    assert local_correlation(image, image, None, ones, ones) == pytest.approx(1.0)
    assert local_correlation(image, 3 * image + 2, None, ones, ones) == pytest.approx(1.0)
    assert local_correlation(image, image.pow(2), None, ones, ones) > 0.95  # monotone remap
    ramp = torch.linspace(0, 1, 16).view(1, 1, 16, 1, 1)
    biased = image * torch.exp(0.6 * ramp)  # 1.8x brighter at one end than at the other
    assert local_correlation(image, biased, None, ones, ones) > 0.95
    assert local_correlation(image, 1.1 - image, None, ones, ones) == pytest.approx(-1.0)
    assert abs(local_correlation(image, volume(seed=1, shape=(16, 16, 16)), None, ones, ones)) < 0.1


def test_local_correlation_counts_only_voxels_both_regions_hold():
    image = volume()
    fixed_region = everywhere(image)
    moving_region = torch.zeros_like(image)
    moving_region[..., :5] = 1.0
    scrambled = image.clone()
    scrambled[..., 5:] = volume(seed=2)[..., 5:]  # unrelated where the moving region is empty
    assert local_correlation(image, scrambled, None, fixed_region, moving_region) == pytest.approx(
        1.0
    )
    assert local_correlation(image, scrambled, None, fixed_region, fixed_region) < 0.9
    empty = torch.zeros_like(image)
    assert local_correlation(image, image, None, fixed_region, empty) == 0.0
    flat = torch.full_like(image, 0.5)
    assert local_correlation(image, flat, None, fixed_region, fixed_region) == 0.0


def test_local_correlation_reads_the_moving_image_through_the_matrix():
    """moving(x + t) = fixed(x): the identity scores it low, the translation by t exactly 1
    (on the voxels whose moved position stays inside the grid)."""
    fixed = volume(shape=(16, 16, 16))
    moving = torch.roll(fixed, shifts=3, dims=2)  # moving[i + 3] = fixed[i]
    matrix = torch.eye(4)[None]
    matrix[0, 0, 3] = 3.0
    region = torch.zeros_like(fixed)
    region[:, :, :13] = 1.0
    assert local_correlation(fixed, moving, None, region, everywhere(fixed)) < 0.2
    assert local_correlation(fixed, moving, matrix, region, everywhere(fixed)) == pytest.approx(1.0)


def test_local_correlation_in_2d_through_a_translation():
    """2D: moving(x + t) = fixed(x) scores 1 through the matrix of t; the inverted image -1."""
    fixed = torch.rand(1, 1, 24, 20, generator=torch.Generator().manual_seed(3))
    moving = torch.roll(fixed, shifts=(2, -3), dims=(2, 3))  # moving[i + 2, j - 3] = fixed[i, j]
    matrix = torch.eye(3)[None]
    matrix[0, 0, 2], matrix[0, 1, 2] = 2.0, -3.0
    region = torch.zeros_like(fixed)
    region[:, :, :22, 3:] = 1.0
    ones = everywhere(fixed)
    assert local_correlation(fixed, moving, None, region, ones) < 0.2
    assert local_correlation(fixed, moving, matrix, region, ones) == pytest.approx(1.0)
    assert local_correlation(fixed, 1.0 - moving, matrix, region, ones) == pytest.approx(-1.0)


def test_register_auto_with_an_affine_transform_chooses_nothing(head):
    labels, fixed = head
    result = register(fixed, shifted(render(labels, seed=2)), transform="affine", loss="auto",
                      **{k: v for k, v in QUICK.items() if k != "iterations"},
                      iterations=(3, 2, 0))  # fmt: skip
    assert result.loss is None and result.contrast_correlation is None


def test_choose_loss_lncc_only_between_the_two_thresholds():
    assert choose_loss(SAME_CONTRAST_CORRELATION) == SAME_CONTRAST_LOSS
    assert choose_loss(SAME_ANATOMY_CORRELATION - 1e-6) == SAME_CONTRAST_LOSS
    assert choose_loss(SAME_CONTRAST_CORRELATION - 1e-6) == OTHER_CONTRAST_LOSS
    assert choose_loss(SAME_ANATOMY_CORRELATION) == OTHER_CONTRAST_LOSS
    assert choose_loss(-1.0) == OTHER_CONTRAST_LOSS
    assert choose_loss(1.0) == OTHER_CONTRAST_LOSS


QUICK = {
    "iterations": (3, 2, 1),
    "affine_iterations": (3, 2, 0),
    "search_iterations": 2,
    "init": "search",
    "affine_loss": "mi",
}


@pytest.fixture(scope="module")
def head():
    labels = brain_labels((32, 32, 32))
    return labels, torch.from_numpy(render(labels, seed=1))[None, None]


def shifted(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.roll(image, 2, axis=0).copy())[None, None]


def another_person(labels: np.ndarray, seed: int = 7) -> np.ndarray:
    """``render``'s T1-like tissue values with another tissue texture: the same contrast, other
    anatomy within the tissues."""
    image = np.zeros(labels.shape, np.float32)
    for name, value in T1.items():
        image[labels == LABELS[name]] = value
    texture = ndimage.gaussian_filter(
        np.random.default_rng(seed).standard_normal(labels.shape), 1.5
    )
    return (image * (1 + 0.4 * texture / texture.std()) * (labels > 0)).astype(np.float32)


@pytest.mark.parametrize(
    ("case", "expected", "low", "high"),
    [
        ("same head, other noise", OTHER_CONTRAST_LOSS, SAME_ANATOMY_CORRELATION, 1.0),
        ("another person", SAME_CONTRAST_LOSS, SAME_CONTRAST_CORRELATION, SAME_ANATOMY_CORRELATION),
        ("inverted contrast", OTHER_CONTRAST_LOSS, -1.0, 0.0),
    ],
)
def test_register_auto_chooses_by_how_the_aligned_images_relate(head, case, expected, low, high):
    labels, fixed = head
    image = {
        "same head, other noise": lambda: render(labels, seed=2),
        "another person": lambda: another_person(labels),
        "inverted contrast": lambda: render(labels, inverted=True, seed=2),
    }[case]()
    moving = shifted(image)
    result = register(fixed, moving, loss="auto", exact_svf_gradient="auto", **QUICK)
    assert result.loss == expected
    assert low <= result.contrast_correlation < high
    assert result.exact_svf_gradient == (expected == SAME_CONTRAST_LOSS)  # exact with lncc
    explicit = register(
        fixed, moving, loss=expected, exact_svf_gradient=result.exact_svf_gradient, **QUICK
    )
    assert explicit.loss == expected and explicit.contrast_correlation is None
    assert torch.equal(result.ddf, explicit.ddf)  # "auto" only chooses


def test_register_refuses_an_unknown_svf_gradient_setting(head):
    _, fixed = head
    with pytest.raises(ValueError, match="exact_svf_gradient"):
        register(fixed, fixed, exact_svf_gradient="sometimes", **QUICK)


def test_register_auto_needs_an_affine_similarity(head):
    _, fixed = head
    with pytest.raises(ValueError, match="affine_loss"):
        register(fixed, fixed, loss="auto", iterations=(1, 1, 1))
