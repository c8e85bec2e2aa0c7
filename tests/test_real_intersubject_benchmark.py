"""The real inter-subject benchmark's tissue classes, scoring and preparation
(scripts/benchmarks/real_intersubject.py) on small made-up slices; nothing is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"))

import real_intersubject as bench  # noqa: E402


def three_tissue_slice(noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 'brain': a WM core (200) in GM (120) in CSF (40) on black, and its classes."""
    y, x = np.mgrid[:64, :64]
    radius = np.hypot(y - 31.5, x - 31.5)
    truth = np.select([radius < 10, radius < 18, radius < 24], [3, 2, 1], 0).astype(np.uint8)
    image = np.choose(truth, [0.0, 40.0, 120.0, 200.0]).astype(np.float32)
    image += noise * np.random.default_rng(seed).standard_normal(image.shape) * (truth > 0)
    return image, truth


def test_tissue_classes_recover_three_intensity_classes_under_noise():
    image, truth = three_tissue_slice(noise=12.0)
    labels = bench.tissue_classes(image)
    assert labels.dtype == np.uint8
    assert (labels == truth).mean() > 0.99
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_tissue_classes_are_ordered_by_intensity_not_by_size():
    image, truth = three_tissue_slice()
    inverted = np.where(truth > 0, 240.0 - image, 0.0).astype(np.float32)  # WM darkest
    labels = bench.tissue_classes(inverted)
    assert np.array_equal(labels[truth == 3], np.full((truth == 3).sum(), 1))
    assert np.array_equal(labels[truth == 1], np.full((truth == 1).sum(), 3))


def test_dice_by_class_against_hand_count():
    fixed = np.array([[1, 1, 2, 2], [3, 3, 0, 0]], np.uint8)
    warped = np.array([[1, 2, 2, 2], [3, 0, 0, 0]], np.uint8)
    scores = bench.dice_by_class(fixed, warped)
    assert scores["CSF"] == pytest.approx(2 * 1 / 3)  # |A|=2, |B|=1, overlap 1
    assert scores["GM"] == pytest.approx(2 * 2 / 5)  # |A|=2, |B|=3, overlap 2
    assert scores["WM"] == pytest.approx(2 * 1 / 3)
    assert scores["dice"] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3) / 3)


def test_prepare_writes_images_and_classes_on_one_grid(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for index, name in enumerate(bench.SLICES):
        image, _ = three_tissue_slice(noise=5.0, seed=index)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(data / f"{name}slice.jpg")
    assert bench.prepare("slices", data, tmp_path / "images") == bench.SLICES
    for name in bench.SLICES:
        image = nib.load(tmp_path / "images" / f"{name}.nii.gz")
        labels = nib.load(tmp_path / "images" / f"{name}_tissue.nii.gz")
        assert image.shape == labels.shape == (64, 64)
        assert np.array_equal(image.affine, labels.affine)
        assert set(np.unique(np.asarray(labels.dataobj))) == {0, 1, 2, 3}
    assert bench.tissue_path(tmp_path / "r16.nii.gz").name == "r16_tissue.nii.gz"
