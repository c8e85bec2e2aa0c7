"""Soft multi-label Dice."""

import pytest
import torch
import torch.nn.functional as F

from regnet.losses import Dice


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), classes).movedim(-1, 1).float()


def _squares(shape=(16, 16)):
    fixed = torch.zeros(1, *shape, dtype=torch.long)
    warped = torch.zeros(1, *shape, dtype=torch.long)
    fixed[0, 2:10, 2:10] = 1  # 64 voxels
    warped[0, 4:12, 2:10] = 1  # 64 voxels, 48 shared: Dice 0.75
    return fixed, warped


def test_known_overlap_and_absent_label_ignored():
    fixed, warped = _squares()
    # Four channels: background, label 1, label 2 (absent from both), label 3 (absent).
    inputs = {"fixed_label": _one_hot(fixed, 4), "warped_label": _one_hot(warped, 4)}
    assert Dice()(inputs).item() == pytest.approx(0.25)


def test_label_in_one_map_only_counts_as_zero():
    fixed, warped = _squares()
    fixed[0, 12:14, 12:14] = 2
    inputs = {"fixed_label": _one_hot(fixed, 3), "warped_label": _one_hot(warped, 3)}
    assert Dice()(inputs).item() == pytest.approx(1.0 - (0.75 + 0.0) / 2)


def test_3d_batch_pairs_without_label_are_skipped():
    fixed = torch.zeros(2, 6, 6, 6, dtype=torch.long)
    warped = torch.zeros_like(fixed)
    fixed[0, :3] = 1
    warped[0, :3] = 1  # perfect in item 0
    fixed[1, :2, :2, :2] = 2
    warped[1, :2, :2, :1] = 2  # item 1, label 2: 2 * 4 / (8 + 4) = 2/3
    inputs = {"fixed_label": _one_hot(fixed, 3), "warped_label": _one_hot(warped, 3)}
    assert Dice()(inputs).item() == pytest.approx(1.0 - (1.0 + 2.0 / 3.0) / 2)


def test_background_included_on_request_and_empty_gives_zero():
    fixed, warped = _squares((4, 4))
    fixed[:] = 0
    warped[:] = 0
    inputs = {"fixed_label": _one_hot(fixed, 2), "warped_label": _one_hot(warped, 2)}
    assert Dice()(inputs).item() == 0.0
    assert Dice(include_background=True)(inputs).item() == pytest.approx(0.0)


def test_soft_labels_give_gradient():
    fixed, warped = _squares()
    soft = _one_hot(warped, 2).requires_grad_()
    Dice()({"fixed_label": _one_hot(fixed, 2), "warped_label": soft}).backward()
    assert torch.isfinite(soft.grad).all()
    # Raising the warped label inside the fixed square lowers the loss.
    assert soft.grad[0, 1, 5, 5] < 0 and soft.grad[0, 1, 11, 5] > 0


def test_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        Dice()({"fixed_label": torch.zeros(1, 3, 4, 4), "warped_label": torch.zeros(1, 2, 4, 4)})
    with pytest.raises(ValueError, match="channel 0"):
        Dice()({"fixed_label": torch.zeros(1, 1, 4, 4), "warped_label": torch.zeros(1, 1, 4, 4)})
