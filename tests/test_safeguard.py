"""A result is checked against its start (:mod:`regnet.optimize.safeguard`)."""

import math

import torch

from regnet.optimize.safeguard import (
    check_against_start,
    mask_dice,
    normalized_mutual_information,
)
from regnet.spatial import warp


def smooth_image(shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *(n // 4 for n in shape), generator=generator)
    return torch.nn.functional.interpolate(noise, size=shape, mode="trilinear")


def test_nmi_is_two_for_a_one_to_one_map_and_near_one_for_independent_images() -> None:
    image = smooth_image((24, 24, 24))
    assert math.isclose(normalized_mutual_information(image, image), 2.0, rel_tol=1e-9)
    inverted = 1.0 - image  # contrast does not matter
    assert math.isclose(normalized_mutual_information(image, inverted), 2.0, rel_tol=1e-9)
    independent = torch.rand(1, 1, 24, 24, 24, generator=torch.Generator().manual_seed(5))
    assert normalized_mutual_information(image, independent) < 1.1


def test_nmi_counts_only_the_region() -> None:
    image = smooth_image((20, 20, 20))
    other = image.clone()
    other[..., 10:] = torch.rand_like(other[..., 10:])
    region = torch.zeros_like(image)
    region[..., :10] = 1
    assert math.isclose(normalized_mutual_information(image, other, region), 2.0, rel_tol=1e-9)
    assert normalized_mutual_information(image, other) < 1.9


def test_mask_dice() -> None:
    a = torch.zeros(1, 1, 10, 10)
    b = torch.zeros(1, 1, 10, 10)
    a[..., :5, :] = 1
    b[..., 2:7, :] = 1
    assert math.isclose(mask_dice(a, b), 2 * 30 / 100)
    assert mask_dice(a, a) == 1.0


def shifted_pair(shift: float):
    """``fixed`` and ``moving`` = ``fixed`` moved by ``shift`` voxels along the first axis, so
    the true backward field is ``+shift`` there."""
    moving = smooth_image((24, 24, 24), seed=1)
    truth = torch.zeros(1, 3, 24, 24, 24)
    truth[:, 0] = shift
    return warp(moving, truth), moving, truth


def test_a_better_result_is_kept() -> None:
    fixed, moving, truth = shifted_pair(3.0)
    check = check_against_start(fixed, moving, {"header": None, "result": truth})
    assert check.result_kept and check.scores["result"]["nmi"] > check.scores["header"]["nmi"]
    assert check.as_dict()["kept"] == "result"


def test_a_result_worse_than_the_start_is_refused() -> None:
    fixed, moving, truth = shifted_pair(0.0)
    wrong = torch.zeros_like(truth)
    wrong[:, 1] = 4.0
    check = check_against_start(fixed, moving, {"header": None, "result": wrong})
    assert not check.result_kept and check.kept == "header"
    assert check.scores["result"]["nmi"] < check.scores["header"]["nmi"]
    message = check.message()
    assert "nmi" in message and "the header alignment is kept" in message


def test_masks_can_veto_a_result() -> None:
    fixed, moving, _ = shifted_pair(0.0)
    mask = torch.zeros_like(fixed)
    mask[..., 6:18, 6:18, 6:18] = 1
    wrong = torch.zeros(1, 3, 24, 24, 24)
    wrong[:, 2] = 3.0
    candidates = {"header": None, "result": wrong}
    check = check_against_start(fixed, moving, candidates, fixed_mask=mask, moving_mask=mask)
    assert check.scores["header"]["mask_dice"] == 1.0
    assert check.scores["result"]["mask_dice"] < 0.8
    assert check.kept == "header"


def test_an_intermediate_stage_is_kept_when_the_last_one_spoils_it() -> None:
    fixed, moving, truth = shifted_pair(2.0)
    spoiled = truth.clone()
    spoiled[:, 1] = 3.0
    candidates = {"header": None, "affine": truth, "result": spoiled}
    check = check_against_start(fixed, moving, candidates)
    assert check.kept == "affine" and not check.result_kept
    assert check.scores["affine"]["nmi"] > check.scores["header"]["nmi"]
    assert "the affine alignment is kept" in check.message()


def test_a_slightly_lower_score_than_an_intermediate_stage_is_tolerated() -> None:
    fixed, moving, truth = shifted_pair(2.0)
    nudged = truth.clone()
    nudged[:, 0] = 2.05
    candidates = {"header": None, "affine": truth, "result": nudged}
    check = check_against_start(fixed, moving, candidates, stage_tolerance=0.5)
    assert check.scores["result"]["nmi"] < check.scores["affine"]["nmi"]
    assert check.kept == "result"
    assert check_against_start(fixed, moving, candidates, stage_tolerance=0.0).kept == "affine"


def test_the_check_works_in_2d() -> None:
    generator = torch.Generator().manual_seed(2)
    noise = torch.rand(1, 1, 8, 8, generator=generator)
    moving = torch.nn.functional.interpolate(noise, size=(32, 32), mode="bilinear")
    truth = torch.zeros(1, 2, 32, 32)
    truth[:, 1] = 2.0
    fixed = warp(moving, truth)
    wrong = -truth
    assert check_against_start(fixed, moving, {"header": None, "result": truth}).result_kept
    assert check_against_start(fixed, moving, {"header": None, "result": wrong}).kept == "header"
