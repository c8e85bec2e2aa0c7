"""Dice per label and HD95 on label maps with known geometry."""

import math

import numpy as np
import pytest
import torch

from regnet.metrics import dice_per_label, hd95


def _squares():
    pred = np.zeros((16, 16), dtype=np.int64)
    true = np.zeros((16, 16), dtype=np.int64)
    pred[2:10, 2:10] = 1  # 64
    true[4:12, 2:10] = 1  # 64, overlap 48: Dice 0.75
    pred[12:14, 12:16] = 5  # 8
    true[12:14, 12:14] = 5  # 4, overlap 4: Dice 8/12
    true[0, 15] = 7  # only in true: Dice 0
    return pred, true


def test_dice_per_label_known_overlaps_numpy_and_torch():
    pred, true = _squares()
    expected = {1: 0.75, 5: 8 / 12, 7: 0.0}
    for a, b in ((pred, true), (torch.from_numpy(pred), torch.from_numpy(true))):
        result = dice_per_label(a, b)
        assert result.keys() == expected.keys()
        for label, value in expected.items():
            assert result[label] == pytest.approx(value)


def test_dice_requested_labels_absent_ones_omitted():
    pred, true = _squares()
    assert dice_per_label(pred, true, labels=[5, 9, 0]) == pytest.approx({5: 8 / 12})


def test_dice_3d_identical_is_one():
    labels = np.random.default_rng(0).integers(0, 4, size=(6, 7, 8))
    assert dice_per_label(labels, labels) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_dice_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_label(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="integer labels"):
        dice_per_label(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(TypeError, match="pred_labels"):
        dice_per_label([[0, 1]], np.zeros((1, 2)))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_shifted_cubes_equals_shift_in_mm_anisotropic(axis):
    # Cubes of side 8 shifted by 3 voxels along ``axis``: the leading face (1/6 of the surface)
    # lies exactly 3 voxels from the other cube's surface and no boundary voxel farther along
    # that axis, so both directed 95th percentiles equal the shift in mm.
    spacing = (1.5, 0.8, 1.2)
    shift = 3
    pred = np.zeros((20, 20, 20), dtype=np.int64)
    true = np.zeros_like(pred)
    pred[4:12, 4:12, 4:12] = 2
    region = [slice(4, 12)] * 3
    region[axis] = slice(4 + shift, 12 + shift)
    true[tuple(region)] = 2
    result = hd95(pred, true, spacing)
    assert result == {2: pytest.approx(shift * spacing[axis])}


def test_hd95_2d_torch_with_batch_axes_and_missing_label():
    pred = torch.zeros(1, 1, 24, 24, dtype=torch.long)
    true = torch.zeros_like(pred)
    pred[0, 0, 6:14, 6:14] = 1
    true[0, 0, 6:14, 10:18] = 1
    pred[0, 0, 20, 20] = 3
    result = hd95(pred, true, spacing=(1.0, 0.5), labels=[1, 3, 4])
    assert result[1] == pytest.approx(4 * 0.5)
    assert math.isinf(result[3])
    assert 4 not in result


def test_hd95_bad_spacing():
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="do not match"):
        hd95(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), spacing=(1.0, 1.0))


@pytest.mark.parametrize("shape", [(30, 26), (18, 20, 16)])
def test_hd95_equals_monais_on_blobs_touching_the_border(shape):
    """Smooth random labels (several blobs each, some cut by the array's edge), anisotropic
    voxels: the same values as MONAI's ``compute_hausdorff_distance(percentile=95)``."""
    from monai.metrics import compute_hausdorff_distance
    from scipy import ndimage

    rng = np.random.default_rng(len(shape))
    spacing = (0.9, 1.6, 1.2)[: len(shape)]

    def blobs() -> np.ndarray:
        noise = ndimage.gaussian_filter(rng.standard_normal((4, *shape)), 2.0)
        return (noise.argmax(0) + 1) * (noise.max(0) > 0.05)

    pred, true = blobs(), blobs()
    result = hd95(pred, true, spacing)
    both = {label for label in range(1, 5) if (pred == label).any() and (true == label).any()}
    assert len(both) >= 3 and set(result) >= both
    for label in both:
        value = result[label]
        expected = compute_hausdorff_distance(
            torch.from_numpy(pred == label)[None, None],
            torch.from_numpy(true == label)[None, None],
            percentile=95,
            spacing=spacing,
        )
        assert value == pytest.approx(float(expected), abs=1e-5)
        assert value > 0
