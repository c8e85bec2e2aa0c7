"""Tests of regnet.data.synthetic: determinism, field direction, diffeomorphism, contrasts."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage

from regnet.data.synthetic import SyntheticPairs, item_generator, smooth_noise
from regnet.spatial import matrix_from_ddf, warp_labels

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "synthetic.yaml"
NO_AFFINE = dict(max_rotation_deg=0.0, max_translation=0.0, max_log_scale=0.0, max_shear=0.0)
FLAT_RENDER = dict(max_blur_sigma=0.0, max_bias_std=0.0, max_noise_std=0.0, gamma_std=0.0)


def dice_per_label(a: torch.Tensor, b: torch.Tensor, num_labels: int) -> list[float]:
    """Dice of every label present in ``a`` or ``b``."""
    scores = []
    for k in range(num_labels):
        in_a, in_b = a == k, b == k
        total = int(in_a.sum() + in_b.sum())
        if total:
            scores.append(2 * int((in_a & in_b).sum()) / total)
    return scores


def scipy_warp_labels(labels: np.ndarray, ddf: np.ndarray, num_labels: int) -> np.ndarray:
    """Independent backward warp: linear one-hot at ``x + ddf(x)`` with scipy, then argmax."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"))
    coords = grid + ddf
    channels = [
        ndimage.map_coordinates((labels == k).astype(np.float64), coords, order=1, mode="nearest")
        for k in range(num_labels)
    ]
    return np.argmax(np.stack(channels), axis=0)


def numpy_jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """``det(I + grad u)`` with numpy central differences, independent of regnet.spatial."""
    ndim = ddf.shape[0]
    jac = np.stack([np.stack(np.gradient(ddf[c]), axis=0) for c in range(ndim)])  # (c, a, *S)
    jac = jac + np.eye(ndim).reshape(ndim, ndim, *([1] * ndim))
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def test_items_are_deterministic_per_seed_and_index():
    a = SyntheticPairs((24, 24), num_labels=5, seed=3)
    b = SyntheticPairs((24, 24), num_labels=5, seed=3)
    first, again = a[7], b[7]
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(a[8]["fixed"], first["fixed"])
    assert not torch.equal(
        SyntheticPairs((24, 24), num_labels=5, seed=4)[7]["fixed"], first["fixed"]
    )
    # Indices beyond len() are valid and new (unlimited generator).
    assert not torch.equal(a[len(a) + 7]["fixed"], first["fixed"])


def test_item_generator_streams_differ():
    draws = {(s, i): torch.rand(4, generator=item_generator(s, i)) for s in (0, 1) for i in (0, 1)}
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.allclose(values[i], values[j])


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_item_keys_dtypes_and_ranges(shape):
    dataset = SyntheticPairs(shape, num_labels=6, label_spacing=6.0, velocity_std=2.0)
    item = dataset[0]
    assert set(item) == {"fixed", "moving", "fixed_label", "moving_label", "target_ddf"}
    for key in ("fixed", "moving"):
        assert item[key].shape == (1, *shape) and item[key].dtype == torch.float32
        assert item[key].min() == 0.0 and item[key].max() == 1.0
    for key in ("fixed_label", "moving_label"):
        assert item[key].shape == (1, *shape) and item[key].dtype == torch.int64
        assert item[key].min() >= 0 and item[key].max() <= 5
    assert item["target_ddf"].shape == (len(shape), *shape)
    assert item["target_ddf"].dtype == torch.float32
    assert torch.isfinite(item["target_ddf"]).all()


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_target_ddf_maps_moving_labels_onto_fixed_labels(shape):
    num_labels = 5
    dataset = SyntheticPairs(shape, num_labels=num_labels, label_spacing=6.0, velocity_std=2.0)
    for index in range(3):
        item = dataset[index]
        moving, fixed, ddf = item["moving_label"][None], item["fixed_label"], item["target_ddf"]
        onehot = warp_labels(moving, ddf[None], "onehot", num_labels)[0]
        assert torch.equal(onehot, fixed)  # the construction itself
        nearest = warp_labels(moving, ddf[None], "nearest")[0]
        assert np.mean(dice_per_label(nearest, fixed, num_labels)) >= 0.95
        independent = scipy_warp_labels(moving[0, 0].numpy(), ddf.double().numpy(), num_labels)
        assert (independent == fixed[0].numpy()).mean() >= 0.995
        # The inverse direction does not explain the pair: the test can tell them apart.
        reverse = warp_labels(fixed[None], ddf[None], "onehot", num_labels)[0]
        assert np.mean(dice_per_label(reverse, item["moving_label"], num_labels)) < 0.95


@pytest.mark.parametrize("shape", [(48, 48), (20, 20, 20)])
def test_target_ddf_is_diffeomorphic(shape):
    dataset = SyntheticPairs(shape, num_labels=4)
    for index in range(4):
        ddf = dataset[index]["target_ddf"].double().numpy()
        assert numpy_jacobian_determinant(ddf).min() > 0


def test_translation_only_field_is_constant_shift():
    dataset = SyntheticPairs(
        (24, 24), num_labels=4, velocity_std=0.0, **{**NO_AFFINE, "max_translation": 2.5}
    )
    ddf = dataset[0]["target_ddf"]
    shift = ddf.flatten(1)[:, 0]
    assert torch.allclose(ddf, shift.view(2, 1, 1).expand_as(ddf), atol=1e-5)
    assert shift.abs().max() <= 2.5 and shift.abs().max() > 0


def test_rotation_only_field_is_a_bounded_rotation():
    dataset = SyntheticPairs(
        (33, 33), num_labels=4, velocity_std=0.0, **{**NO_AFFINE, "max_rotation_deg": 8.0}
    )
    matrix = matrix_from_ddf(dataset[1]["target_ddf"][None].double())[0]
    linear = matrix[:2, :2]
    assert torch.allclose(linear @ linear.T, torch.eye(2, dtype=torch.float64), atol=1e-6)
    angle = torch.rad2deg(torch.atan2(linear[1, 0], linear[0, 0])).abs()
    assert 0 < angle <= 8.0
    centre = torch.tensor([16.0, 16.0], dtype=torch.float64)
    assert torch.allclose(linear @ centre + matrix[:2, 2], centre, atol=1e-4)  # about the centre


def test_no_deformation_gives_identical_label_maps():
    dataset = SyntheticPairs((24, 24), num_labels=4, velocity_std=0.0, **NO_AFFINE)
    item = dataset[0]
    assert item["target_ddf"].abs().max() < 1e-5
    assert torch.equal(item["fixed_label"], item["moving_label"])


def label_intensities(image: torch.Tensor, labels: torch.Tensor, present: list[int]) -> np.ndarray:
    return np.array([float(image[labels == k].mean()) for k in present])


def test_contrast_draws_differ_unless_same_contrast():
    correlations = {}
    for same in (False, True, "jitter"):
        contrast = {"contrast_jitter": 0.1} if same == "jitter" else {"same_contrast": same}
        dataset = SyntheticPairs(
            (32, 32), num_labels=8, label_spacing=6.0, **contrast, **FLAT_RENDER
        )
        values = []
        for index in range(4):
            item = dataset[index]
            fixed_labels, moving_labels = item["fixed_label"], item["moving_label"]
            for image, labels in ((item["fixed"], fixed_labels), (item["moving"], moving_labels)):
                # Flat rendering: one intensity per label.
                for k in labels.unique():
                    assert image[labels == k].std(unbiased=False) < 1e-6
            present = sorted(
                set(fixed_labels.unique().tolist()) & set(moving_labels.unique().tolist())
            )
            fixed = label_intensities(item["fixed"], fixed_labels, present)
            moving = label_intensities(item["moving"], moving_labels, present)
            values.append(np.corrcoef(fixed, moving)[0, 1])
        correlations[same] = values
    # Same draw: intensities agree up to the affine min-max normalisation.
    assert min(correlations[True]) > 0.9999
    assert max(correlations[False]) < 0.95
    # Jittered draw: a related contrast, neither identical nor independent.
    assert 0.8 < np.mean(correlations["jitter"]) < 0.999


def test_smooth_noise_has_unit_variance():
    field = smooth_noise((64, 64), 8, spacing=1.0, generator=torch.Generator().manual_seed(0))
    assert field.shape == (1, 8, 64, 64)
    assert abs(float(field.std()) - 1.0) < 0.1
    assert abs(float(field.mean())) < 0.1


def test_config_deformations_leave_room_to_improve():
    """Identity Dice of the default 2D config is clearly below 1 (and not trivially low)."""
    config = OmegaConf.load(CONFIG)
    val = OmegaConf.to_container(OmegaConf.create({"data": config}), resolve=True)["data"]["val"]
    val.pop("_target_")
    dataset = SyntheticPairs(**{**val, "length": 8})
    scores = [
        np.mean(dice_per_label(item["fixed_label"], item["moving_label"], dataset.num_labels))
        for item in dataset
    ]
    assert 0.3 < np.mean(scores) < 0.8
    assert max(scores) < 0.95


def test_2d_item_is_fast():
    """CPU time of one 96x96 pair (one thread; process time is robust to a busy machine)."""
    dataset = SyntheticPairs((96, 96))
    dataset[0]
    times = []
    for index in range(1, 6):
        start = time.process_time()
        dataset[index]
        times.append(time.process_time() - start)
    assert sorted(times)[2] < 0.05


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(32,)), "shape"),
        (dict(shape=(8, 8), num_labels=1), "num_labels"),
        (dict(shape=(8, 8), seed=-1), "seed"),
        (dict(shape=(8, 8), label_spacing=0.0), "label_spacing"),
        (dict(shape=(8, 8), max_noise_std=-0.1), "max_noise_std"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticPairs(**kwargs)


def test_negative_index_raises():
    with pytest.raises(IndexError, match="index"):
        SyntheticPairs((8, 8))[-1]
